"""Run a sweep: every run an ordinary run directory; finished runs are skipped, interrupted ones resumed.

One driver per sweep directory: ``irrepscope sweep`` holds ``SWEEP_DIR/.sweep.lock`` (an
``flock``, released by the kernel however the driver ends) while it works, and a second
driver on the same directory is refused with one line. The runs are trained here, one after
another or ``workers`` at a time in local processes, or as Ray tasks on a local or remote
Ray cluster (:mod:`irrepscope.sweeps.ray_engine`): parallelism across machines, resources
and fault tolerance (a killed worker or a lost node: the task is retried) come from Ray, not
from a protocol of ours. Whatever runs it, a run is trained by :func:`execute_run`, which
holds the run's own lock (``RUN_DIR/.lock``) and resumes from ``checkpoints/last.pt`` when
there is one, so a retried run continues where its last checkpoint ended and gives the
numbers an uninterrupted run gives.

A run that fails (a diverging loss, a corrupt checkpoint, ...) gets ``RUN_DIR/.failed``
(its one-line error first) and the sweep goes on with the other runs; the next
invocation retries it. A run whose recorded config.yaml differs from the sweep's current
spec (the sweep file was edited) is an error before anything trains, except more
``train.epochs`` (the run is extended) and ``train.device``/``train.threads``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from irrepscope.atomic import atomic_write_text
from irrepscope.config import recipe_differences
from irrepscope.errors import IrrepscopeError
from irrepscope.locks import DirectoryLock, lock_run
from irrepscope.sweeps.spec import RunSpec, Sweep
from irrepscope.training.runs import RunDir

FAILED = ".failed"
SESSION_LOCK = ".sweep.lock"
RUN_LOCK_WAIT_S = 120.0  # a retried run waits this long for the worker it replaces to be gone


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

    Status: ``finished``, ``failed``, ``partial`` or ``not started``.
    """
    state = run_state(run_dir, epochs)
    if state == "finished":
        return "finished", ""
    failed = run_dir / FAILED
    if failed.is_file():
        return "failed", (failed.read_text().splitlines() or ["(no message)"])[0]
    return ("partial" if state == "partial" else "not started"), ""


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


def record_failure(run_dir: Path, exc: BaseException | str) -> None:
    """Write RUN_DIR/.failed: the one-line error first, then the traceback of an unexpected one."""
    if isinstance(exc, str):  # said by the engine (a worker that kept dying), not raised in the run
        atomic_write_text(run_dir / FAILED, exc.strip() + "\n")
        return
    text = str(exc).strip()
    line = text.splitlines()[0] if text else "(no message)"
    if isinstance(exc, IrrepscopeError):
        atomic_write_text(run_dir / FAILED, line + "\n")
    else:  # a bug or a crash rather than bad input: keep the traceback for whoever debugs it
        atomic_write_text(run_dir / FAILED, f"{type(exc).__name__}: {line}\n\n{traceback.format_exc()}")


def execute_run(spec: RunSpec, run_dir: str, threads: int | None, lock_wait_s: float = 0.0) -> tuple[str, str]:
    """Train (or resume) one run; returns (relpath, outcome): ``trained``, ``resumed``, ``finished`` or ``failed``.

    Runs wherever the engine puts it (this process, a local worker process, a Ray worker).
    ``lock_wait_s``: how long to wait for the run's lock when another process still holds it.
    """
    from irrepscope.training.trainer import Trainer

    if threads and not spec.config.train.threads:
        torch.set_num_threads(threads)
    path = Path(run_dir)
    try:
        with lock_run(path, "irrepscope sweep", create=True, wait_s=lock_wait_s):
            state = run_state(path, spec.config.train.epochs)
            if state == "finished":
                return spec.relpath, "finished"
            (path / FAILED).unlink(missing_ok=True)  # retried now
            diffs = _recorded_differences(spec, path)
            if diffs:
                raise IrrepscopeError(_mismatch_message(spec.relpath, diffs))
            Trainer(spec.config, path, progress=False).run_training(resume=state == "partial")
    except Exception as exc:  # one diverging or corrupt run must not stop the others
        record_failure(path, exc)
        return spec.relpath, "failed"
    return spec.relpath, "resumed" if state == "partial" else "trained"


class SweepProgress:
    """The sweep's progress bar: how many runs are pending, running, finished and failed."""

    def __init__(self, sweep: Sweep, finished_before: int, progress: bool) -> None:
        self.counts: dict[str, int] = {"finished before": finished_before}
        self.total = len(sweep.runs)
        self.running: set[str] = set()
        self.done = finished_before
        self.bar = tqdm(total=self.total, initial=finished_before, desc=f"sweep {sweep.name}", unit="run", disable=not progress)
        self._show()

    def started(self, relpath: str) -> None:
        self.running.add(relpath)
        self._show()

    def ended(self, relpath: str, outcome: str) -> None:
        self.running.discard(relpath)
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.done += 1
        self.bar.update(1)
        self._show(f"{relpath}: {outcome}")

    def note(self, text: str) -> None:
        """A line on stderr above the bar, also with the bar off (the Ray dashboard's address)."""
        tqdm.write(text, file=sys.stderr)

    def _show(self, last: str = "") -> None:
        pending = self.total - self.done - len(self.running)
        failed = self.counts.get("failed", 0)
        text = f"pending {pending}, running {len(self.running)}, finished {self.done - failed}, failed {failed}"
        self.bar.set_postfix_str(text + (f"; {last}" if last else ""), refresh=True)

    def close(self) -> dict[str, int]:
        self.bar.close()
        return self.counts


Engine = Callable[[list[RunSpec], Path, SweepProgress], None]


def lock_sweep(out: Path) -> DirectoryLock:
    """The driver's lock on a sweep directory: a second ``irrepscope sweep`` on it is refused with one line."""
    return DirectoryLock(out / SESSION_LOCK, out, "irrepscope sweep")


def run_sweep(
    sweep: Sweep, out_dir: str | Path, workers: int = 1, progress: bool = True, engine: Engine | None = None,
) -> dict[str, int]:  # fmt: skip
    """Run every unfinished run of ``sweep`` under ``out_dir``; returns how many runs ended how (``failed`` included).

    ``engine``: what trains the runs (:func:`irrepscope.sweeps.ray_engine.ray_engine` for
    Ray); by default this process, or ``workers`` local processes.
    """
    out = Path(out_dir).resolve()  # workers elsewhere (Ray) get paths that do not depend on their cwd
    if workers < 1:
        raise IrrepscopeError(f"--workers must be at least 1, got {workers}")
    check_run_configs(sweep, out)
    with lock_sweep(out):
        todo = [s for s in sweep.runs if run_state(out / s.relpath, s.config.train.epochs) != "finished"]
        bar = SweepProgress(sweep, len(sweep.runs) - len(todo), progress)
        try:
            (engine or local_engine(workers))(todo, out, bar)
        finally:
            counts = bar.close()
    return counts


def local_engine(workers: int) -> Engine:
    """Train the runs in this process (``workers`` = 1) or in ``workers`` local processes sharing the cores."""

    def run(todo: list[RunSpec], out: Path, bar: SweepProgress) -> None:
        if workers == 1:
            for spec in todo:
                bar.started(spec.relpath)
                bar.ended(*execute_run(spec, str(out / spec.relpath), None))
            return
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(execute_run, s, str(out / s.relpath), threads): s for s in todo}
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                for fut in pending:
                    if fut.running():
                        bar.started(futures[fut].relpath)
                for fut in done:
                    bar.ended(*fut.result())

    return run
