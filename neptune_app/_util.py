"""Small helpers of the application (no torch: the `neptune` command's parser imports them)."""
import os
import subprocess
import sys


def git_commit() -> str:
    """The commit measured: NEPTUNE_GIT_COMMIT if set (a copied tree has no .git), else HEAD."""
    env = os.environ.get("NEPTUNE_GIT_COMMIT")
    if env:
        return env
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def internal_error(prog: str, exc: BaseException) -> int:
    """A command's bug as one line on stderr (exit status 1); NEPTUNE_DEBUG=1 re-raises it
    for the traceback. Call it from inside the ``except`` block."""
    if os.environ.get("NEPTUNE_DEBUG") == "1":
        raise exc
    print(f"{prog}: internal error: {type(exc).__name__}: {one_line(exc)} "
          "(set NEPTUNE_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1
