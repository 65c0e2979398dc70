"""Builds the CPU emulation of the CUDA graph-attention kernels (see cuda_emulation.h).

    ops = load("default")   # the kernels with their real constants
    ops = load("deep")      # leaf segments of 4 edges, fan-in 2: deep record trees
    out, lse = ops.gat_forward(...)   # same arguments as torch.ops.neptune.gat_forward
"""
import os

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

VARIANTS = {
    "default": [],
    "deep": ["-DNEPTUNE_TREE_FAN_IN=2", "-DNEPTUNE_TREE_MIN_LEAF=4"],
}


def load(variant: str = "default", verbose: bool = False):
    ns = f"neptune_emu_{variant}"
    if not hasattr(torch.ops, ns) or not hasattr(getattr(torch.ops, ns), "gat_forward"):
        build_dir = os.path.join(ROOT, "build", "cuda_emulation", variant)
        os.makedirs(build_dir, exist_ok=True)
        cpp_extension.load(
            name=ns,
            sources=[os.path.join(HERE, "gat_emulated.cpp")],
            extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
            # Own namespace for the C++ symbols too, so nothing resolves to neptune_ext._C.
            extra_cflags=["-O1", "-g", "-fvisibility=hidden", f"-DNEPTUNE_EMU_NS={ns}",
                          "-Dneptune=neptune_emulated_" + variant] + VARIANTS[variant],
            build_directory=build_dir, is_python_module=False, verbose=verbose)
    return getattr(torch.ops, ns)
