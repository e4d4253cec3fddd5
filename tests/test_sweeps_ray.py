"""Sweeps on Ray: the same results as without Ray, a killed worker resumed (not restarted), a restarted driver.

One Ray head for the whole module (``ray start --head`` on localhost, 2 CPUs), joined by
address by every sweep; the drivers are ``irrepscope sweep`` processes, as a user runs them.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import one_line_error, run_cli
from irrepscope.locks import lock_run
from irrepscope.sweeps import runner
from irrepscope.sweeps.spec import load_sweep
from irrepscope.training.runs import RunDir

ray = pytest.importorskip("ray")
# One worker runs them all, on one cluster. (pytest 9.2 breaks this grouping, pytest-dev/pytest-xdist#1386;
# constraints/dev.txt keeps pytest below it. Each worker would then start its own head, which the
# fixture keeps apart: it stops only the cluster it started.)
pytestmark = pytest.mark.xdist_group("ray")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "quick" / "tiny.yaml"
# Token authentication off for this throw-away localhost cluster: the test must not depend on ~/.ray.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
TIMING = {"train_seconds", "epoch_seconds", "molecules_per_s"}  # wall times: the only numbers allowed to differ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head started separately on localhost; its address.

    ``ray start --block`` in a session of its own, stopped by signalling that session: ``ray stop``
    would stop every Ray cluster on the machine, other tests' and users' included.
    """
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
            env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: "block forever" in log.read_text() or proc.poll() is not None, "the Ray head", timeout=180)
        assert proc.poll() is None, log.read_text()
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()  # ray start --block shuts its cluster down on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def sweep_file(tmp_path: Path, name: str, epochs: int, configs: str = "") -> Path:
    """A sweep of the tiny config; ``configs``: its entries (each with its own train.max_train_batches)."""
    path = tmp_path / f"{name}.yaml"
    configs = configs or (f"  - {{name: a, config: {TINY}, set: {{train.max_train_batches: 3}}}}\n"
                          f"  - {{name: b, config: {TINY}, set: {{model.orders: [0, 2], train.max_train_batches: 3}}}}\n")  # fmt: skip
    path.write_text(
        f"name: {name}\nconfigs:\n{configs}seeds: [0]\n"
        f"set:\n  data.limit: 160\n  train.epochs: {epochs}\n  train.threads: 1\n"
    )
    return path


def driver(path: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "irrepscope", "sweep", str(path), "--out", str(out), "--quiet", "--ray-address", address, *extra],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def results(out: Path) -> dict[str, dict[str, str]]:
    return {r["run"]: {k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader((out / "results.csv").open())}


def metrics(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader((run_dir / "metrics.csv").open())]


def wait_until(condition, what: str, timeout: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended before {what}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def epochs_done(run_dir: Path) -> int:
    try:
        return len(RunDir.at(run_dir).read_metrics())
    except Exception:  # being rewritten this instant
        return 0


def test_killed_worker_is_resumed_and_the_results_equal_a_sweep_without_ray(head, tmp_path):
    path = sweep_file(tmp_path, "same", epochs=5)
    sweep = load_sweep(path)
    plain = tmp_path / "plain"
    assert runner.run_sweep(sweep, plain, progress=False) == {"finished before": 0, "trained": 2}
    assert run_cli("sweep", str(path), "--out", str(plain), "--quiet") == 0  # writes results.csv

    out = tmp_path / "ray"
    victim = out / sweep.runs[0].relpath
    proc = driver(path, out, head)
    wait_until(lambda: 1 <= epochs_done(victim) < 4, "an epoch of the first run", proc=proc)
    (session,) = RunDir.at(victim).read_sessions()
    os.kill(session["pid"], signal.SIGKILL)  # the Ray worker training it
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "2 trained" in stdout or ("1 trained" in stdout and "1 resumed" in stdout), stdout

    # Trained once: the retry started where the killed worker's last checkpoint ended, not at 0 ...
    starts = [s["start_epoch"] for s in RunDir.at(victim).read_sessions()]
    assert len(starts) == 2 and starts[0] == 0 and 1 <= starts[1] < 5, starts
    assert [s["pid"] for s in RunDir.at(victim).read_sessions()][1] != session["pid"]
    assert [int(r["epoch"]) for r in metrics(victim)] == [1, 2, 3, 4, 5]  # every epoch once
    assert [s["start_epoch"] for s in RunDir.at(out / sweep.runs[1].relpath).read_sessions()] == [0]
    # ... and its numbers, like every run's, are those of the sweep without Ray.
    for spec in sweep.runs:
        assert metrics(out / spec.relpath) == metrics(plain / spec.relpath), spec.relpath
        assert json.loads((out / spec.relpath / "test.json").read_text())["mae_ev"] == pytest.approx(
            json.loads((plain / spec.relpath / "test.json").read_text())["mae_ev"], abs=0)
    assert results(out) == results(plain)


def test_an_interrupted_driver_restarted_retrains_nothing_finished_and_failures_are_recorded(head, tmp_path):
    configs = (f"  - {{name: a, config: {TINY}, set: {{train.max_train_batches: 2}}}}\n"
               f"  - {{name: wild, config: {TINY}, set: {{train.lr: 1.0e6, train.max_train_batches: 2}}}}\n"
               f"  - {{name: c, config: {TINY}, set: {{model.orders: [0, 2], train.max_train_batches: 10}}}}\n")  # fmt: skip
    path = sweep_file(tmp_path, "restart", epochs=8, configs=configs)
    sweep = load_sweep(path)
    out = tmp_path / "out"
    dirs = {s.config_name: out / s.relpath for s in sweep.runs}
    # One Ray CPU per run and 2 on the head: a and wild first, then c (5x longer epochs) when wild has failed.
    proc = driver(path, out, head)
    wait_until(lambda: runner.run_state(dirs["a"], 8) == "finished" and 1 <= epochs_done(dirs["c"]) < 6,
               "a finished while c trains", proc=proc)  # fmt: skip
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, stderr
    for d in dirs.values():  # the driver cancelled its tasks: their workers let go of the runs
        with lock_run(d, "test", wait_s=60):
            pass
    finished = {n for n, d in dirs.items() if runner.run_state(d, 8) == "finished"}
    stamps = {n: (dirs[n] / "checkpoints" / "last.pt").stat().st_mtime_ns for n in finished}
    partial = {n for n, d in dirs.items() if runner.run_state(d, 8) == "partial"}
    assert "c" in partial and epochs_done(dirs["c"]) < 8, "Ctrl-C did not stop the run training"

    proc = driver(path, out, head)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stderr  # the wild run failed
    assert stderr.strip().splitlines()[-1] == f"error: 1 of 3 runs failed; their errors are in {out / 'results.csv'}"
    assert f"{len(finished)} finished before" in stdout
    for name in finished:  # not touched again
        assert (dirs[name] / "checkpoints" / "last.pt").stat().st_mtime_ns == stamps[name]
    for name in partial - {"wild"}:  # resumed from where the interrupted driver's worker left it
        starts = [s["start_epoch"] for s in RunDir.at(dirs[name]).read_sessions()]
        assert starts[0] == 0 and starts[-1] >= 1 and starts.count(0) == 1, starts
        assert [int(r["epoch"]) for r in metrics(dirs[name])] == list(range(1, 9))
    rows = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    by_name = {s.config_name: rows[s.relpath] for s in sweep.runs}
    assert by_name["wild"]["status"] == "failed" and by_name["wild"]["error"].startswith("loss became")
    assert by_name["a"]["status"] == by_name["c"]["status"] == "finished"


def test_a_local_ray_cluster_started_for_the_sweep_gives_the_numbers_without_ray(tmp_path):
    configs = f"  - {{name: a, config: {TINY}, set: {{train.max_train_batches: 2}}}}\n"
    path = sweep_file(tmp_path, "local", epochs=2, configs=configs)
    plain = tmp_path / "plain"
    assert run_cli("sweep", str(path), "--out", str(plain), "--quiet") == 0
    out = tmp_path / "ray"
    proc = subprocess.run(
        [sys.executable, "-m", "irrepscope", "sweep", str(path), "--out", str(out), "--quiet", "--ray"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Ray cluster started here" in proc.stderr and "1 trained" in proc.stdout, (proc.stdout, proc.stderr)
    assert results(out) == results(plain)


def test_a_second_ray_driver_is_refused_before_joining(tmp_path):
    path = sweep_file(tmp_path, "two", epochs=1)
    out = tmp_path / "out"
    with runner.lock_sweep(out):  # this process is a driver on out (the lock is per process: the second one is another)
        proc = driver(path, out, f"127.0.0.1:{_free_port()}")  # no cluster there: it must not get as far as joining
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert stderr.strip().startswith(f"error: {out.resolve()} is being written by irrepscope sweep") and "\n" not in stderr.strip()
    assert not (out / "runs").exists()


def test_ray_missing_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    path = sweep_file(tmp_path, "noray", epochs=1)
    one_line_error(capsys, run_cli("sweep", str(path), "--out", str(tmp_path / "out"), "--ray"), "irrepscope[ray]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--ray", "--workers", "2"], "--workers is for sweeps without Ray"),
        (["--cpus-per-run", "2"], "need --ray"),
        (["--ray", "--cpus-per-run", "0"], "--cpus-per-run must be a positive"),
        (["--ray", "--gpus-per-run", "nan"], "--gpus-per-run must be 0 or more"),
    ],
)
def test_bad_ray_options(tmp_path, capsys, args, match):
    path = sweep_file(tmp_path, "bad", epochs=1)
    one_line_error(capsys, run_cli("sweep", str(path), "--out", str(tmp_path / "out"), *args), match)
