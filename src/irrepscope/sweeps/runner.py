"""Run a sweep: every run an ordinary run directory; finished runs are skipped, interrupted ones resumed.

Runs are claimed with a lock file, ``RUN_DIR/.claim`` (``host:pid:token``, created with
O_EXCL), so several ``irrepscope sweep`` processes, on one machine or on several machines
that share the sweep directory (with distinct host names), can work through the same
sweep without running anything twice. While its run trains, the claim's mtime is
refreshed every :data:`HEARTBEAT_S` seconds. A claim is stale, and taken over, when it
has not been refreshed for :data:`STALE_AFTER_S` seconds (its process died or hangs, on
any host), when it names a dead process on this host, or when it is empty or unparseable
(a kill between creating and writing it) and older than :data:`GRACE_S` seconds.
Taking over is atomic: the stale file is first renamed to a unique name, which only one
of several racing processes can do, and that process checks that the file it moved is
the one it judged stale (else it puts the fresh claim back and leaves the run alone).

A run that fails (a diverging loss, a corrupt checkpoint, ...) gets ``RUN_DIR/.failed``
(its one-line error first) and the sweep goes on with the other runs; the next
invocation retries it. A run whose recorded config.yaml differs from the sweep's current
spec (the sweep file was edited) is an error before anything trains, except more
``train.epochs`` (the run is extended) and ``train.device``/``train.threads``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from irrepscope.atomic import atomic_write_json, atomic_write_text
from irrepscope.config import PLACEMENT_KEYS, recipe_differences
from irrepscope.errors import IrrepscopeError
from irrepscope.sweeps.spec import RunSpec, Sweep
from irrepscope.training.runs import RunDir

CLAIM = ".claim"
FAILED = ".failed"
HEARTBEAT_S = 30.0  # a training run's claim is refreshed this often
STALE_AFTER_S = 600.0  # generous: clocks of machines sharing the directory may disagree by minutes
GRACE_S = 60.0  # an empty claim younger than this may be one being written right now


def run_state(run_dir: Path, epochs: int) -> str:
    """``finished`` (all epochs and test.json), ``partial`` (a last.pt to resume from) or ``new``."""
    run = RunDir.at(run_dir)
    if run.test.is_file() and len(run.read_metrics()) >= epochs:
        return "finished"
    if run.checkpoint("last").is_file():
        return "partial"
    return "new"


def run_status(run_dir: Path, epochs: int) -> tuple[str, str]:
    """How a run stands, for the report, and a failed run's one-line error (else "").

    Status: ``finished``, ``claimed elsewhere``, ``failed``, ``partial`` or ``not started``.
    """
    state = run_state(run_dir, epochs)
    if state == "finished":
        return "finished", ""
    seen = _read_claim(run_dir / CLAIM)
    if seen is not None and not _stale(*seen):
        return "claimed elsewhere", ""
    failed = run_dir / FAILED
    if failed.is_file():
        return "failed", (failed.read_text().splitlines() or ["(no message)"])[0]
    return ("partial" if state == "partial" else "not started"), ""


def _read_claim(lock: Path) -> tuple[os.stat_result, str] | None:
    """The claim file's stat and text, read from one open file (so they belong together); None if there is none."""
    try:
        with lock.open() as f:
            return os.fstat(f.fileno()), f.read()
    except FileNotFoundError:
        return None


def _stale(st: os.stat_result, text: str) -> bool:
    """Whether a claim may be taken over (see the module docstring)."""
    age = time.time() - st.st_mtime
    match = re.fullmatch(r"([^:\s]+):(\d+)(?::\w+)?", text.strip())
    if match is None:
        return age > GRACE_S
    if match[1] == socket.gethostname() and not _alive(int(match[2])):
        return True  # its process is gone: no need to wait for the timeout
    return age > STALE_AFTER_S


def _claim(run_dir: Path) -> str | None:
    """Take the run's claim; returns its text (ours), or None while another process holds a live one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / CLAIM
    mine = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            seen = _read_claim(lock)
            if seen is None:
                continue  # released meanwhile
            if not _stale(*seen) or not _bury(lock, *seen):
                return None
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return mine
    return None


def _bury(lock: Path, st: os.stat_result, text: str) -> bool:
    """Remove the stale claim that was read as (st, text); False if another process took it over first."""
    grave = lock.with_name(f"{CLAIM}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(lock, grave)  # atomic: of several racing processes, one moves a given file
    except FileNotFoundError:
        return False
    moved = _read_claim(grave)
    if moved is not None and (moved[0].st_ino, moved[0].st_mtime_ns, moved[1]) != (st.st_ino, st.st_mtime_ns, text):
        os.rename(grave, lock)  # a racer's fresh claim had replaced the stale one: put it back
        return False
    grave.unlink(missing_ok=True)
    return True


def _release(lock: Path, mine: str) -> None:
    """Remove our claim, but never one that replaced it (ours was judged stale and taken over)."""
    seen = _read_claim(lock)
    if seen is not None and seen[1] == mine:
        lock.unlink(missing_ok=True)


def _heartbeat(lock: Path, mine: str) -> threading.Event:
    """Refresh the claim's mtime every HEARTBEAT_S seconds until the returned event is set."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            seen = _read_claim(lock)
            if seen is None or seen[1] != mine:
                return  # taken over: no longer ours to keep alive
            try:
                os.utime(lock)
            except OSError:
                pass  # released meanwhile, or a passing file-system hiccup: try again next beat

    threading.Thread(target=beat, name=f"heartbeat {lock}", daemon=True).start()
    return stop


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recorded_differences(spec: RunSpec, run_dir: Path) -> list[str]:
    """How a started run's own config.yaml differs from ``spec``; [] for a run not started yet."""
    run = RunDir.at(run_dir)
    if not run.config.is_file() or not (run.test.is_file() or run.checkpoint("last").is_file()):
        return []  # nothing trained under the old config: the run starts afresh
    return recipe_differences(run.load_config(), spec.config)


def _mismatch_message(relpath: str, diffs: list[str]) -> str:
    return (
        f"{relpath} was trained with another config than the sweep file now gives: {', '.join(diffs)}; "
        "restore the sweep file, or delete the run (or use another --out) to retrain it"
    )


def check_run_configs(sweep: Sweep, out_dir: str | Path) -> None:
    """Refuse a sweep whose file was edited under existing runs: their results would be reported under the new spec."""
    bad = []
    for spec in sweep.runs:
        try:
            diffs = _recorded_differences(spec, Path(out_dir) / spec.relpath)
        except IrrepscopeError:
            continue  # an unreadable config.yaml: that run fails on its own, the others go on
        if diffs:
            bad.append(_mismatch_message(spec.relpath, diffs))
    if bad:
        raise IrrepscopeError(bad[0] + (f" (and {len(bad) - 1} more runs)" if len(bad) > 1 else ""))


def _record_failure(run_dir: Path, exc: Exception) -> None:
    """Write RUN_DIR/.failed: the one-line error first, then the traceback of an unexpected one."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else "(no message)"
    if isinstance(exc, IrrepscopeError):
        atomic_write_text(run_dir / FAILED, line + "\n")
    else:  # a bug or a crash rather than bad input: keep the traceback for whoever debugs it
        atomic_write_text(run_dir / FAILED, f"{type(exc).__name__}: {line}\n\n{traceback.format_exc()}")


def _execute(spec: RunSpec, run_dir: str, threads: int | None) -> tuple[str, str]:
    """Train (or resume) one run; returns (relpath, outcome). Runs in a worker process."""
    from irrepscope.training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    path = Path(run_dir)
    mine = _claim(path)
    if mine is None:
        return spec.relpath, "claimed elsewhere"
    stop = _heartbeat(path / CLAIM, mine)
    try:
        state = run_state(path, spec.config.train.epochs)
        if state == "finished":
            return spec.relpath, "finished"
        (path / FAILED).unlink(missing_ok=True)  # retried now
        try:
            diffs = _recorded_differences(spec, path)  # again: another process may have started it meanwhile
            if diffs:
                raise IrrepscopeError(_mismatch_message(spec.relpath, diffs))
            Trainer(spec.config, path, progress=False).run_training(resume=state == "partial")
        except Exception as exc:  # one diverging or corrupt run must not stop the others
            _record_failure(path, exc)
            return spec.relpath, "failed"
        return spec.relpath, "resumed" if state == "partial" else "trained"
    finally:
        stop.set()
        _release(path / CLAIM, mine)


SPEC_FILE = "sweep.json"  # SWEEP_DIR/sweep.json: the pin of the spec the sweep directory's runs follow
SESSION_LOCK = ".sweep.lock"


def spec_pin(sweep: Sweep) -> str:
    """sha256 of what the sweep trains: every run's directory and recipe (placement, i.e. device and threads, aside)."""
    recipes = []
    for spec in sweep.runs:
        recipe = spec.config.to_dict()
        for key in PLACEMENT_KEYS:
            section, name = key.split(".")
            recipe[section].pop(name, None)
        recipes.append([spec.relpath, recipe])
    return hashlib.sha256(json.dumps(recipes, sort_keys=True).encode("utf-8")).hexdigest()


@contextlib.contextmanager
def sweep_session(sweep: Sweep, out: Path) -> Iterator[None]:
    """Hold a shared lock on the sweep directory while training it, as any number of processes of the same spec may.

    A sweep of another spec (an edited sweep file: other epochs, other configurations) on
    the same directory is refused while any process of the recorded spec still works
    there: their runs would end up with mixed budgets. With none running, the new spec is
    recorded and the sweep goes on (extending ``train.epochs`` is how a sweep is continued).
    """
    out.mkdir(parents=True, exist_ok=True)
    mine = spec_pin(sweep)
    record = out / SPEC_FILE
    lock = out / SESSION_LOCK
    fd = -1
    try:
        for _ in range(20):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else is working here: (re)record our spec
                exclusive = True
            except BlockingIOError:
                fcntl.flock(fd, fcntl.LOCK_SH)
                exclusive = False
            if not _same_file(lock, fd):  # removed by a sweep that ended meanwhile: lock the new file
                os.close(fd)
                fd = -1
                continue
            if exclusive:
                atomic_write_json(record, {"name": sweep.name, "spec_sha256": mine})
                fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade: others of the same spec may join
                break
            try:
                recorded = json.loads(record.read_text(encoding="utf-8")).get("spec_sha256")
            except (OSError, ValueError, AttributeError):
                recorded = None
            if recorded == mine:
                break
            os.close(fd)
            fd = -1
            time.sleep(0.05)  # the other one may be ending or recording right now
        else:
            raise IrrepscopeError(
                f"{out} is being worked on by a sweep with another spec (another sweep file, or this one edited: "
                "other epochs or configurations); wait until it ends, or use another --out"
            )
        yield
    finally:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last one out removes the lock file
                lock.unlink(missing_ok=True)
            except BlockingIOError:
                pass
            os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def run_sweep(sweep: Sweep, out_dir: str | Path, workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Run every unfinished run of ``sweep`` under ``out_dir``; returns how many runs ended how (``failed`` included)."""
    out = Path(out_dir)
    if workers < 1:
        raise IrrepscopeError(f"--workers must be at least 1, got {workers}")
    check_run_configs(sweep, out)
    with sweep_session(sweep, out):
        return _run_all(sweep, out, workers, progress)


def _run_all(sweep: Sweep, out: Path, workers: int, progress: bool) -> dict[str, int]:
    todo = [s for s in sweep.runs if run_state(out / s.relpath, s.config.train.epochs) != "finished"]
    counts = {"finished before": len(sweep.runs) - len(todo)}
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    bar = tqdm(total=len(sweep.runs), initial=counts["finished before"], desc=f"sweep {sweep.name}", unit="run", disable=not progress)
    if workers == 1:
        results = (_execute(s, str(out / s.relpath), None) for s in todo)
        for relpath, outcome in results:
            counts[outcome] = counts.get(outcome, 0) + 1
            bar.update(1)
            bar.set_postfix_str(f"{relpath}: {outcome}")
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_execute, s, str(out / s.relpath), threads) for s in todo]
            for fut in cf.as_completed(futures):
                relpath, outcome = fut.result()
                counts[outcome] = counts.get(outcome, 0) + 1
                bar.update(1)
                bar.set_postfix_str(f"{relpath}: {outcome}")
    bar.close()
    return counts
