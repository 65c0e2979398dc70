"""Runs neptune_app/bench/gpu_stage.py (see its docstring): `python benchmarks/gpu_stage.py --help`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neptune_app.bench.gpu_stage import main  # noqa: E402

if __name__ == "__main__":
    main()
