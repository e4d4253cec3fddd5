"""One writer per directory: an exclusive, non-blocking lock that dies with its process.

``train``, ``evaluate``, ``analyze``, ``prune`` and ``export`` hold the lock of the
directory they write for as long as they write it; a second writer is refused at once
with one line naming the holder. The lock is ``flock`` on a small file
(``RUN_DIR/.lock`` for a run, ``.NAME.lock`` beside an output directory that is replaced
whole), so the kernel releases it when its process ends in any way, kill -9 included: a
lock file left by a dead process is simply taken over. The file is removed on release
(re-checked after locking, so a racer never holds a lock on a removed file).

On one machine, or on a file system whose ``flock`` spans machines (local disks, NFSv4): a
sweep's Ray workers on several hosts lock the runs they train in the shared sweep directory.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from irrepscope.atomic import remove_stale_temporaries
from irrepscope.errors import IrrepscopeError

RUN_LOCK = ".lock"
_HELD: dict[Path, int] = {}  # lock files this process holds, and how many nested holders: re-entrant within a process


class DirectoryLock:
    """``with DirectoryLock(lock_file, directory, command):`` holds ``lock_file`` exclusively.

    ``directory`` is what the lock protects (created if missing, and removed again on
    release if this lock created it and it is still empty, so a refused command leaves
    nothing behind); ``command`` is said in the error a second writer gets.
    """

    def __init__(
        self, lock_file: str | os.PathLike, directory: str | os.PathLike, command: str, create: bool = True,
        cleanup: Callable[[], object] | None = None, wait_s: float = 0.0,
    ) -> None:  # fmt: skip
        self.path = Path(lock_file)
        self.directory = Path(directory)
        self.command = command
        self.create = create
        self.cleanup = cleanup  # run once the lock is ours: what a killed writer left can go now
        self.wait_s = wait_s  # how long a busy lock is waited for before the error (0: refused at once)
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> "DirectoryLock":
        key = Path(os.path.realpath(self.path))
        if key in _HELD:  # an inner step of the same command (prune analyses the run it prunes)
            _HELD[key] += 1
            self._nested = True
            return self
        self._nested = False
        if not self.create and not self.directory.is_dir():
            raise IrrepscopeError(f"run directory not found: {self.directory}")
        missing = []
        for folder in (self.directory, *self.directory.parents):
            if folder.exists():
                break
            missing.append(folder)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(0.2)
                    continue
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                self._remove_created()
                raise IrrepscopeError(
                    f"{self.directory} is being written by {holder}; wait until it ends (one writer per directory)"
                ) from None
            # The holder before us may have removed the file between our open and our lock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.command} (pid {os.getpid()} on {socket.gethostname()})".encode())
        self._fd = fd
        _HELD[key] = 1
        if self.cleanup is not None:
            self.cleanup()
        return self

    def release(self) -> None:
        key = Path(os.path.realpath(self.path))
        if getattr(self, "_nested", False):
            _HELD[key] -= 1
            self._nested = False
            return
        if self._fd is None:
            return
        _HELD.pop(key, None)
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting opener re-checks the inode
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # only folders this lock made, and only if nothing was written
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def lock_run(run_dir: str | os.PathLike, command: str, create: bool = False, wait_s: float = 0.0) -> DirectoryLock:
    """The lock of a run directory (``RUN_DIR/.lock``): training, evaluation, analysis and pruning of it.

    ``create``: make the directory if missing (training); else a missing one is an error.
    ``wait_s``: wait this long for a busy lock (a sweep's retried task, while the worker it
    replaces is still being killed) before refusing.
    """
    run_dir = Path(run_dir)

    def cleanup() -> None:  # temporaries of an atomic write killed midway (train, evaluate, analyze)
        remove_stale_temporaries(run_dir)
        if (run_dir / "checkpoints").is_dir():
            remove_stale_temporaries(run_dir / "checkpoints")

    return DirectoryLock(run_dir / RUN_LOCK, run_dir, command, create, cleanup, wait_s)


def lock_output(target: str | os.PathLike, command: str) -> DirectoryLock:
    """The lock of an output directory replaced whole (``.NAME.lock`` beside it: the directory itself is swapped).

    Beside its real path (``.``, ``..`` and symlinks resolved), as the replacement is.
    """
    target = Path(os.path.realpath(target))
    return DirectoryLock(target.parent / f".{target.name}.lock", target.parent, command)
