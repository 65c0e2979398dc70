"""Training, evaluation and prediction behind the `neptune` command."""
import copy
import math
import os
import sys
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from neptune_ext import __version__, backend

from . import distributed
from .options import MAX_IMAGE_SIZE, MAX_LR, MAX_SEED, MAX_WORKERS
from ._io import save_torch, write_json
from ._util import git_commit, one_line
from .metrics import confusion_matrix, evaluate, per_class_metrics, save_plots
from .checkpoint import (_check_same_setup, _config_vs_weights, _is_int, _is_number, _load_weights,
                         _read_checkpoint, check_checkpoint, model_config)
from .data import DatasetError, ImageData, load, normalize, read_drawn_digit, read_image

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

DEFAULT_EPOCHS = {"digits": 30, "mnist": 8, "cifar10": 30, "folder": 30}
# What a run is started with when not given (train()'s None); a resumed run keeps its own.
RUN_DEFAULTS = {"seed": 0, "batch_size": 64, "lr": 3e-3, "limit": None, "amp": None, "workers": 0}
_RUN_FLAGS = {"seed": "--seed", "batch_size": "--batch-size", "lr": "--lr", "limit": "--limit",
              "amp": "--amp", "workers": "--workers"}


def _same_setting(key, a, b) -> bool:
    """Whether two values of a run setting make the same run (--workers: any N >= 1 gives
    the same run, 0 another: batches then draw their augmentation from the epoch's generator)."""
    try:
        if key == "workers":
            return (a > 0) == (b > 0)
        return bool(a == b)
    except TypeError:  # a checkpoint's odd value: another run (its checks report it)
        return False


# ------------------------------------------------------------------- models
def build_model(name: str, num_classes: int, in_channels: int, image_size: int,
                config: Optional[dict] = None) -> torch.nn.Module:
    from .models import Neptune, resnet18_fused
    if name == "neptune":
        cfg = dict(config or {})
        cfg.update(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        return Neptune(**cfg)
    if name == "resnet18":
        return resnet18_fused(num_classes=num_classes, in_channels=in_channels)
    raise ValueError(f"unknown model {name!r} (neptune or resnet18)")


def kernel_backend(device: torch.device) -> str:
    if backend.kernels_run(device.type):
        return f"neptune_ext compiled kernels ({device.type})"
    return "pure-PyTorch reference (compiled kernels not available)"


# -------------------------------------------------------------- augmentation
def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate every image by its own random integer offset in [-max_shift, max_shift]
    (zero padding), as one batched gather."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    ys = (torch.arange(H).view(1, H) + dy.view(B, 1)).view(B, 1, H, 1).expand(B, C, H, W)
    xs = (torch.arange(W).view(1, W) + dx.view(B, 1)).view(B, 1, 1, W).expand(B, C, H, W)
    b = torch.arange(B).view(B, 1, 1, 1)
    c = torch.arange(C).view(1, C, 1, 1)
    return pad[b, c, ys, xs]


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0,
                  scale: float = 0.1, shift: float = 1.0) -> torch.Tensor:
    """Small random rotation, scaling and translation (in pixels) per image, one batched
    grid_sample (bilinear, zero padding)."""
    B, _, H, W = x.shape
    ang = (torch.rand(B, generator=generator) * 2 - 1) * degrees * math.pi / 180
    sc = 1 + (torch.rand(B, generator=generator) * 2 - 1) * scale
    tx = (torch.rand(B, generator=generator) * 2 - 1) * shift * 2 / W
    ty = (torch.rand(B, generator=generator) * 2 - 1) * shift * 2 / H
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers,
    used for evaluation and the saved model (steadier than the last step's weights).

    Warmed up: update n uses the decay min(decay, (1 + n) / (10 + n)), so the average
    follows the live weights closely at first instead of dragging the random
    initialization along for the first hundred steps of a short run."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.98):
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        d = self.current_decay()
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)
        self.updates += 1


# ---------------------------------------------------------------- metrics
def data_meta(train: ImageData, dataset: str, data_dir: Optional[str] = None) -> dict:
    return {"dataset": dataset, "classes": train.classes, "channels": train.channels,
            "image_size": list(train.image_size), "scale": train.scale, "mean": train.mean,
            "std": train.std, "dark_background": dataset in ("digits", "mnist"),
            "data_dir": os.path.abspath(data_dir) if data_dir else None}


def _progress(iterable, **kw):
    if tqdm is None:
        return iterable
    return tqdm(iterable, mininterval=0.5, dynamic_ncols=True, **kw)


def progress_wanted(requested: bool = True) -> bool:
    """Progress bars only on a terminal: in a log file they are escape codes."""
    return requested and tqdm is not None and sys.stderr.isatty()


def _augment(x: torch.Tensor, y: torch.Tensor, dataset: str, max_shift: int,
             generator: torch.Generator):
    """The training augmentation of one batch: small affine maps for digits, shifts (and
    flips for CIFAR-10) otherwise."""
    x = random_affine(x, generator, shift=max_shift) if dataset in ("digits", "mnist") \
        else random_shift(x, max_shift, generator)
    if dataset == "cifar10":
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x, y


class _EpochBatches(torch.utils.data.Dataset):
    """One epoch's batches for ``--workers N``: batch b is read and augmented in a worker
    process with a generator seeded from (seed, epoch, rank, b), so a run gives the same
    numbers for any N >= 1."""

    def __init__(self, data, order, batch_size, steps, dataset, max_shift, key):
        self.data, self.order, self.batch_size, self.steps = data, order, batch_size, steps
        self.dataset, self.max_shift, self.key = dataset, max_shift, key

    def __len__(self):
        return self.steps

    def __getitem__(self, b):
        seed, epoch, rank = self.key
        g = torch.Generator().manual_seed(
            (((seed * 1_000_003 + epoch) * 1_009 + rank) * 1_000_033 + b) % (2**63 - 1))
        idx = self.order[b * self.batch_size:(b + 1) * self.batch_size]
        return _augment(*self.data.batch(idx), self.dataset, self.max_shift, g)


def _one_thread(_worker_id):
    torch.set_num_threads(1)


def train(dataset: str, out_dir: str, model_name: str = "neptune", epochs: Optional[int] = None,
          device: str = "cpu", seed: Optional[int] = None, resume: bool = False,
          data_dir: Optional[str] = None, batch_size: Optional[int] = None,
          lr: Optional[float] = None, limit: Optional[int] = None,
          image_size: Optional[int] = None, progress: bool = True, quiet: bool = False,
          amp: Optional[str] = None, workers: Optional[int] = None) -> dict:
    """Train ``model_name`` on ``dataset``, writing OUT/checkpoint.pt after every epoch and
    metrics.json and the plots at the end (each file atomically: an interrupted run keeps its
    last complete epoch, and ``resume=True`` continues from it: the same run, to the bit, as
    one never interrupted, on the CPU; on CUDA as far as its kernels are deterministic).
    ``seed``, ``batch_size``, ``lr``, ``limit``, ``amp`` and ``workers`` left at None are
    RUN_DEFAULTS' for a new run and the run's own when resuming (a value that makes another
    run is an error: it would not continue that one). The bounds are the `neptune train`
    command's (see its --help)."""
    ck = None
    if resume:  # the checkpoint is read and checked before any work
        ck, epochs = _resume_checkpoint(os.path.join(out_dir, "checkpoint.pt"), model_name, dataset, epochs)
        if image_size is None and dataset == "folder":  # the size the run was started with
            image_size = ck["data"]["image_size"][0]
    given = {"seed": seed, "batch_size": batch_size, "lr": lr, "limit": limit, "amp": amp,
             "workers": workers}
    run = _resolve_run(given, ck, os.path.join(out_dir, "checkpoint.pt"))
    seed, batch_size, lr, limit, amp, workers = (
        run[k] for k in ("seed", "batch_size", "lr", "limit", "amp", "workers"))
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DatasetError("--device cuda was requested but no CUDA GPU is available")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("limit", limit),
                    ("image_size", image_size)):
        if v is not None and not (_is_int(v) and v > 0):
            raise DatasetError(f"{name} must be a positive integer, got {v!r}")
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        raise DatasetError(f"image_size must be at most {MAX_IMAGE_SIZE}, got {image_size}")
    if image_size is not None and dataset != "folder":
        raise DatasetError(f"--image-size applies to --dataset folder only ({dataset} images keep their "
                           "own size)")
    if not (_is_number(lr) and 0 < lr <= MAX_LR):
        raise DatasetError(f"lr must be a positive finite number at most {MAX_LR:g}, got {lr!r}")
    if not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise DatasetError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    if not (_is_int(workers) and 0 <= workers <= MAX_WORKERS):
        raise DatasetError(f"workers must be an integer from 0 to {MAX_WORKERS}, got {workers!r}")
    if amp not in (None, "bf16", "fp16"):
        raise DatasetError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise DatasetError("--amp fp16 needs --device cuda (on the CPU use --amp bf16)")
    ctx = distributed.init(device)
    ok = False
    try:
        result = _train(ctx, dataset, out_dir, model_name, epochs, seed, ck, data_dir, batch_size, lr,
                        limit, image_size, progress_wanted(progress) and ctx.is_main and not quiet, quiet,
                        amp, workers)
        ok = True
        return result
    finally:
        distributed.shutdown(ctx, ok)


def _resolve_run(given: dict, ck: Optional[dict], path: str) -> dict:
    """The run's settings: each one given, else (resuming a checkpoint that records them)
    the run's own, else RUN_DEFAULTS'. Resuming with a value that differs from the run's is a
    DatasetError naming each (a resumed run is the same run)."""
    saved = ck.get("run") if isinstance(ck, dict) else None
    if not isinstance(saved, dict):  # a new run, or a checkpoint from before runs were recorded
        return {k: RUN_DEFAULTS[k] if v is None else v for k, v in given.items()}
    differ = [k for k, v in given.items()
              if v is not None and k in saved and not _same_setting(k, v, saved[k])]
    if differ:
        def flag(k, v):
            return f"{_RUN_FLAGS[k]} {v if v is not None else '(none)'}"
        raise DatasetError(
            f"--resume: {path} was started with {', '.join(flag(k, saved[k]) for k in differ)}; "
            f"{', '.join(flag(k, given[k]) for k in differ)} would not continue that run (leave "
            f"{'it' if len(differ) == 1 else 'them'} out to continue with the run's own, or start a "
            "new run with --force)")
    return {k: (saved.get(k, RUN_DEFAULTS[k]) if v is None else v) for k, v in given.items()}


def _resume_checkpoint(path: str, model_name: str, dataset: str, epochs: Optional[int]):
    """--resume: (the checkpoint at ``path``, checked; the epochs to train to). Without
    ``epochs`` the run continues to the total it was started with; fewer epochs than the
    checkpoint holds is an error (training nothing and rewriting the record as a shorter run
    would lose it); as many trains nothing and writes the metrics and plots again."""
    if not os.path.exists(path):
        raise DatasetError(f"--resume: no checkpoint at {path}")
    ck = _read_checkpoint(path, "cpu", "--resume: ")
    check_checkpoint(ck, path, training=True, prefix="--resume: ")
    if ck["model_name"] != model_name or ck["data"]["dataset"] != dataset:
        raise DatasetError(f"--resume: {path} is a {ck['model_name']} on {ck['data']['dataset']}, "
                           f"not {model_name} on {dataset}")
    done = ck["epoch"]
    if epochs is None:
        epochs = max(ck["epochs"], done)
    elif epochs < done:
        raise DatasetError(f"--resume: {path} already holds {done} epoch{'s' if done != 1 else ''}; "
                           f"--epochs {epochs} would train nothing and cut the run's record to "
                           f"{epochs} (pass --epochs {done} or more, or leave it out to continue to "
                           f"{max(ck['epochs'], done)})")
    return ck, epochs


def _train(ctx, dataset, out_dir, model_name, epochs, seed, ck, data_dir, batch_size, lr, limit,
           image_size, progress, quiet=False, amp=None, workers=0) -> dict:
    dev = ctx.device
    say = print if ctx.is_main and not quiet else (lambda *a, **k: None)
    torch.manual_seed(seed)
    train_data, test_data = load(dataset, data_dir, image_size)
    if limit is not None:
        train_data, test_data = train_data.subset(limit), test_data.subset(max(limit // 4, 1))
    epochs = DEFAULT_EPOCHS[dataset] if epochs is None else epochs
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    meta = data_meta(train_data, dataset, data_dir)
    k = len(train_data.classes)
    model = build_model(model_name, k, train_data.channels, train_data.image_size[0]).to(dev)
    net = model
    if ctx.enabled:  # gradients averaged over the ranks; each rank sees its shard of an epoch
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(distributed.shard_len(len(train_data), ctx) / batch_size)
    total = epochs * steps_per_epoch
    warm = min(steps_per_epoch * 2, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    history, start_epoch, seconds = [], 0, 0.0
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    gen = torch.Generator().manual_seed(seed)
    ema = EMA(model)
    eval_model = copy.deepcopy(model)
    if ck is not None:
        try:
            _check_same_setup(ck, model, meta, ckpt_path)
            _load_weights(model, ck["model"], ckpt_path)
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            history, start_epoch, seconds = list(ck["history"]), ck["epoch"], float(ck["seconds"])
            gen.set_state(ck["generator"])
            if isinstance(ck.get("torch_rng"), torch.Tensor):  # attention dropout's seeds
                torch.set_rng_state(ck["torch_rng"])
            else:
                say(f"{ckpt_path} predates saved random states: the resumed run continues, but "
                    "not to the bit as an uninterrupted one")
            if scaler is not None and isinstance(ck.get("scaler"), dict):  # fp16 loss scaling
                scaler.load_state_dict(ck["scaler"])
            _load_weights(model, ck["train_model"], ckpt_path)
            ema.state = {k: v.to(dev).clone() for k, v in ck["model"].items()}
            ema.updates = int(ck.get("ema_updates", 10**6))  # older checkpoints: fully warm
        except DatasetError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise DatasetError(f"--resume: {ckpt_path!r} is not a neptune checkpoint "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        if start_epoch >= epochs:
            say(f"{ckpt_path} holds all {epochs} epoch{'s' if epochs != 1 else ''}: evaluating it and "
                "writing its metrics and plots again")
        else:
            say(f"resuming from epoch {start_epoch} ({ckpt_path})")
    say(f"training {model_name} on {dataset}: {len(train_data)} train / {len(test_data)} test images, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {epochs} epochs, {dev}, "
        f"{kernel_backend(dev)}" + (f", {ctx.world} processes ({batch_size} images each per step)"
                                    if ctx.enabled else "") + (f", autocast {amp}" if amp else ""))
    max_shift = 1 if train_data.image_size[0] <= 16 else 2
    epoch_bar = _progress(range(start_epoch, epochs), desc="epochs", initial=start_epoch, total=epochs,
                          disable=not progress) if progress else range(start_epoch, epochs)
    for epoch in epoch_bar:
        t0 = time.perf_counter()
        model.train()
        perm = distributed.shard(torch.randperm(len(train_data), generator=gen), ctx)
        tot_loss, tot_correct, seen = 0.0, 0, 0
        if workers:
            batches = torch.utils.data.DataLoader(
                _EpochBatches(train_data, perm, batch_size, steps_per_epoch, dataset, max_shift,
                              (seed, epoch, ctx.rank)),
                batch_size=None, num_workers=workers, worker_init_fn=_one_thread)
        else:
            batches = (_augment(*train_data.batch(perm[b * batch_size:(b + 1) * batch_size]), dataset,
                                max_shift, gen) for b in range(steps_per_epoch))
        bar = _progress(batches, desc=f"epoch {epoch + 1}", leave=False, total=steps_per_epoch) \
            if progress else batches
        for x, y in bar:
            x, y = x.to(dev), y.to(dev)
            with torch.autocast(dev.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            distributed.broadcast_buffers(model, ctx)
            ema.update(model)
            tot_loss += loss.item() * y.numel()
            tot_correct += (logits.argmax(1) == y).sum().item()
            seen += y.numel()
            if progress and tqdm is not None:
                bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{tot_correct / seen:.3f}")
        tot_loss, tot_correct, seen = distributed.all_sum([tot_loss, tot_correct, seen], ctx)
        eval_model.load_state_dict(ema.state)
        ev = evaluate(eval_model, test_data, dev)
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": tot_loss / seen, "train_accuracy": tot_correct / seen,
                        "test_loss": ev["loss"], "test_accuracy": ev["accuracy"], "seconds": seconds})
        msg = (f"epoch {epoch + 1}/{epochs}: train loss {tot_loss / seen:.3f} acc {tot_correct / seen:.4f} | "
               f"test (EMA weights) loss {ev['loss']:.3f} acc {ev['accuracy']:.4f} | {seconds:.1f} s")
        if progress and tqdm is not None:
            epoch_bar.set_postfix(test_acc=f"{ev['accuracy']:.4f}")
            tqdm.write(msg)
        else:
            say(msg)
        if ctx.is_main:  # rank 0 alone writes (atomically: Ctrl-C keeps the previous epoch's)
            save_torch({"model_name": model_name, "model_config": model_config(model), "model": ema.state,
                        "train_model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "epoch": epoch + 1, "epochs": epochs, "history": history, "seconds": seconds,
                        "data": meta, "generator": gen.get_state(), "ema_updates": ema.updates,
                        "torch_rng": torch.get_rng_state(),
                        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                        "run": {"seed": seed, "batch_size": batch_size, "lr": lr, "limit": limit,
                                "amp": amp, "workers": workers}},
                       ckpt_path)
        distributed.barrier(ctx)
    if ctx.enabled:
        same = distributed.same_everywhere({**{"model." + k: v for k, v in model.state_dict().items()},
                                            **{"ema." + k: v for k, v in ema.state.items()}}, ctx)
        if not same:
            raise RuntimeError("distributed training: the ranks' weights differ (please report this)")
        say(f"distributed: {ctx.world} processes, weights and EMA bit-identical on every rank")
    eval_model.load_state_dict(ema.state)
    run = {"seed": seed, "lr": lr, "batch_size": batch_size, "epochs": epochs, "limit": limit, "amp": amp,
           "workers": workers,
           "image_size": list(train_data.image_size), "data_dir": meta["data_dir"]}
    if not ctx.is_main:
        return {}
    return finish(eval_model, model_name, test_data, meta, history, seconds, epochs, dev, out_dir, run)


def finish(model, model_name, test_data, meta, history, seconds, epochs, dev, out_dir,
           run: Optional[dict] = None) -> dict:
    ev = evaluate(model, test_data, dev)
    k = len(test_data.classes)
    cm = confusion_matrix(ev["pred"], test_data.labels, k)
    metrics = {
        "model": model_name, "dataset": meta["dataset"], "test_accuracy": ev["accuracy"],
        "test_loss": ev["loss"], "per_class": per_class_metrics(cm, test_data.classes),
        "confusion_matrix": cm.tolist(), "epochs": epochs, "seconds": round(seconds, 2),
        "device": str(dev), "kernel_backend": kernel_backend(dev), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "neptune_ext": __version__, "commit": git_commit(),
        "run": run or {}, "history": history,
    }
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    plots = save_plots(out_dir, history, cm, test_data.classes)
    print(f"test accuracy {ev['accuracy']:.4f} after {epochs} epoch{'s' if epochs != 1 else ''} in {seconds:.1f} s "
          f"-> {os.path.join(out_dir, 'metrics.json')}" + (f", {', '.join(os.path.basename(p) for p in plots)}"
                                                              if plots else ""))
    return metrics


def load_checkpoint(path: str, device="cpu"):
    if not os.path.exists(path):
        raise DatasetError(f"checkpoint {path!r} does not exist")
    ck = _read_checkpoint(path, device)
    check_checkpoint(ck, path)
    meta = ck["data"]
    if ck["model_name"] == "neptune":
        diff = _config_vs_weights(ck.get("model_config") or {}, ck["model"])
        if diff:
            raise DatasetError(f"{path!r} holds weights of another model configuration ({diff})")
    try:
        model = build_model(ck["model_name"], len(meta["classes"]), meta["channels"], meta["image_size"][0],
                            ck.get("model_config") if ck["model_name"] == "neptune" else None)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise DatasetError(f"{path!r} is not a neptune checkpoint (model_config: {type(exc).__name__}: "
                           f"{one_line(exc)})")
    _load_weights(model, ck["model"], path)
    return model.to(device).eval(), ck


def evaluate_checkpoint(path: str, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                        device: str = "cpu") -> dict:
    dev = torch.device(device)
    model, ck = load_checkpoint(path, dev)
    meta = ck["data"]
    if dataset is None:  # the checkpoint's own data, from where it was read
        dataset = meta["dataset"]
        data_dir = data_dir or meta.get("data_dir")
    _, test = load(dataset, data_dir, meta["image_size"][0])
    if test.channels != meta["channels"] or list(test.image_size) != list(meta["image_size"]):
        raise DatasetError(f"{dataset} images are {test.channels}x{test.image_size}, the model expects "
                           f"{meta['channels']}x{tuple(meta['image_size'])}")
    # Labels by class name: the data set's classes must be classes the model knows.
    known = {c: i for i, c in enumerate(meta["classes"])}
    unknown = [c for c in test.classes if c not in known]
    if unknown:
        raise DatasetError(f"{dataset} has classes the model does not know: {', '.join(map(str, unknown[:5]))}"
                           f"{' ...' if len(unknown) > 5 else ''} (model classes: "
                           f"{', '.join(map(str, meta['classes'][:12]))})")
    remap = torch.tensor([known[c] for c in test.classes], dtype=torch.int64)
    test = ImageData(test.images, remap[test.labels], list(meta["classes"]), meta["scale"], meta["mean"],
                     meta["std"])
    ev = evaluate(model, test, dev)
    cm = confusion_matrix(ev["pred"], test.labels, len(meta["classes"]))
    return {"dataset": dataset, "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
            "per_class": per_class_metrics(cm, meta["classes"]), "images": len(test)}


@torch.no_grad()
def predict(paths: List[str], checkpoint: str, device: str = "cpu", topk: int = 1,
            preprocess: bool = True) -> List[dict]:
    """Classify image files. Each result: image, class (None when the image looks empty),
    probability, topk [(class, probability), ...] and, when empty, the reason.

    For models trained on digits (light strokes on dark, cropped to the ink) an image is
    first made to look like one (:func:`neptune_app.data.read_drawn_digit`); other models
    see the whole image resized. ``preprocess=False`` resizes the whole image always."""
    dev = torch.device(device)
    model, ck = load_checkpoint(checkpoint, dev)
    meta = ck["data"]
    size = tuple(meta["image_size"])
    k = max(1, min(int(topk), len(meta["classes"])))
    out = []
    for p in paths:
        digit_like = meta.get("dark_background") and meta["channels"] == 1
        if digit_like and preprocess:
            img, empty = read_drawn_digit(p, size)
            if img is None:
                out.append({"image": p, "class": None, "probability": None, "topk": [],
                            "empty": empty})
                continue
            img = img.float()
        else:
            img = read_image(p, meta["channels"], size).float()
            if meta.get("dark_background"):
                # Trained on light strokes over a dark background: invert photos/scans
                # of dark ink on paper (judged by the border pixels).
                border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)
                if border.mean() > 127:
                    img = 255 - img
        img = img * (meta["scale"] / 255.0)
        x = normalize(img.unsqueeze(0), meta["scale"], meta["mean"], meta["std"]).to(dev)
        prob = model(x).softmax(-1)[0].cpu()
        vals, idx = prob.topk(k)
        top = [(meta["classes"][int(i)], float(v)) for v, i in zip(vals, idx)]
        out.append({"image": p, "class": top[0][0], "probability": top[0][1], "topk": top})
    return out
