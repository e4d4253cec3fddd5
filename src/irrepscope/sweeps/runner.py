"""Run a sweep: every run an ordinary run directory; finished runs are skipped, interrupted ones resumed.

Runs are claimed with an exclusive lock file (``RUN_DIR/.claim``, created with O_EXCL),
so several ``irrepscope sweep`` processes, on one machine or on several machines that
share the sweep directory, can work through the same sweep without running anything twice.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from irrepscope.errors import IrrepscopeError
from irrepscope.sweeps.spec import RunSpec, Sweep
from irrepscope.training.runs import RunDir


def run_state(run_dir: Path, epochs: int) -> str:
    """``finished`` (all epochs and test.json), ``partial`` (a last.pt to resume from) or ``new``."""
    run = RunDir.at(run_dir)
    if run.test.is_file() and len(run.read_metrics()) >= epochs:
        return "finished"
    if run.checkpoint("last").is_file():
        return "partial"
    return "new"


def _claim(run_dir: Path) -> bool:
    """Take the run's lock; a lock left by a dead process on this host is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".claim"
    me = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(":") if lock.exists() else ("", "", "")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            return False
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _execute(spec: RunSpec, run_dir: str, threads: int | None) -> tuple[str, str]:
    """Train (or resume) one run; returns (relpath, outcome). Runs in a worker process."""
    from irrepscope.training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    path = Path(run_dir)
    if not _claim(path):
        return spec.relpath, "claimed elsewhere"
    try:
        state = run_state(path, spec.config.train.epochs)
        if state == "finished":
            return spec.relpath, "finished"
        Trainer(spec.config, path, progress=False).run_training(resume=state == "partial")
        return spec.relpath, "resumed" if state == "partial" else "trained"
    finally:
        (path / ".claim").unlink(missing_ok=True)


def run_sweep(sweep: Sweep, out_dir: str | Path, workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Run every unfinished run of ``sweep`` under ``out_dir``; returns how many runs ended how."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if workers < 1:
        raise IrrepscopeError(f"--workers must be at least 1, got {workers}")
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


def analyze_sweep(sweep: Sweep, out_dir: str | Path, progress: bool = True) -> int:
    """Run ``irrepscope analyze`` (default settings, test split) on every finished run without ``analysis/usage.json``.

    Resumable like the training: an analysed run is skipped. Returns how many runs were analysed now.
    """
    from irrepscope.analysis.runner import analyze_run

    out = Path(out_dir)
    todo = [
        s for s in sweep.runs
        if run_state(out / s.relpath, s.config.train.epochs) == "finished" and not (out / s.relpath / "analysis" / "usage.json").is_file()
    ]  # fmt: skip
    for spec in tqdm(todo, desc=f"analyse {sweep.name}", unit="run", disable=not progress):
        analyze_run(out / spec.relpath, progress=False)
    return len(todo)
