"""Files as a user expects them: complete under their final name, independent copies, permissions from the umask."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

FICLONE = 0x40049409
"""Linux ``ioctl`` that makes ``dst`` share ``src``'s extents copy-on-write (btrfs, XFS, bcachefs): linux/fs.h."""


def current_umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (``tempfile`` makes 0600 files and 0700 folders)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def available_bytes(folder: str | Path) -> int:
    """Free bytes on the disk holding ``folder`` (the nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` only if the block succeeds.

    The temporary name keeps the suffix so tools that pick a format by extension (ffmpeg, cv2,
    numpy) still work, and it starts with a dot so an interrupted run never leaves a file that
    looks finished. The finished file gets the umask's permissions, like any file a tool writes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".partial{final.suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder of outputs; replaces an existing folder only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        honour_umask(tmp, directory=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _reflink(src: Path, dst: Path) -> bool:
    """Clone ``src`` into the new file ``dst`` copy-on-write where the filesystem can; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    with open(src, "rb") as source, open(dst, "wb") as target:
        try:
            fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.EBADF, errno.EPERM):
                return False
            raise
    return True


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Publish an independent copy of ``src`` at ``dst``, atomically: a reflink where the filesystem has them, else bytes.

    Never a hard link: editing the copy must not change ``src`` (a cache entry, say). shutil's copy uses the
    kernel's in-place copy (``sendfile``) where it can.
    """
    with atomic_path(dst) as tmp:
        if not _reflink(Path(src), tmp):
            shutil.copyfile(src, tmp)
    return Path(dst)


def copy_tree(src: str | Path, dst: str | Path) -> Path:
    """:func:`copy_file` for a file or a whole folder; a folder replaces ``dst`` only once it is complete."""
    src = Path(src)
    if not src.is_dir():
        return copy_file(src, dst)
    with atomic_dir(dst) as tmp:
        for child in src.iterdir():
            copy_tree(child, tmp / child.name)
    return Path(dst)
