"""Where a run directory is: :func:`canonical` (its resolved path, decided before anything about it is) and
:func:`check_writable` (whether this process may write it), raising :mod:`stitching.rundir`'s
:class:`~stitching.rundir.PathError` / :class:`~stitching.rundir.WriteError`.

A run directory is known by its resolved path -- absolute, symlinks followed, ``..`` applied also through
folders that do not exist yet (``runs/nothere/..`` then ``victim`` *is* ``runs/victim``) -- before anything
about it is decided: whether it holds another run, its lock, the messages.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from stitching.rundir import PathError, WriteError


def canonical(path: str | os.PathLike) -> Path:
    """``path`` as the file system will know it once it exists: absolute, every symlink followed and ``..``
    applied -- also through folders that do not exist yet, as ``mkdir -p`` would create and leave them
    (``runs/nothere/..`` then ``victim`` is ``<cwd>/runs/victim``). Raises :class:`PathError` for a symlink
    loop and when the path, or the nearest of its parents that exists, is not a directory. Creates nothing."""
    try:
        resolved = Path(path).resolve()
    except (RuntimeError, OSError) as err:      # a symlink loop: RuntimeError up to Python 3.12, OSError after
        raise PathError(f"cannot be resolved: {_why(err)}") from None
    for p in (resolved, *resolved.parents):
        try:
            if not p.exists():
                continue
        except OSError as err:
            raise PathError(f"cannot be resolved: {_why(err)}") from None
        if not p.is_dir():
            raise PathError(f"{p} is a file, not a directory" if p == resolved
                            else f"{p} (a parent) is a file, not a directory")
        break
    return resolved


def check_writable(path: Path) -> None:
    """Raise :class:`WriteError` unless this process can write in the directory ``path`` (when it exists) or
    create it (its nearest existing parent is writable); creates nothing. The trainer calls it before any
    compute, so an unwritable place stops a run at once."""
    for p in (path, *path.parents):
        if p.exists():
            if not os.access(p, os.W_OK | os.X_OK):
                raise WriteError(f"cannot write {path}: {p} is not writable (permission denied); nothing was "
                                 "written")
            return


def _why(err: BaseException) -> str:
    if isinstance(err, RuntimeError) or (isinstance(err, OSError) and err.errno == errno.ELOOP):
        return "a symlink loop"
    return getattr(err, "strerror", None) or str(err)
