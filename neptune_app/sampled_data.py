"""The checks and safe conversions of a user's graph for sampled training (`--data FILE` or
`train_sampled(data, ...)`): masks, features, labels and edges, one clear line for anything
that cannot be used as given."""
from typing import Optional

import torch


class SampledError(ValueError):
    """A bad argument or input file (reported as one line by the command)."""


MAX_CLASSES = 10_000  # class ids (labels) below this: the output layer is sized by them


def _as_graph(data, note=None) -> dict:
    """x, edge_index, y, train_mask, val_mask from a dict or a PyG Data, checked; what is
    converted (x's dtype, masks given as node ids) is told to ``note`` in one line each."""
    note = note or (lambda msg: None)
    if isinstance(data, dict):
        get = data.get
    elif hasattr(data, "x") and hasattr(data, "edge_index"):
        get = lambda k, d=None: getattr(data, k, d)  # noqa: E731
    else:
        raise SampledError(f"the graph must be a dict (or PyG Data) with x, edge_index and y, "
                           f"got {type(data).__name__}")
    x, ei, y = get("x"), get("edge_index"), get("y")
    for name, t in (("x", x), ("edge_index", ei), ("y", y), ("train_mask", get("train_mask")),
                    ("val_mask", get("val_mask"))):
        if t is None and name.endswith("_mask"):
            continue
        if not isinstance(t, torch.Tensor):
            raise SampledError(f"the graph needs a tensor '{name}', got {type(t).__name__}")
        if t.layout != torch.strided:
            raise SampledError(f"{name} is a sparse tensor ({t.layout}): pass a dense one "
                               f"({name}.to_dense())")
    if x.dim() != 2 or not x.is_floating_point():
        raise SampledError(f"x must be a float [N, F] tensor, got {x.dtype} {list(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise SampledError(f"the graph has no nodes (x is {list(x.shape)})")
    if x.shape[1] == 0:
        raise SampledError(f"x has no feature columns (x is {list(x.shape)})")
    if x.dtype != torch.float32:
        x32 = x.float()
        if not bool(torch.isfinite(x32).all()):
            why = "NaN or inf" if not bool(torch.isfinite(x).all()) else "values beyond float32's range"
            raise SampledError(f"x ({x.dtype}) holds {why}")
        note(f"x is {str(x.dtype).replace('torch.', '')}: converted to float32 (the model's dtype; "
             "use --amp for low precision)")
        x = x32
    elif not bool(torch.isfinite(x).all()):
        raise SampledError("x holds NaN or inf")
    if ei.dim() != 2 or ei.shape[0] != 2 or ei.is_floating_point() or ei.is_complex() or ei.dtype == torch.bool:
        raise SampledError(f"edge_index must be an integer [2, E] tensor of node ids, got {ei.dtype} "
                           f"{list(ei.shape)}")
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        raise SampledError(f"edge_index has node ids outside [0, {n}) (x has {n} rows)")
    y = y.reshape(-1)
    if y.shape[0] != n or y.is_floating_point() or y.is_complex():
        raise SampledError(f"y must be an integer [N] = [{n}] tensor of class ids, got {y.dtype} {list(y.shape)}")
    y = y.long()
    train = _mask(get("train_mask"), "train_mask", n, note)
    val = _mask(get("val_mask"), "val_mask", n, note)
    if train is None:
        gen = torch.Generator().manual_seed(0)
        split = torch.rand(n, generator=gen)
        train, val = split < 0.6, (split >= 0.8 if val is None else val)
    if val is None:
        val = ~train
    if not bool(train.any()):
        raise SampledError(f"train_mask selects no nodes of the {n}: nothing to train on")
    labelled = train | val
    bad = labelled & (y < 0)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise SampledError(f"y has {int(bad.sum())} negative class ids on training/validation nodes "
                           f"(node {first}: {int(y[first])}); class ids must be >= 0 (keep unlabelled "
                           "nodes out of train_mask and val_mask)")
    top = int(y[labelled].max()) if bool(labelled.any()) else 0
    if top >= MAX_CLASSES:
        raise SampledError(f"y has class id {top}: class ids must be below {MAX_CLASSES}")
    return {"x": x, "edge_index": ei.long(), "y": y, "train_mask": train, "val_mask": val}


def _mask(t: Optional[torch.Tensor], name: str, n: int, note) -> Optional[torch.Tensor]:
    """A bool [n] mask from ``t``: a bool mask as it is, a uint8 0/1 mask (PyG's old form) or
    integer node ids (index-style, as some PyG data sets store splits) converted and said."""
    if t is None:
        return None
    if t.dim() != 1:
        hint = (f" (one column per split? pick one, e.g. {name}[:, 0])"
                if t.dim() == 2 and t.shape[0] == n else "")
        raise SampledError(f"{name} must be 1-D (a bool mask of {n} nodes, or node ids), got shape "
                           f"{list(t.shape)}{hint}")
    if t.is_floating_point() or t.is_complex():
        raise SampledError(f"{name} must be a bool mask or integer node ids, got {t.dtype} "
                           f"(a 0/1 float mask? pass {name}.bool())")
    if t.dtype in (torch.bool, torch.uint8):
        if t.numel() != n:
            raise SampledError(f"{name} is a mask of {t.numel()} entries; the graph has {n} nodes")
        if t.dtype == torch.uint8:
            if bool((t > 1).any()):
                raise SampledError(f"{name} is uint8 with values other than 0 and 1: pass a bool mask "
                                   f"or int64 node ids")
            note(f"{name} is a uint8 0/1 mask: read as a bool mask")
        return t.bool()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise SampledError(f"{name} holds node ids outside [0, {n}) (an integer {name} is read as "
                           f"node ids; a mask must be bool)")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[t.long()] = True
    note(f"{name} holds {t.numel()} node ids ({str(t.dtype).replace('torch.', '')}): "
         f"converted to a mask of {int(mask.sum())} nodes")
    return mask


# ------------------------------------------------------------------ sampling
