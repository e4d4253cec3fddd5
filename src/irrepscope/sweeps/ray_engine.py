"""Sweeps on Ray: every run a Ray task with declared resources, retried by Ray when its worker or node dies.

Why Ray core tasks and not Ray Tune: a sweep here is a fixed grid of independent runs, each
writing an ordinary run directory with its own checkpoints; there is nothing to search or
schedule adaptively. A task per run gives what Tune would (resources per run, fractional
GPUs, retries on worker or node loss, the dashboard) without Tune's own trial directories,
result syncing and checkpoint protocol beside ours. Fault tolerance is Ray's: a task whose
worker process is killed or whose node is lost is run again (``max_retries``), and since a
run resumes from its ``checkpoints/last.pt``, the retry continues the run where its last
epoch ended, with the numbers an uninterrupted run gives. Application errors (a diverging
run) are not retried by Ray: they are recorded in the run's ``.failed`` and the sweep goes on.

The run directories must lie on storage every Ray node sees at the same path (one machine,
or a shared file system on a cluster), and irrepscope must be importable on every node.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from irrepscope.errors import IrrepscopeError
from irrepscope.sweeps.runner import RUN_LOCK_WAIT_S, Engine, SweepProgress, execute_run, record_failure
from irrepscope.sweeps.spec import RunSpec

RAY_EXTRA = "pip install 'irrepscope[ray]'"


def import_ray() -> Any:
    """Ray, or the one-line error that says which extra installs it."""
    try:
        import ray
    except ImportError:
        raise IrrepscopeError(f"sweeps on Ray need Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def _task(spec: RunSpec, run_dir: str, threads: int, started: Any) -> tuple[str, str]:
    """One run on a Ray worker: say it started, then train or resume it."""
    try:
        started.put_nowait(spec.relpath)
    except Exception:  # the progress queue is a convenience: a full or gone queue must not fail the run
        pass
    return execute_run(spec, run_dir, threads, lock_wait_s=RUN_LOCK_WAIT_S)


def ray_engine(
    address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, max_retries: int = 3,
) -> Engine:  # fmt: skip
    """An engine for :func:`irrepscope.sweeps.runner.run_sweep` that trains every run as a Ray task.

    ``address``: None starts a local Ray cluster for this sweep (stopped at its end);
    ``"auto"`` or ``"HOST:PORT"`` joins a running one (``ray start --head``, or a cluster on
    SLURM). ``cpus_per_run``, ``gpus_per_run`` (a fraction packs several runs on one GPU):
    what each run's task declares; its torch threads are ``ceil(cpus_per_run)`` unless the
    config sets ``train.threads``. ``max_retries``: how often Ray reruns a run whose worker
    died (each time resuming from the run's last checkpoint).
    """
    if not cpus_per_run > 0 or not math.isfinite(cpus_per_run):
        raise IrrepscopeError(f"--cpus-per-run must be a positive number, got {cpus_per_run}")
    if not gpus_per_run >= 0 or not math.isfinite(gpus_per_run):
        raise IrrepscopeError(f"--gpus-per-run must be 0 or more, got {gpus_per_run}")
    if max_retries < 0:
        raise IrrepscopeError(f"--ray-retries must be 0 or more, got {max_retries}")
    ray = import_ray()

    def run(todo: list[RunSpec], out: Path, bar: SweepProgress) -> None:
        if gpus_per_run > 0:
            on_cpu = [s.relpath for s in todo if s.config.train.device == "cpu"]
            if on_cpu:
                raise IrrepscopeError(f"--gpus-per-run {gpus_per_run} but {on_cpu[0]} trains on cpu: add --device cuda (or auto)")
        joined = address is not None
        try:
            context = ray.init(
                address=address if joined else "local", log_to_driver=False, configure_logging=True,
                logging_level="warning", include_dashboard=None,
            )  # fmt: skip
        except (ConnectionError, RuntimeError) as exc:  # no head there, or its token is not ours
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise IrrepscopeError(f"cannot {'join the Ray cluster at ' + address if joined else 'start a local Ray cluster'}: {first}") from None
        try:
            url = getattr(context, "dashboard_url", "") or ""
            bar.note(f"Ray cluster {'joined at ' + address if joined else 'started here'}"
                     + (f"; dashboard: http://{url}" if url else "; no dashboard"))  # fmt: skip
            _run_tasks(ray, todo, out, bar)
        finally:
            ray.shutdown()  # a cluster we started goes with us; a joined one stays up

    def _run_tasks(ray: Any, todo: list[RunSpec], out: Path, bar: SweepProgress) -> None:
        from ray.util.queue import Queue

        started = Queue(actor_options={"num_cpus": 0})
        task = ray.remote(_task).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries, retry_exceptions=False,
        )  # fmt: skip
        threads = max(1, math.ceil(cpus_per_run))
        refs = {task.remote(s, str(out / s.relpath), threads, started): s for s in todo}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for relpath in _drain(started):
                    bar.started(relpath)
                for ref in done:
                    bar.ended(*_outcome(ray, ref, refs[ref], out, max_retries))
        except BaseException:  # Ctrl-C (or an error here): stop the runs now, not when Ray notices the driver gone
            for ref in pending:
                ray.cancel(ref, force=True)  # kills the worker; the run resumes from its last checkpoint
            raise

    return run


def _outcome(ray: Any, ref: Any, spec: RunSpec, out: Path, max_retries: int) -> tuple[str, str]:
    """(relpath, outcome) of a finished task; a run Ray gave up on is recorded as failed."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # its worker kept dying (or its node), retries spent
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        record_failure(out / spec.relpath, f"Ray gave up on this run after {max_retries} retries: {first}")
        return spec.relpath, "failed"


def _drain(started: Any) -> list[str]:
    """The runs whose tasks said they started since the last call."""
    out = []
    while True:
        try:
            out.append(started.get_nowait())
        except Exception:  # ray.util.queue.Empty once drained (or the queue gone with its cluster)
            return out
