"""The `neptune` command's arguments, parsed without importing torch.

:func:`neptune_app.cli.main` (the `neptune` script) parses with :func:`build_parser` first, so
`--help`, `--version` and bad arguments are answered at once (importing torch takes about
1.5 s); the work itself is done by :func:`neptune_app.cli.run`. This module imports nothing
from the application or the library.
"""
import argparse
import math

# The data sets `neptune train --dataset` accepts (neptune_app.data.DATASETS; a test keeps
# the two equal).
DATASETS = ("digits", "mnist", "cifar10", "folder")

# Bounds of `neptune train`'s arguments (stated in --help; neptune_app.train and the
# checkpoint reader apply the same ones).
MAX_IMAGE_SIZE = 512      # --image-size: a folder's images are held in memory at this size
MAX_WORKERS = 32          # --workers: loader processes (any N >= 1 gives the same run)
MAX_LR = 1.0              # --lr: AdamW's peak learning rate
MAX_SEED = 2**32 - 1      # --seed: 0 .. 2**32-1 (numpy's range)

USAGE = """The neptune command: train, eval, predict, bench, info.

    neptune train --dataset digits --out runs/digits
    neptune eval --checkpoint runs/digits/checkpoint.pt
    neptune predict my_digit.png --checkpoint runs/digits/checkpoint.pt
    neptune bench --quick
    neptune info
"""


def _version() -> str:
    """The library's version, read without importing it (importing it loads torch)."""
    import importlib.util
    import os
    import re
    try:
        spec = importlib.util.find_spec("neptune_ext")  # finds the package, runs none of it
        here = os.path.join(os.path.dirname(spec.origin), "_version.py")
        with open(here) as f:
            return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
    except (OSError, AttributeError, TypeError, ImportError, ValueError):
        from importlib.metadata import version
        return version("neptune_ext")


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


_Parser = OneLineParser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def int_in(lo: int, hi: int):
    """An argparse type: an integer from lo to hi (both included)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {v}")
        return v
    return parse


def positive_float(hi: float = math.inf):
    """An argparse type: a finite number > 0 (and <= hi)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not (math.isfinite(v) and 0 < v <= hi):
            most = f" at most {hi:g}" if math.isfinite(hi) else ""
            raise argparse.ArgumentTypeError(f"expected a positive finite number{most}, got {text}")
        return v
    return parse


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the descriptions' line breaks and shows every default that means something."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


_Formatter = Formatter


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="neptune", description=USAGE, formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"neptune_ext {_version()}")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="only results and errors (no per-epoch lines or progress bars)")
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="also show other libraries' deprecation warnings")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", formatter_class=_Formatter, description="Train a model; write checkpoint.pt, metrics.json and plots to --out.",
                           help="train a model and write checkpoint, metrics and plots")
    t.add_argument("--dataset", default="digits", choices=DATASETS, help="the data set")
    t.add_argument("--data-dir", help="local folder with mnist/cifar10/folder data (never downloaded)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--model", default="neptune", choices=["neptune", "resnet18"], help="the model")
    t.add_argument("--epochs", type=_positive_int,
                   help="default: 30 for digits, 8 mnist, 30 cifar10/folder; with --resume, the resumed "
                        "run's own total (fewer epochs than the checkpoint holds is an error)")
    t.add_argument("--batch-size", type=_positive_int,
                   help="images per step (default 64; with --resume, the run's own)")
    t.add_argument("--lr", type=positive_float(MAX_LR),
                   help=f"peak learning rate (AdamW, warm-up then cosine decay), above 0 and at most "
                        f"{MAX_LR:g} (default 0.003; with --resume, the run's own)")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    t.add_argument("--seed", type=int_in(0, MAX_SEED),
                   help=f"seeds the initialization, order and augmentation (0 to {MAX_SEED}; default 0; "
                        "with --resume, the run's own)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.pt (its last complete epoch)")
    again.add_argument("--force", action="store_true",
                       help="train into an --out folder that already holds a run (overwriting it)")
    t.add_argument("--image-size", type=int_in(1, MAX_IMAGE_SIZE),
                   help=f"--dataset folder: resize the images to this size, 1 to {MAX_IMAGE_SIZE} "
                        "(default 32)")
    t.add_argument("--limit", type=_positive_int,
                   help="use only the first N training images (smoke tests; with --resume, the run's own)")
    t.add_argument("--no-progress", action="store_true",
                   help="plain log lines instead of progress bars (the default when not on a terminal)")
    t.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"],
                   help="mixed precision (autocast): bf16 (the default with --amp; CPU or CUDA) or fp16 "
                        "(CUDA, with loss scaling); with --resume, the run's own")
    t.add_argument("--workers", type=int_in(0, MAX_WORKERS),
                   help=f"processes that read and augment batches, 0 to {MAX_WORKERS} (default 0: in "
                        "the training process; any N >= 1 gives the same run, another than 0's; with "
                        "--resume, the run's own)")

    e = sub.add_parser("eval", formatter_class=_Formatter, description="Evaluate a checkpoint on a data set's test split (per-class figures).",
                           help="evaluate a checkpoint on a data set's test split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", choices=DATASETS,
                   help="default: the checkpoint's data set, read from where it was trained")
    e.add_argument("--data-dir")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--json", help="also write the figures to this file")

    pr = sub.add_parser("predict", formatter_class=_Formatter, description="Classify image files with a checkpoint.",
                           help="classify image files (PNG, JPEG, ... of any size)")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    pr.add_argument("--topk", type=_positive_int, default=1, help="print the K most likely classes")
    pr.add_argument("--json", help="also write the results to this file")
    pr.add_argument("--no-preprocess", action="store_true",
                    help="resize the whole image (digit models otherwise crop to the ink first)")

    b = sub.add_parser("bench", formatter_class=_Formatter, description="Benchmark against the peers present and print one table.",
                           help="benchmark against the peers present and print one table")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--quick", action="store_true", help="small sizes, few rounds (about a minute)")
    b.add_argument("--json", help="write the figures to this file")
    b.add_argument("--plot", help="draw graph-attention time and memory vs edge count to this image "
                   "(its format from the extension: .png, .svg, .pdf, ...)")

    i = sub.add_parser("info", formatter_class=_Formatter, help="version, torch, compiled backends, threads",
                       description="What was built and what will run (and why kernels are missing).")
    i.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p
