"""Open and create files under a model directory without following symlinks.

A fill writes only into its own `DEST.partial` on the model volume, and a verification reads only DEST. A symlink
there (left by another pod sharing the volume, or by a restored snapshot) would send the fill's writes anywhere its
user may write, or make a verification read bytes from outside the model. The fetcher never creates symlinks, so
every path component under the directory is opened with O_NOFOLLOW relative to its parent (the directory itself
too), and a symlink anywhere on the way is refused with one clear error instead of followed.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

from serving.fetch.errors import FetchError

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def symlink_refused(path: Path) -> FetchError:
    return FetchError(f"{path}: is a symlink; the fill never makes symlinks, so something else put it on the model "
                      "volume: remove it (and find out what wrote it), then run the fill again")


def refuse_symlink(path: Path) -> None:
    """Raise the symlink error when `path` itself is a symlink."""
    if path.is_symlink():
        raise symlink_refused(path)


def open_under(root: Path, relative: str, flags: int, *, make_parents: bool = False, mode: int = 0o644) -> int:
    """`os.open(root / relative, flags)` that refuses a symlink at `root` or at any component below it.

    `relative` is `/`-separated and already checked to stay inside `root`; `make_parents` creates missing
    directories on the way. Returns the file descriptor; raises FetchError for a symlink, OSError otherwise
    (FileNotFoundError when a component is missing).
    """
    parts = PurePosixPath(relative).parts
    fd = _open(root, root.name, _DIRECTORY, None)
    try:
        where = root
        for name in parts[:-1]:
            where = where / name
            if make_parents:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            inner = _open(where, name, _DIRECTORY, fd)
            os.close(fd)
            fd = inner
        return _open(where / parts[-1], parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, fd, mode)
    finally:
        os.close(fd)


def _open(path: Path, name: str, flags: int, dir_fd: int | None, mode: int = 0o644) -> int:
    try:
        return os.open(name if dir_fd is not None else path, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        # O_NOFOLLOW on a symlink fails with ELOOP; O_DIRECTORY with it may say ENOTDIR instead.
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and path.is_symlink()):
            raise symlink_refused(path) from None
        raise
