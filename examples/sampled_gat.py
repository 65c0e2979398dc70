"""Train a multi-layer GraphAttention model on sampled subgraphs of a large graph.

    python examples/sampled_gat.py --nodes 200000 --edges 2000000 --epochs 3
    torchrun --nproc_per_node=2 examples/sampled_gat.py --epochs 3     # DistributedDataParallel
    python examples/sampled_gat.py --data my_graph.pt --device cuda --amp bf16

`--help` lists every option; the module neptune_app.sampled has the details.
"""
import os
import sys

from neptune_app.sampled import main

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a finished torchrun worker (see neptune_app/__main__.py)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
