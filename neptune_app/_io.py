"""Writing files so that an interrupted write never destroys the previous version.

Every file the `neptune` command and `neptune_app.sampled` write (checkpoints, metrics JSON,
plots) goes through :func:`atomic_write`: the bytes go to a temporary file in the target's
folder, are flushed to disk, and only then replace the target with one ``os.replace``. Ctrl-C
(or any exception) before that leaves the old file as it was and removes the temporary one;
a killed process leaves at most a hidden ``.NAME.*.tmp`` file beside it.
"""
import json
import os
import secrets
from contextlib import contextmanager
from typing import Optional

__all__ = ["atomic_write", "write_json", "save_torch", "save_figure", "out_dir_problem"]


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, mode: str = "wb", encoding: Optional[str] = None):
    """``with atomic_write(path) as f:`` write to ``f``; ``path`` is replaced only when the
    block ends without an exception. ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8 unless
    ``encoding``). The new file gets the permissions a plain ``open(path, "w")`` would give."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    while True:  # O_EXCL: never reuse another writer's temporary file
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: the old file stays, the partial one goes
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def write_json(path, obj, indent: int = 2) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def save_torch(obj, path) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_figure(fig, path, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)``, atomically (the format from the file's extension)."""
    fmt = kwargs.pop("format", None) or os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    with atomic_write(path) as f:
        fig.savefig(f, format=fmt, **kwargs)


def figure_format_problem(path: str, flag: str = "--plot") -> Optional[str]:
    """Why matplotlib cannot draw to ``path``, or None: its extension names the format (none:
    PNG), checked before any work so that no result is lost at the end."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return f"{flag} needs matplotlib (pip install matplotlib)"
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        return (f"{flag} {path!r}: matplotlib cannot write .{fmt} files; use one of: "
                + ", ".join("." + f for f in sorted(formats)))
    return None


def out_dir_problem(path: str, flag: str = "--out") -> Optional[str]:
    """Why ``path`` cannot be an output folder (made here if missing), or None: checked
    before any work so that no result is lost at the end."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path!r} exists and is not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return f"{flag} {path!r} cannot be created: {exc.strerror or exc}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{flag} {path!r} is not writable"
    return None
