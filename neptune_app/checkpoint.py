"""Reading and checking the `neptune` command's checkpoints: a file a user names is loaded
with torch.load(weights_only=True) and every field is checked (types, ranges, the model
configuration against the saved weights) before any work, so a crafted or foreign file is
"not a neptune checkpoint", never an internal error."""
import math
from typing import Optional

import torch

from .options import MAX_IMAGE_SIZE

from ._util import one_line
from .data import DatasetError


def model_config(model) -> dict:
    """The configuration a model records in its checkpoint."""
    return dict(getattr(model, "config", {}))

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    text = repr(v) if not isinstance(v, torch.Tensor) else f"a tensor of shape {list(v.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


# Neptune's constructor arguments a checkpoint's model_config may hold: (kind, lowest, highest).
# Generous bounds; they keep a crafted file from building a model larger than any it could hold.
_NEPTUNE_CONFIG = {"num_classes": ("int", 1, 100_000), "in_channels": ("int", 1, 3),
                   "image_size": ("int", 1, MAX_IMAGE_SIZE), "width": ("int", 1, 4096),
                   "stem_channels": ("ints", 1, 4096), "blocks": ("int", 0, 256), "heads": ("int", 1, 256),
                   "k": ("int", 1, 1024), "max_grid": ("int", 1, 64),
                   "mlp_ratio": ("int", 1, 64), "attn_dropout": ("prob", 0, 1), "dropout": ("prob", 0, 1)}


def _checkpoint_problem(ck: dict, training: bool) -> Optional[str]:
    """What makes ``ck`` not a checkpoint `neptune train` wrote (None when nothing): every
    field the commands read, with its type and range."""
    name = ck.get("model_name")
    if not (isinstance(name, str) and name in ("neptune", "resnet18")):
        return f"model_name must be 'neptune' or 'resnet18', got {_short(name)}"
    data = ck.get("data")
    if not isinstance(data, dict):
        return f"data must be a dict, got {type(data).__name__}"
    from .data import DATASETS
    if not (isinstance(data.get("dataset"), str) and data["dataset"] in DATASETS):
        return f"data.dataset must be one of {', '.join(DATASETS)}, got {_short(data.get('dataset'))}"
    classes = data.get("classes")
    if not (isinstance(classes, (list, tuple)) and 1 <= len(classes) <= 100_000
            and all(isinstance(c, str) for c in classes) and len(set(classes)) == len(classes)):
        return f"data.classes must be a list of distinct class names, got {_short(classes)}"
    channels = data.get("channels")
    if not (_is_int(channels) and channels in (1, 3)):
        return f"data.channels must be 1 or 3, got {_short(channels)}"
    size = data.get("image_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) for v in size)
            and size[0] == size[1] and 1 <= size[0] <= MAX_IMAGE_SIZE):
        return f"data.image_size must be [S, S] with 1 <= S <= {MAX_IMAGE_SIZE}, got {_short(size)}"
    if not (_is_number(data.get("scale")) and data["scale"] > 0):
        return f"data.scale must be a positive number, got {_short(data.get('scale'))}"
    for key in ("mean", "std"):
        v = data.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == channels and all(_is_number(x) for x in v)
                and (key == "mean" or all(x > 0 for x in v))):
            return f"data.{key} must be {channels} {'positive ' if key == 'std' else ''}numbers, got {_short(v)}"
    if not isinstance(data.get("dark_background", False), bool):
        return f"data.dark_background must be true or false, got {_short(data.get('dark_background'))}"
    if not (data.get("data_dir") is None or isinstance(data.get("data_dir"), str)):
        return f"data.data_dir must be a path or None, got {_short(data.get('data_dir'))}"
    cfg = ck.get("model_config")
    if cfg is not None and not isinstance(cfg, dict):
        return f"model_config must be a dict, got {type(cfg).__name__}"
    if name == "neptune":
        for k, v in (cfg or {}).items():
            if k not in _NEPTUNE_CONFIG:
                return f"model_config has an unknown field {_short(k)}"
            kind, lo, hi = _NEPTUNE_CONFIG[k]
            ok = (_is_int(v) and lo <= v <= hi if kind == "int" else
                  _is_number(v) and lo <= v < hi if kind == "prob" else
                  isinstance(v, (list, tuple)) and len(v) <= 16 and all(_is_int(c) and lo <= c <= hi for c in v))
            if not ok:
                return f"model_config.{k} must be {'a list of ' if kind == 'ints' else ''}" \
                       f"{'numbers in [0, 1)' if kind == 'prob' else f'integers from {lo} to {hi}'}, got {_short(v)}"
    keys = ("model", "train_model") if training else ("model",)
    for key in keys:
        state = ck.get(key)
        if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in state.items())):
            return f"{key} must be a dict of named tensors, got {_short(state)}"
    if not training:
        return None
    for key in ("optimizer", "scheduler"):
        if not isinstance(ck.get(key), dict):
            return f"{key} must be a dict, got {_short(ck.get(key))}"
    epoch, epochs, history = ck.get("epoch"), ck.get("epochs"), ck.get("history")
    if not (_is_int(epoch) and epoch >= 1):
        return f"epoch must be a positive integer, got {_short(epoch)}"
    if not (_is_int(epochs) and epochs >= 1):
        return f"epochs must be a positive integer, got {_short(epochs)}"
    if not (isinstance(history, list) and len(history) == epoch and all(isinstance(h, dict) for h in history)):
        return f"history must be a list of {epoch} per-epoch records, got {_short(history)}"
    if not (_is_number(ck.get("seconds")) and ck["seconds"] >= 0):
        return f"seconds must be a non-negative number, got {_short(ck.get('seconds'))}"
    gen = ck.get("generator")
    if not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8 and gen.dim() == 1):
        return f"generator must be a generator state (a uint8 tensor), got {_short(gen)}"
    if "ema_updates" in ck and not (_is_int(ck["ema_updates"]) and ck["ema_updates"] >= 0):
        return f"ema_updates must be a non-negative integer, got {_short(ck['ema_updates'])}"
    return None


def _config_vs_weights(cfg: dict, state: dict) -> Optional[str]:
    """How a Neptune model_config disagrees with the saved weights' shapes (None when it does
    not): checked before the model is built, so its size is the file's, not the config's."""
    def dim(key, i):
        t = state.get(key)
        return t.shape[i] if isinstance(t, torch.Tensor) and t.dim() > i else None
    width = cfg.get("width", 64)
    blocks = cfg.get("blocks", 3)
    saved_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    checks = [("width", width, dim("norm.weight", 0)), ("blocks", blocks, saved_blocks)]
    if blocks:
        checks.append(("mlp_ratio", width * cfg.get("mlp_ratio", 2), dim("blocks.0.mlp.0.weight", 0)))
    for i, c in enumerate(cfg.get("stem_channels", [32])):
        checks.append((f"stem_channels[{i}]", c, dim(f"stem.{i}.conv.weight", 0)))
    for name, want, saved in checks:
        if want != saved:
            return f"model_config.{name} gives {want}, the saved weights {saved}"
    return None


def check_checkpoint(ck: dict, path: str, training: bool = False, prefix: str = "") -> None:
    """DatasetError "... is not a neptune checkpoint (FIELD ...)" unless ``ck`` has the fields
    of a checkpoint `neptune train` wrote (``training``: also those --resume needs)."""
    problem = _checkpoint_problem(ck, training)
    if problem:
        raise DatasetError(f"{prefix}{path!r} is not a neptune checkpoint ({problem})")


def _read_checkpoint(path: str, device, prefix: str = "") -> dict:
    """torch.load with weights_only=True: a checkpoint holds tensors, numbers, strings,
    lists and dicts only, so opening a file never runs code from it."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise DatasetError(f"{prefix}checkpoint {path!r} does not exist")
    except Exception as exc:  # a crafted pickle, a truncated file, not a torch file at all
        raise DatasetError(f"{prefix}{path!r} is not a neptune checkpoint (it cannot be loaded safely: "
                           f"{one_line(exc)})")
    if not isinstance(ck, dict):
        raise DatasetError(f"{prefix}{path!r} is not a neptune checkpoint")
    return ck


def _check_same_setup(ck: dict, model, meta: dict, path: str) -> None:
    """--resume: the checkpoint was trained with this model configuration and data."""
    saved_cfg, cfg = ck.get("model_config"), model_config(model)
    diffs = []
    if isinstance(saved_cfg, dict) and isinstance(cfg, dict):
        diffs += [f"{k} {saved_cfg.get(k)!r} vs {cfg.get(k)!r}" for k in sorted(set(saved_cfg) | set(cfg))
                  if saved_cfg.get(k) != cfg.get(k)]
    for k in ("classes", "channels", "image_size"):
        if list(_as_list(ck["data"].get(k))) != list(_as_list(meta.get(k))):
            diffs.append(f"{k} {ck['data'].get(k)!r} vs {meta.get(k)!r}")
    if diffs:
        raise DatasetError(f"--resume: {path} was trained with another setup ({'; '.join(diffs[:3])})")


def _as_list(v):
    return v if isinstance(v, (list, tuple)) else [v]


def _load_weights(model, state: dict, path: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # load_state_dict's first line is a header; the details (missing and unexpected
        # keys, size mismatches) follow, one per line: the first three of them
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        details = lines[1:4] + ([f"... and {len(lines) - 4} more"] if len(lines) > 4 else [])
        raise DatasetError(f"{path!r} holds weights of another model configuration: "
                           + ("; ".join(details) if details else (lines[0] if lines else
                                                                   "load_state_dict failed"))) from None


