"""Stage benchmarks on the CPU (see neptune_app/bench/stage.py for what and how).

    python benchmarks/bench_stage.py [--quick] [--json FILE] [--threads N] [--only SECTIONS]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neptune_app.bench.stage import main  # noqa: E402

if __name__ == "__main__":
    main()
