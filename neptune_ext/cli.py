"""The `neptune` command: train, eval, predict, bench, info.

    neptune train --dataset digits --out runs/digits
    neptune eval --checkpoint runs/digits/checkpoint.pt
    neptune predict my_digit.png --checkpoint runs/digits/checkpoint.pt
    neptune bench --quick
    neptune info
"""
import argparse
import json
import math
import os
import sys

from .data import DATASETS, DatasetError


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return v


def _check_out_dir(path: str) -> None:
    """The output folder exists (or can be made) and is writable: checked before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DatasetError(f"--out {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"--out {path!r} cannot be created: {exc.strerror or exc}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise DatasetError(f"--out {path!r} is not writable")


def _check_out_file(path: str, flag: str) -> None:
    """`path` can be written (checked before any work, so no result is lost at the end)."""
    if os.path.isdir(path):
        raise DatasetError(f"{flag} {path!r} is a folder, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DatasetError(f"{flag} {path!r}: folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DatasetError(f"{flag} {path!r} is not writable")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the descriptions' line breaks and shows every default that means something."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="neptune", description=__doc__, formatter_class=_Formatter)
    from ._version import __version__
    p.add_argument("--version", action="version", version=f"neptune_ext {__version__}")
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
    t.add_argument("--epochs", type=_positive_int, help="default: 30 for digits, 8 mnist, 30 cifar10/folder")
    t.add_argument("--batch-size", type=_positive_int, default=64, help="images per step")
    t.add_argument("--lr", type=_positive_float, default=3e-3,
                   help="peak learning rate (AdamW, warm-up then cosine decay)")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    t.add_argument("--seed", type=int, default=0, help="seeds the initialization, order and augmentation")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--image-size", type=_positive_int, help="resize folder images to this size (default 32)")
    t.add_argument("--limit", type=_positive_int, help="use only the first N training images (smoke tests)")
    t.add_argument("--no-progress", action="store_true",
                   help="plain log lines instead of progress bars (the default when not on a terminal)")
    t.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"],
                   help="mixed precision (autocast): bf16 (the default with --amp; CPU or CUDA) or fp16 "
                        "(CUDA, with loss scaling)")
    t.add_argument("--force", action="store_true",
                   help="train into an --out folder that already holds a run (overwriting it)")

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
    b.add_argument("--plot", help="draw graph-attention time and memory vs edge count to this PNG")

    i = sub.add_parser("info", formatter_class=_Formatter, help="version, torch, compiled backends, threads",
                       description="What was built and what will run (and why kernels are missing).")
    i.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import warnings
    if not args.verbose:  # other libraries' deprecation notices are not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        if args.command == "train":
            _check_out_dir(args.out)
            existing = [f for f in ("checkpoint.pt", "metrics.json") if os.path.exists(os.path.join(args.out, f))]
            if existing and not (args.resume or args.force):
                raise DatasetError(f"--out {args.out!r} already holds a run ({', '.join(existing)}); "
                                   "pass --resume to continue it or --force to overwrite it")
            from .train import train
            train(args.dataset, args.out, args.model, args.epochs, args.device, args.seed, args.resume,
                  args.data_dir, args.batch_size, args.lr, args.limit, args.image_size,
                  progress=not args.no_progress, quiet=args.quiet, amp=args.amp)
        elif args.command == "eval":
            if args.json:
                _check_out_file(args.json, "--json")
            from .train import evaluate_checkpoint
            r = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_dir, args.device)
            print(f"{r['dataset']}: test accuracy {r['test_accuracy']:.4f} on {r['images']} images "
                  f"(loss {r['test_loss']:.4f})")
            print(f"{'class':>10} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
            for c, m in r["per_class"].items():
                print(f"{c:>10} {m['precision']:9.4f} {m['recall']:7.4f} {m['f1']:7.4f} {m['support']:8d}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(r, f, indent=2)
        elif args.command == "predict":
            if args.json:
                _check_out_file(args.json, "--json")
            from .train import predict
            results = predict(args.images, args.checkpoint, args.device, topk=args.topk,
                              preprocess=not args.no_preprocess)
            for r in results:
                if r["class"] is None:
                    print(f"{r['image']}: {r['empty']}")
                else:
                    print(f"{r['image']}: " + ", ".join(f"{c} ({p:.3f})" for c, p in r["topk"]))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)
        elif args.command == "bench":
            for flag, path in (("--json", args.json), ("--plot", args.plot)):
                if path:
                    _check_out_file(path, flag)
            from .bench.suite import run_suite
            run_suite(args.device, args.quick, args.json, args.plot)
        elif args.command == "info":
            from .info import info, info_dict
            if args.json:
                print(json.dumps(info_dict(), indent=2))
            else:
                info()
    except DatasetError as exc:
        print(f"neptune {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("NEPTUNE_DEBUG") == "1":
            raise
        print(f"neptune {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(set NEPTUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
