"""Mini-batch GraphAttention training on sampled subgraphs - one process, or many under torchrun.

    python examples/sampled_gat.py --nodes 200000 --edges 2000000 --epochs 3 --out runs/sampled
    torchrun --nproc_per_node=2 examples/sampled_gat.py ...      # DistributedDataParallel
    python examples/sampled_gat.py --data graph.pt ...           # your graph (x, edge_index, y)

Each step takes a batch of seed (training) nodes, samples up to ``fanout[l]`` in-neighbours
per node and layer, and trains a stack of :class:`neptune_ext.nn.GraphAttention` layers on
that subgraph - a new ``edge_index`` every step, as with PyG's ``NeighborLoader`` (used when
PyG and its sampling backend, pyg-lib or torch-sparse, are installed; otherwise the
built-in sampler below, which draws the same kind of subgraph). Under torchrun every rank
samples its own share of each epoch's seed nodes (DistributedSampler's rule), gradients
are averaged by DistributedDataParallel (gloo on CPU, NCCL on CUDA), and the ranks end
with bit-identical weights (checked). A JSON of per-epoch loss, accuracy and throughput is
written to ``--out``.

A graph of your own: ``--data FILE``, a ``torch.save``d dict (or PyG ``Data``
converted with ``data.to_dict()``) with ``x`` [N, F], ``edge_index`` [2, E], ``y`` [N] and
optionally ``train_mask`` / ``val_mask``; it is read with ``torch.load(weights_only=True)``.
Masks are bool [N] tensors, or integer tensors of node ids (as some PyG data sets store
them: converted to masks, and said). ``x`` in float64/float16/bfloat16 is converted to
float32 (and said); labels of nodes outside both masks may be negative (unlabelled).
From Python, :func:`train_sampled` takes a PyG ``Data`` (or any object with those
attributes) directly.
"""
import argparse
import math
import os
import sys
import time
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from neptune_ext.nn import GraphAttention

from . import distributed
from ._io import out_dir_problem, write_json
from ._util import internal_error, one_line
from .options import MAX_LR, MAX_SEED, Formatter, OneLineParser, int_in, positive_float
from .sampled_data import MAX_CLASSES, SampledError, _as_graph  # noqa: F401 (re-exported)

__all__ = ["synthetic_graph", "NeighborSampler", "GATStack", "train_sampled", "main"]


# --------------------------------------------------------------------- data

def synthetic_graph(num_nodes: int, num_edges: int, num_features: int = 64, num_classes: int = 8,
                    homophily: float = 0.7, seed: int = 0):
    """A power-law graph with a planted class structure: node i has class y[i]; a fraction
    ``homophily`` of the edges join nodes of one class; features are a class signature plus
    noise. In-degrees follow a Zipf-like law (a few hubs), as in real citation graphs.
    Returns a dict with x, edge_index (COO, row 0 = source), y, train_mask, val_mask."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (num_nodes,), generator=g)
    w = 1.0 / torch.arange(1, num_nodes + 1, dtype=torch.float64) ** 0.8
    dst = torch.randperm(num_nodes, generator=g)[torch.multinomial(w, num_edges, replacement=True,
                                                                   generator=g)]
    # Sources: of the destination's class with probability `homophily`, else anywhere.
    order = torch.argsort(y)
    counts = torch.bincount(y, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    same = torch.rand(num_edges, generator=g) < homophily
    cls = y[dst]
    pick = (torch.rand(num_edges, generator=g) * counts[cls].clamp(min=1)).long()
    src_same = order[(starts[cls] + pick).clamp(max=num_nodes - 1)]
    src_any = torch.randint(0, num_nodes, (num_edges,), generator=g)
    src = torch.where(same, src_same, src_any)
    signature = torch.randn(num_classes, num_features, generator=g)
    x = 0.6 * signature[y] + torch.randn(num_nodes, num_features, generator=g)
    split = torch.rand(num_nodes, generator=g)
    return {"x": x, "edge_index": torch.stack([src, dst]), "y": y,
            "train_mask": split < 0.6, "val_mask": split >= 0.8}


class NeighborSampler:
    """Uniform in-neighbour sampling, layer by layer, in pure PyTorch.

    ``sample(seeds)`` returns ``(nodes, edge_index, batch_size)``: ``nodes`` the global ids
    of the subgraph's nodes (the seeds first), ``edge_index`` [2, E_sub] in local ids
    (row 0 = source), ``batch_size = len(seeds)``. Per layer, a node with at most ``k``
    in-edges keeps them all; one with more gets ``k`` of them drawn uniformly (with
    replacement, duplicates removed), so a hub costs ``k``, not its degree.
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int, fanout: Sequence[int],
                 generator: Optional[torch.Generator] = None):
        src, dst = edge_index[0].long(), edge_index[1].long()
        order = torch.argsort(dst, stable=True)
        self.col = src[order]
        self.rowptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        self.rowptr[1:] = torch.cumsum(torch.bincount(dst, minlength=num_nodes), 0)
        self.num_nodes = num_nodes
        self.fanout = [int(k) for k in fanout]
        self.generator = generator

    def sample(self, seeds: torch.Tensor):
        nodes = seeds.long()
        local = torch.full((self.num_nodes,), -1, dtype=torch.long)
        local[nodes] = torch.arange(nodes.numel())
        frontier = nodes
        srcs, dsts = [], []
        for k in self.fanout:
            start, deg = self.rowptr[frontier], self.rowptr[frontier + 1] - self.rowptr[frontier]
            take_all = deg <= k
            # All in-edges of the low-degree nodes ...
            lo_nodes = frontier[take_all]
            lo_deg = deg[take_all]
            rep = torch.repeat_interleave(torch.arange(lo_nodes.numel()), lo_deg)
            first = torch.cumsum(lo_deg, 0) - lo_deg
            pos_lo = start[take_all][rep] + (torch.arange(rep.numel()) - first[rep])
            dst_lo = lo_nodes[rep]
            # ... k draws among those of the others.
            hi = ~take_all
            hi_nodes = frontier[hi]
            r = torch.rand(hi_nodes.numel(), k, generator=self.generator)
            pos_hi = start[hi].unsqueeze(1) + (r * deg[hi].unsqueeze(1)).long()
            dst_hi = hi_nodes.unsqueeze(1).expand(-1, k)
            pos = torch.cat([pos_lo, pos_hi.reshape(-1)])
            dst = torch.cat([dst_lo, dst_hi.reshape(-1)])
            key = torch.unique(dst * self.num_nodes + self.col[pos])  # drop repeated draws
            dst, src = key // self.num_nodes, key % self.num_nodes
            new = torch.unique(src[local[src] < 0])
            local[new] = torch.arange(nodes.numel(), nodes.numel() + new.numel())
            nodes = torch.cat([nodes, new])
            srcs.append(src)
            dsts.append(dst)
            frontier = new
        src, dst = torch.cat(srcs), torch.cat(dsts)
        return nodes, torch.stack([local[src], local[dst]]), seeds.numel()


def _pyg_loader(graph: dict, seeds: torch.Tensor, fanout, batch_size: int, seed: int):
    """PyG's NeighborLoader over ``seeds`` when PyG and a sampling backend are installed
    (None otherwise): yields (global node ids, edge_index, batch_size)."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch_geometric.data import Data
            from torch_geometric.loader import NeighborLoader
            import torch_geometric.typing as pyg_typing
        if not (getattr(pyg_typing, "WITH_PYG_LIB", False) or getattr(pyg_typing, "WITH_TORCH_SPARSE", False)):
            return None
    except Exception:
        return None
    data = Data(edge_index=graph["edge_index"], num_nodes=graph["x"].shape[0])
    data.n_id = torch.arange(graph["x"].shape[0])
    loader = NeighborLoader(data, num_neighbors=list(fanout), input_nodes=seeds, batch_size=batch_size,
                            shuffle=False, generator=torch.Generator().manual_seed(seed))
    return ((b.n_id, b.edge_index, b.batch_size) for b in loader)


# --------------------------------------------------------------------- model

class GATStack(nn.Module):
    """``layers`` GraphAttention layers: hidden ones with ``heads`` concatenated heads and
    ELU, the last one averaging its heads into ``num_classes`` logits."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        if layers < 1:
            raise SampledError(f"layers must be >= 1, got {layers}")
        convs, width = [], in_channels
        for _ in range(layers - 1):
            convs.append(GraphAttention(width, hidden, heads=heads, dropout=dropout))
            width = hidden * heads
        convs.append(GraphAttention(width, num_classes, heads=heads, concat=False, dropout=dropout))
        self.convs = nn.ModuleList(convs)

    def forward(self, x, edge_index):
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = F.elu(x)
        return x


# ------------------------------------------------------------------ training

def _autocast(device: torch.device, amp: Optional[str]):
    if amp is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def _batches(graph, seeds, fanout, batch_size, gen, seed):
    loader = _pyg_loader(graph, seeds, fanout, batch_size, seed)
    if loader is not None:
        return loader, "torch_geometric NeighborLoader"
    sampler = NeighborSampler(graph["edge_index"], graph["x"].shape[0], fanout, generator=gen)
    return (sampler.sample(seeds[i:i + batch_size]) for i in range(0, seeds.numel(), batch_size)), \
        "neptune_ext NeighborSampler"


@torch.no_grad()
def _evaluate(model, graph, nodes_eval, fanout, batch_size, device, amp, gen, seed):
    model.eval()
    correct = total = 0
    batches, _ = _batches(graph, nodes_eval, fanout, batch_size, gen, seed)
    for n_id, ei, bs in batches:
        with _autocast(device, amp):
            out = model(graph["x"][n_id].to(device), ei.to(device))
        correct += int((out[:bs].argmax(-1).cpu() == graph["y"][n_id[:bs]]).sum())
        total += bs
    model.train()
    return correct / max(total, 1)


def _check_device(device) -> None:
    """cpu, cuda or cuda:N (a SampledError otherwise, and for CUDA without a GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SampledError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SampledError("device cuda was requested but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SampledError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def train_sampled(data, out_dir: str, epochs: int = 3, batch_size: int = 512,
                  fanout: Sequence[int] = (10, 10), hidden: int = 32, heads: int = 4, lr: float = 5e-3,
                  device: str = "cpu", amp: Optional[str] = None, seed: int = 0,
                  max_steps: Optional[int] = None, progress: bool = True, quiet: bool = False) -> dict:
    """Train a GATStack on sampled subgraphs of ``data`` (see the module docstring); returns
    the metrics written to ``out_dir/sampled_metrics.json`` (on rank 0; {} on the others)."""
    fanout = [int(k) for k in fanout]
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("hidden", hidden), ("heads", heads)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise SampledError(f"{name} must be a positive integer, got {v!r}")
    if not fanout or any(k <= 0 for k in fanout):
        raise SampledError(f"fanout must be positive integers, one per layer, got {fanout}")
    if amp not in (None, "bf16", "fp16"):
        raise SampledError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise SampledError("amp fp16 needs a CUDA device (on the CPU use bf16)")
    _check_device(device)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and 0 < lr <= MAX_LR):
        raise SampledError(f"lr must be a positive finite number at most {MAX_LR:g}, got {lr!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        raise SampledError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    problem = out_dir_problem(out_dir, "--out")
    if problem:
        raise SampledError(problem)
    graph = _as_graph(data, note=_note if int(os.environ.get("RANK", "0")) == 0 and not quiet else None)
    ctx = distributed.init(device)
    ok = False
    try:
        result = _train(ctx, graph, out_dir, epochs, batch_size, fanout, hidden, heads, lr, amp, seed,
                        max_steps, progress and ctx.is_main and not quiet and sys.stderr.isatty(), quiet)
        ok = True
        return result
    finally:
        distributed.shutdown(ctx, ok)


def _train(ctx, graph, out_dir, epochs, batch_size, fanout, hidden, heads, lr, amp, seed, max_steps,
           progress, quiet):
    dev = ctx.device
    say = print if ctx.is_main and not quiet else (lambda *a, **k: None)
    torch.manual_seed(seed)  # the same initial weights on every rank
    num_classes = int(graph["y"].max()) + 1
    model = GATStack(graph["x"].shape[1], hidden, num_classes, layers=len(fanout), heads=heads).to(dev)
    net = model
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if dev.type == "cuda"
                                                  else None)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_nodes = graph["train_mask"].nonzero().view(-1)
    val_nodes = graph["val_mask"].nonzero().view(-1)
    n, E = graph["x"].shape[0], graph["edge_index"].shape[1]
    say(f"sampled GraphAttention training: {n:,} nodes, {E:,} edges, {num_classes} classes, "
        f"{train_nodes.numel():,} training seeds, fanout {fanout}, batch {batch_size}"
        f"{f' per rank x {ctx.world} ranks' if ctx.enabled else ''}, {dev}"
        f"{f', autocast {amp}' if amp else ''}")
    history, sampler_name, step = [], None, 0
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = train_nodes[torch.randperm(train_nodes.numel(), generator=gen)]
        mine = distributed.shard(perm, ctx)  # every rank the same number of seeds
        gen_r = torch.Generator().manual_seed(seed * 1000 + epoch + 7919 * (ctx.rank + 1))
        batches, sampler_name = _batches(graph, mine, fanout, batch_size, gen_r, seed + epoch)
        steps = math.ceil(mine.numel() / batch_size)
        if max_steps is not None:
            steps = min(steps, max_steps)
        it = batches
        if progress:
            from tqdm import tqdm
            it = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        t0 = time.perf_counter()
        tot_loss = tot_correct = seen = edges_seen = 0.0
        losses = []
        for i, (n_id, ei, bs) in enumerate(it):
            if i >= steps:
                break
            x, ei = graph["x"][n_id].to(dev, non_blocking=True), ei.to(dev, non_blocking=True)
            y = graph["y"][n_id[:bs]].to(dev)
            with _autocast(dev, amp):
                out = net(x, ei)[:bs]
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lv = loss.item()
            losses.append(lv)
            tot_loss += lv * bs
            tot_correct += int((out.argmax(-1) == y).sum())
            seen += bs
            edges_seen += ei.shape[1]
            step += 1
        seconds = time.perf_counter() - t0
        tot_loss, tot_correct, seen, edges_seen, seconds_sum = distributed.all_sum(
            [tot_loss, tot_correct, seen, edges_seen, seconds], ctx)
        seconds = seconds_sum / ctx.world  # the ranks' mean
        val_eval = val_nodes[:4 * batch_size]  # a fixed sample of validation nodes, each epoch
        val_acc = _evaluate(model, graph, val_eval, fanout, batch_size, dev, amp,
                            torch.Generator().manual_seed(seed + 1), seed + 1) if ctx.is_main else float("nan")
        rec = {"epoch": epoch + 1, "steps": len(losses), "loss": tot_loss / max(seen, 1),
               "first_step_loss": losses[0] if losses else float("nan"),
               "last_step_loss": losses[-1] if losses else float("nan"),
               "train_accuracy": tot_correct / max(seen, 1), "val_accuracy": val_acc,
               "val_nodes": int(val_eval.numel()),
               "seeds_per_s": seen / max(seconds, 1e-9), "sampled_edges_per_s": edges_seen / max(seconds, 1e-9),
               "seconds": seconds}
        history.append(rec)
        say(f"epoch {epoch + 1}/{epochs}: loss {rec['loss']:.3f} (steps: {rec['first_step_loss']:.3f} -> "
            f"{rec['last_step_loss']:.3f}), train acc {rec['train_accuracy']:.3f}, val acc {val_acc:.3f} | "
            f"{rec['seeds_per_s']:,.0f} seeds/s, {rec['sampled_edges_per_s']:,.0f} edges/s | {seconds:.1f} s")
    same = True
    if ctx.enabled:
        same = distributed.same_everywhere(model.state_dict(), ctx)
        if not same:
            raise RuntimeError("distributed training: the ranks' weights differ (please report this)")
        say(f"distributed: {ctx.world} processes, weights bit-identical on every rank")
    if not ctx.is_main:
        return {}
    metrics = {"nodes": n, "edges": E, "classes": num_classes, "fanout": fanout, "batch_size": batch_size,
               "world_size": ctx.world, "device": str(dev), "amp": amp, "sampler": sampler_name,
               "ranks_identical": same, "torch": torch.__version__, "history": history}
    path = os.path.join(out_dir, "sampled_metrics.json")
    write_json(path, metrics)  # atomically: Ctrl-C keeps the previous file whole
    say(f"sampler: {sampler_name}; metrics -> {path}")
    return metrics


# ------------------------------------------------------------------- command

def _fanout(text: str) -> List[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 10,10, got {text!r}") from None
    if not 1 <= len(ks) <= 8 or not all(1 <= k <= 10_000 for k in ks):
        raise argparse.ArgumentTypeError(f"expected 1 to 8 integers from 1 to 10000 (one per layer), got {text!r}")
    return ks


def _device(text: str) -> str:
    try:
        _check_device(text)
    except SampledError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--device ", "")) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sampled_gat", description=__doc__, formatter_class=Formatter)
    p.add_argument("--data", help="a torch.save'd dict with x, edge_index, y (default: a synthetic graph)")
    p.add_argument("--nodes", type=int_in(2, 100_000_000), default=100_000,
                   help="synthetic graph: nodes, 2 to 100000000")
    p.add_argument("--edges", type=int_in(1, 1_000_000_000), default=1_000_000,
                   help="synthetic graph: edges, 1 to 1000000000")
    p.add_argument("--features", type=int_in(1, 4096), default=64, help="synthetic graph: input features, 1 to 4096")
    p.add_argument("--classes", type=int_in(1, MAX_CLASSES), default=8,
                   help=f"synthetic graph: classes, 1 to {MAX_CLASSES}")
    p.add_argument("--epochs", type=int_in(1, 100_000), default=3, help="1 to 100000")
    p.add_argument("--batch-size", type=int_in(1, 10_000_000), default=512, help="seed nodes per step (per rank), 1 to 10000000")
    p.add_argument("--fanout", type=_fanout, default="10,10",
                   help="neighbours sampled per layer, e.g. 15,10,5 (1 to 8 layers, each 1 to 10000)")
    p.add_argument("--hidden", type=int_in(1, 4096), default=32, help="hidden features per head, 1 to 4096")
    p.add_argument("--heads", type=int_in(1, 64), default=4, help="attention heads, 1 to 64")
    p.add_argument("--lr", type=positive_float(MAX_LR), default=5e-3,
                   help=f"Adam's learning rate, above 0 and at most {MAX_LR:g}")
    p.add_argument("--device", type=_device, default="cpu",
                   help="cpu, cuda or cuda:N (under torchrun: one GPU per rank)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="train under torch.autocast")
    p.add_argument("--max-steps", type=int_in(1, 10**9), help="at most this many steps per epoch")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help=f"0 to {MAX_SEED}")
    p.add_argument("--out", default="runs/sampled_gat",
                   help="output folder (made if missing) for sampled_metrics.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        problem = out_dir_problem(a.out, "--out")  # before any work
        if problem:
            raise SampledError(problem)
        if a.data:
            if not os.path.isfile(a.data):
                raise SampledError(f"--data: no file {a.data!r}")
            try:  # weights_only: opening a file never runs code from it
                import warnings
                with warnings.catch_warnings():  # torch's note on checking sparse tensors: ours is clearer
                    warnings.simplefilter("ignore", UserWarning)
                    data = torch.load(a.data, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise SampledError(f"--data {a.data!r} is not a torch.save'd dict of tensors "
                                   f"({type(exc).__name__})") from None
            try:  # checked (and converted, said once) here to name the file in errors
                data = _as_graph(data, note=_note if int(os.environ.get("RANK", "0")) == 0 else None)
            except SampledError as exc:
                raise SampledError(f"--data {a.data!r}: {exc}") from None
        else:
            data = synthetic_graph(a.nodes, a.edges, a.features, a.classes, seed=a.seed)
        train_sampled(data, a.out, a.epochs, a.batch_size, a.fanout, a.hidden, a.heads, a.lr, a.device,
                      a.amp, a.seed, a.max_steps, progress=not a.no_progress)
    except SampledError as exc:
        print(f"sampled_gat: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sampled_gat: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, the traceback on request
        return internal_error("sampled_gat", exc)
    return 0


def _note(msg: str) -> None:
    print(f"sampled_gat: {msg}", file=sys.stderr)


