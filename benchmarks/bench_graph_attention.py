"""Graph attention benchmark (CPU here; --device cuda runs benchmarks/gpu_graph_attention.py).

    python benchmarks/bench_graph_attention.py [--quick] [--json FILE]

See neptune_app/bench/graph_attention.py for what is measured and how.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neptune_app.bench.graph_attention import main  # noqa: E402

if __name__ == "__main__":
    main()
