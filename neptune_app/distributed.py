"""Data-parallel training under torchrun: one process per GPU (or CPU process with gloo).

`torchrun --nproc_per_node=N -m neptune_app train ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init` joins the process group (NCCL for CUDA, gloo for the CPU) and gives each rank its
device. Without those variables everything here is a no-op for one process.
"""
import hashlib
import os
from dataclasses import dataclass
from typing import List

import torch


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=torch.device(device))
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    return Context(device=dev, rank=rank, world=world, local_rank=local, owns_group=owns)


def shard(perm: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's part of an epoch's order (DistributedSampler's rule: pad by wrapping
    around to a multiple of the world size, then every world-th index)."""
    if not ctx.enabled:
        return perm
    n = perm.numel()
    total = -(-n // ctx.world) * ctx.world
    if total > n:
        perm = torch.cat([perm, perm[: total - n]])
    return perm[ctx.rank::ctx.world]


def shard_len(n: int, ctx: Context) -> int:
    return -(-n // ctx.world)


def all_sum(values: List[float], ctx: Context) -> List[float]:
    if not ctx.enabled:
        return list(values)
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: each rank updates them from its
    own batch, so without this the ranks' running statistics drift apart."""
    if not ctx.enabled:
        return
    import torch.distributed as dist
    for b in module.buffers():
        dist.broadcast(b, src=0)


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_everywhere(state: dict, ctx: Context) -> bool:
    """True when every rank holds bit-identical tensors in ``state``."""
    if not ctx.enabled:
        return True
    import torch.distributed as dist
    mine = digest(state)
    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, mine)
    return all(d == mine for d in everyone)


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        import torch.distributed as dist
        dist.barrier()


def shutdown(ctx: Context, ok: bool = True) -> None:
    """Leave the process group. On success every rank first meets the others (so no rank
    tears its connections down while a peer is still finishing, e.g. rank 0 writing the
    metrics) and frees what still holds the group (DistributedDataParallel's reducer sits
    in reference cycles): a group torn down by the interpreter's finalization instead
    aborts the process ("terminate called without an active exception"). After a failure
    there is no barrier: the other ranks may never reach it."""
    if not (ctx.enabled and ctx.owns_group):
        return
    import gc
    import torch.distributed as dist
    if ok:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
