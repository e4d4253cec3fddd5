"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash or a bad input half-way through never leaves a truncated file where a good
one stood, because ``os.replace`` is atomic on POSIX file systems.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file, fsync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode any other tool would (0666 minus the umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an :func:`atomic_write` killed mid-write left in ``folder``.

    Call it only where no other process writes at the same time (a run being resumed).
    """
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    # Linux reports it without changing it; os.umask can only read it by setting it (racy with threads).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- directories that land whole -------------------------------------------------------------
# A multi-file output (an analysis, an export, a comparison) is written into a staging
# sibling ``.NAME.staging-<id>`` and swapped onto ``NAME`` in one step: the kernel's
# renameat2(RENAME_EXCHANGE) on Linux, else two renames with the old set parked as
# ``.NAME.old-<id>``. A kill at any moment leaves the old set or the new one (plus
# leftovers that :func:`recover_directory` removes, or puts back, on the next run).
STAGING, OLD = ".staging-", ".old-"
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system or file system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL / ENOSYS / EXDEV: fall back to two renames


def real_path(target: str | os.PathLike) -> Path:
    """``target`` with symlinks resolved and ``.``/``..`` removed: the folder that is really replaced (and its real parent)."""
    return Path(os.path.realpath(target))


def recover_directory(target: str | os.PathLike) -> None:
    """Clean up after a killed :func:`replace_directory` of ``target``: the set that was in place stays.

    Staging directories are removed. If ``target`` is missing while a parked old set exists
    (a kill between the two renames of the fallback), the old set is put back. Call it only
    under the lock of whoever writes ``target``.
    """
    import shutil

    target = real_path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for staged in parent.glob(f".{target.name}{STAGING}*"):
        if staged.is_symlink():
            staged.unlink()
        else:
            shutil.rmtree(staged, ignore_errors=True)
    olds = sorted(parent.glob(f".{target.name}{OLD}*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.rename(olds.pop(), target)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def staging_directory(target: str | os.PathLike) -> Path:
    """A fresh, empty staging sibling of ``target`` to write a new set of files into."""
    target = real_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING}", dir=target.parent))


def replace_directory(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the complete ``staged`` directory onto ``target`` in one step; the old ``target`` (if any) is removed.

    ``staged`` must come from :func:`staging_directory` of the same ``target`` (a sibling of its real path).
    """
    import shutil

    staged, target = Path(staged), real_path(target)  # through a symlink: the folder it points to is replaced
    os.chmod(staged, 0o777 & ~_umask())  # mkdtemp made it 0700
    for f in (*staged.iterdir(), staged):  # the new set is on disk before it is named
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if not target.exists():
        os.rename(staged, target)
        return target
    if _exchange(staged, target):
        shutil.rmtree(staged)  # now holds the old set
        return target
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD}", dir=target.parent))
    os.rename(target, old)  # (replaces the empty placeholder)
    os.rename(staged, target)
    shutil.rmtree(old)
    return target
