"""The `neptune` command: train, eval, predict, bench, info.

:func:`main` is the `neptune` script (and `python -m neptune_app`): it parses the arguments
first, without importing torch (:mod:`neptune_app.options`), then :func:`run` does the work.

    neptune train --dataset digits --out runs/digits
    neptune eval --checkpoint runs/digits/checkpoint.pt
    neptune predict my_digit.png --checkpoint runs/digits/checkpoint.pt
    neptune bench --quick
    neptune info
"""
import json
import os
import sys

from ._io import out_dir_problem, write_json
from ._util import internal_error, one_line
from .options import build_parser


def _check_out_dir(path: str) -> None:
    """The output folder exists (or can be made) and is writable: checked before any work."""
    from .data import DatasetError
    problem = out_dir_problem(path, "--out")
    if problem:
        raise DatasetError(problem)


def _check_out_file(path: str, flag: str) -> None:
    """`path` can be written (checked before any work, so no result is lost at the end)."""
    from .data import DatasetError
    if os.path.isdir(path):
        raise DatasetError(f"{flag} {path!r} is a folder, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DatasetError(f"{flag} {path!r}: folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DatasetError(f"{flag} {path!r} is not writable")


def main(argv=None) -> int:
    """The `neptune` script, `python -m neptune_app`: parse (no torch yet), then run."""
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    """Do what the parsed arguments ask; the exit status (2: a bad input, said in one line)."""
    import warnings

    from .data import DatasetError
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
                  progress=not args.no_progress, quiet=args.quiet, amp=args.amp, workers=args.workers)
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
                write_json(args.json, r)
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
                write_json(args.json, results)
        elif args.command == "bench":
            for flag, path in (("--json", args.json), ("--plot", args.plot)):
                if path:
                    _check_out_file(path, flag)
            if args.plot:
                from ._io import figure_format_problem
                from .data import DatasetError
                problem = figure_format_problem(args.plot)
                if problem:
                    raise DatasetError(problem)
            from .bench.suite import run_suite
            run_suite(args.device, args.quick, args.json, args.plot)
        elif args.command == "info":
            from neptune_ext.info import info, info_dict
            if args.json:
                print(json.dumps(info_dict(), indent=2))
            else:
                info()
    except DatasetError as exc:
        print(f"neptune {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every file is written atomically: what is on disk is whole
        ckpt = os.path.join(args.out, "checkpoint.pt") if args.command == "train" else None
        if ckpt and os.path.exists(ckpt):
            print(f"interrupted: {ckpt} holds the last complete epoch; continue with --resume",
                  file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as exc:  # a bug: one line, the traceback on request
        return internal_error(f"neptune {args.command}", exc)
    return 0




if __name__ == "__main__":
    sys.exit(main())
