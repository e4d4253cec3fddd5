"""No silent wrong answer: a run's files pin each other, one writer per directory, multi-file outputs land whole.

Each test reproduces a case of issue 16 that gave a wrong answer with exit status 0.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.io import write

from helpers import one_line_error, run_cli as cli
from irrepscope.errors import IrrepscopeError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "quick" / "tiny.yaml")
QUICK = ("--quiet", "--set", "train.epochs=1", "--set", "train.max_train_batches=2")
ANALYSE = ("--quiet", "--embedding", "pca", "--max-molecules", "30", "--map-molecules", "30", "--probe-molecules", "40",
           "--ablation-molecules", "30")  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def irrepscope(*args, **kwargs) -> subprocess.Popen:
    """The CLI in its own process (locks are per process; kill tests need a process to kill)."""
    return subprocess.Popen([sys.executable, "-m", "irrepscope", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs of the same architecture on different splits (seeds 0 and 1)."""
    base = tmp_path_factory.mktemp("integrity")
    for seed in (0, 1):
        assert cli("train", TINY, "--out", str(base / f"seed{seed}"), *QUICK, "--set", f"train.seed={seed}") == 0
    return base / "seed0", base / "seed1"


@pytest.fixture
def run(runs, tmp_path):
    """A fresh copy of the seed-0 run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(runs[0], copy)
    return copy


# -- 1. a run's files pin each other ----------------------------------------------------------


def test_an_edited_split_is_refused_and_test_json_is_kept(run, capsys):
    split = json.loads((run / "split.json").read_text())
    split["test"][:5], split["train"][:5] = split["train"][:5], split["test"][:5]  # swap molecules
    split["test"].sort(), split["train"].sort()
    (run / "split.json").write_text(json.dumps(split))
    before = (run / "test.json").read_bytes()
    one_line_error(capsys, cli("evaluate", str(run)), "split.json")
    assert (run / "test.json").read_bytes() == before
    one_line_error(capsys, cli("train", "--resume", str(run), "--quiet"), "split.json")
    one_line_error(capsys, cli("analyze", str(run), *ANALYSE), "split.json")
    one_line_error(capsys, cli("export", str(run), "--out", str(run.parent / "x")), "split.json")


def test_another_runs_split_or_checkpoint_is_refused(run, runs, capsys):
    other = runs[1]
    shutil.copy(other / "split.json", run / "split.json")
    one_line_error(capsys, cli("evaluate", str(run)), "split.json")
    shutil.copy(runs[0] / "split.json", run / "split.json")
    assert cli("evaluate", str(run)) == 0  # restored: consistent again
    shutil.copy(other / "checkpoints" / "best.pt", run / "checkpoints" / "best.pt")
    one_line_error(capsys, cli("evaluate", str(run)), "best.pt")
    xyz = run.parent / "water.xyz"
    write(xyz, Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    one_line_error(capsys, cli("predict", str(run), str(xyz)), "best.pt")


def test_a_test_json_of_another_checkpoint_is_refused(run, runs, capsys):
    shutil.copy(runs[1] / "test.json", run / "test.json")
    one_line_error(capsys, cli("analyze", str(run), *ANALYSE), "test.json")


def test_a_config_edited_under_a_checkpoint_is_refused(run, capsys):
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("lr: 0.005", "lr: 0.001"))
    one_line_error(capsys, cli("evaluate", str(run)), "train.lr")


# -- 2. one writer per directory --------------------------------------------------------------


def test_a_second_writer_is_refused_at_once(run, tmp_path):
    from irrepscope.locks import lock_run

    before = snapshot(run)
    with lock_run(run, "irrepscope test"):  # this process writes the run
        for args in (["evaluate", str(run)], ["analyze", str(run), *ANALYSE], ["train", "--resume", str(run), "--quiet"],
                     ["prune", str(run)]):  # fmt: skip
            p = irrepscope(*args)
            _, err = p.communicate(timeout=300)
            assert p.returncode == 2 and "being written by irrepscope test" in err and "Traceback" not in err, err
    after = snapshot(run)
    assert after == before  # nothing written, and the lock file is gone with its holder
    assert not (run / ".lock").exists()


def test_two_trainings_into_one_directory(tmp_path):
    out = tmp_path / "x"
    procs = [irrepscope("train", TINY, "--out", str(out), "--quiet", "--set", f"train.seed={s}", "--set", "train.epochs=2")
             for s in (0, 1)]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "being written by" in refused or "already holds a run" in refused, refused
    seed = __import__("yaml").safe_load((out / "config.yaml").read_text())["train"]["seed"]
    assert cli("evaluate", str(out)) == 0  # one run's files, consistent with each other
    assert json.loads((out / "split.json").read_text())["meta"]["seed"] == seed


def test_a_lock_of_a_killed_process_is_taken_over(run):
    p = subprocess.Popen([sys.executable, "-c", f"from irrepscope.locks import lock_run; import time\n"
                          f"with lock_run({str(run)!r}, 'holder'):\n    print('held', flush=True); time.sleep(600)"],
                         env=ENV, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline().strip() == "held"
    p.kill()
    p.wait()
    assert (run / ".lock").exists()  # left behind by kill -9 ...
    assert cli("evaluate", str(run)) == 0  # ... and taken over
    assert not (run / ".lock").exists()


# -- 3. multi-file outputs land whole ---------------------------------------------------------


def test_leftovers_of_a_killed_swap_are_cleaned_or_put_back(tmp_path):
    from irrepscope.atomic import recover_directory, replace_directory, staging_directory

    target = tmp_path / "analysis"
    target.mkdir()
    (target / "usage.json").write_text("old")
    staged = staging_directory(target)
    (staged / "usage.json").write_text("new")
    recover_directory(target)  # killed before the swap: the staged set goes, the old one stays
    assert not staged.exists() and (target / "usage.json").read_text() == "old"
    # Killed between the fallback's two renames: the old set is parked, the target missing.
    old = tmp_path / ".analysis.old-x"
    target.rename(old)
    recover_directory(target)
    assert (target / "usage.json").read_text() == "old" and not old.exists()
    staged = staging_directory(target)
    (staged / "usage.json").write_text("new")
    replace_directory(staged, target)
    assert (target / "usage.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["analysis"]


def test_export_refuses_what_it_would_ignore_and_overwrite(run, tmp_path, capsys):
    out = tmp_path / "export"
    for option in (["--target", "homo"], ["--limit", "10"], ["--seed", "3"]):
        one_line_error(capsys, cli("export", str(run), "--out", str(out), *option), option[0])
    assert not out.exists()
    assert cli("export", str(run), "--out", str(out)) == 0
    first = snapshot(out)
    one_line_error(capsys, cli("export", str(run), "--out", str(out)), "--force")
    assert snapshot(out) == first
    assert cli("export", str(run), "--out", str(out), "--force") == 0
    (out / "notes.txt").write_text("mine")
    one_line_error(capsys, cli("export", str(run), "--out", str(out), "--force"), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


# -- 4. derived results know their inputs ------------------------------------------------------


def test_prune_does_not_act_on_a_partial_or_training_split_analysis(run, capsys):
    for args, why in ((["--orders", "0"], "only orders [0]"), (["--split", "train"], "train split")):
        assert cli("analyze", str(run), *ANALYSE, *args) == 0
        capsys.readouterr()
        assert cli("prune", str(run), "--quiet") == 0
        captured = capsys.readouterr()
        assert why in captured.err, captured.err
        usage = json.loads((run / "analysis" / "usage.json").read_text())
        assert usage["split"] == "test" and usage["analysed_orders"] == [0, 1, 2]
        assert "test structures" in captured.out
    report = (run / "analysis" / "report.html").read_text()
    assert "Made from: the test split" in report and "orders analysed" in report and "threshold" in report


def test_prune_keeps_an_uncertain_order_and_says_so(run, capsys):
    """Issue 18: prune removes only orders that are unused for sure; one whose interval straddles the threshold stays."""
    assert cli("analyze", str(run), *ANALYSE) == 0
    usage = json.loads((run / "analysis" / "usage.json").read_text())
    row = max((r for r in usage["rows"] if r["block"] == "all" and r["order"] != 0),
              key=lambda r: r["ablation_delta_rel_hi"] - r["ablation_delta_rel_lo"])  # fmt: skip
    lo, hi = row["ablation_delta_rel_lo"], row["ablation_delta_rel_hi"]
    assert lo < hi
    capsys.readouterr()
    # a threshold inside the interval: neither used nor unused for sure
    assert cli("prune", str(run), "--quiet", "--threshold", str(max((lo + hi) / 2, 0.0))) == 0
    out = capsys.readouterr().out
    uncertain = [int(v) for v in out.split("note: orders [")[1].split("]")[0].split(",")]
    assert row["order"] in uncertain and "are uncertain" in out and "kept" in out, out
    assert row["order"] in yaml.safe_load((run / "pruned.yaml").read_text())["model"]["orders"]


# -- 5. bad values at every boundary ----------------------------------------------------------


@pytest.mark.parametrize("threshold", [math.nan, -1.0, math.inf])
def test_api_thresholds_are_checked(runs, threshold):
    import irrepscope as irs

    loaded = irs.load_run(runs[0])
    with pytest.raises(IrrepscopeError, match="threshold must be a finite number >= 0"):
        irs.analyze(loaded, max_molecules=10, threshold=threshold, progress=False)


def test_api_arguments_of_the_wrong_kind():
    import irrepscope as irs
    from irrepscope.api import split_indices

    with pytest.raises(IrrepscopeError, match="must be a path"):
        irs.load_run(42)
    with pytest.raises(IrrepscopeError, match="analyze_run"):
        irs.analyze("runs/demo")
    with pytest.raises(IrrepscopeError, match="max_molecules must be a positive integer"):
        split_indices({"test": np.arange(3)}, "test", -1, 0, "x")


def test_absurd_labels_and_coordinates_are_refused(tmp_path, run, capsys):
    from irrepscope.data.xyz import read_extxyz

    frames = [Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) for _ in range(3)]
    for k, a in enumerate(frames):
        a.info["energy"] = -2000.0 - k
    path = tmp_path / "absurd.extxyz"
    write(path, frames, format="extxyz")
    assert len(read_extxyz([path])[0]) == 3  # GFN2-xTB-like total energies of water pass
    for absurd in (-1e30, -1e7):  # -1e7 eV on a water molecule: under a per-atom 1e7 bound, still absurd
        frames[1].info["energy"] = absurd
        write(path, frames, format="extxyz")
        with pytest.raises(IrrepscopeError, match="ten times the total energy of its atoms"):
            read_extxyz([path])
    frames[1].info["energy"] = -2000.0
    frames[2].arrays["forces"] = np.array([[0.0, 0, 0], [1e6, 0, 0], [0, 0, 0]])
    for a in frames[:2]:
        a.arrays["forces"] = np.zeros((3, 3))
    write(path, frames, format="extxyz")
    with pytest.raises(IrrepscopeError, match="beyond 1e"):
        read_extxyz([path])
    far = tmp_path / "far.xyz"
    write(far, Atoms("OH2", positions=np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) + 1e200))
    one_line_error(capsys, cli("predict", str(run), str(far)), "beyond")
    periodic = tmp_path / "cell.extxyz"
    write(periodic, Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[5, 5, 5], pbc=True))
    one_line_error(capsys, cli("predict", str(run), str(periodic)), "periodic")
    cif = tmp_path / "cell.cif"
    write(cif, Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[5, 5, 5], pbc=True))
    one_line_error(capsys, cli("predict", str(run), str(cif)), "periodic")


def test_overlap_is_found_by_geometry_not_only_by_index(qm9):
    from irrepscope.api import _check_disjoint
    from irrepscope.data.structures import QM9_INDEX, Structures

    parts = []
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    for i in (100, 200, 300):
        z, pos = qm9.structure(i)
        parts.append((z, pos))
    z, pos = qm9.structure(200)
    order = np.random.default_rng(1).permutation(len(z))
    parts.append((z[order], (pos @ rotation.T + 7.5)[order]))  # molecule 200 moved, turned and renumbered
    mols = Structures.from_arrays(parts, {QM9_INDEX: np.full(4, -1)}, {})
    with pytest.raises(IrrepscopeError, match="same geometry"):
        _check_disjoint(mols, np.array([0, 1, 2]), np.array([3]))
    _check_disjoint(mols, np.array([0, 2]), np.array([3]))  # another molecule of any formula is no overlap


def test_duplicate_yaml_keys(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 1\n  lr: 0.1\n  epochs: 5\n")
    one_line_error(capsys, cli("info", str(path)), "duplicate key 'epochs'")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"configs:\n  - config: {TINY}\nseeds: [0]\nseeds: [1]\n")
    one_line_error(capsys, cli("sweep", str(sweep), "--out", str(tmp_path / "o")), "duplicate key 'seeds'")


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: ../../escape\nconfigs:\n  - {config: TINY}\n", "plain file name"),
        ("name: ok\nconfigs:\n  - {name: .., config: TINY}\n", "plain directory name"),
        ("name: ok\nconfigs:\n  - {name: ../x, config: TINY}\n", "plain directory name"),
    ],
)
def test_sweep_names_stay_inside(tmp_path, capsys, text, match):
    path = tmp_path / "inner" / "s.yaml"
    path.parent.mkdir()
    path.write_text(text.replace("TINY", TINY))
    one_line_error(capsys, cli("sweep", str(path), "--out", str(tmp_path / "inner" / "out")), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner"]


def test_sweep_device_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nconfigs:\n  - config: {TINY}\n")
    one_line_error(capsys, cli("sweep", str(path), "--out", str(tmp_path / "out"), "--device", "tpu"), "tpu")
    assert not (tmp_path / "out").exists()


def test_a_second_driver_on_one_sweep_directory_is_refused(tmp_path, capsys):
    from irrepscope.sweeps.runner import lock_sweep
    from irrepscope.training.runs import RunDir

    def sweep_file(epochs):
        path = tmp_path / f"e{epochs}.yaml"
        path.write_text(f"name: s\nconfigs:\n  - config: {TINY}\nseeds: [0]\nset:\n  train.epochs: {epochs}\n"
                        "  train.max_train_batches: 1\n  data.limit: 160\n")  # fmt: skip
        return path

    out = tmp_path / "out"
    with lock_sweep(out):  # a driver is working here (this process): any second one is refused, same spec or not
        for epochs in (1, 2):
            p = irrepscope("sweep", str(sweep_file(epochs)), "--out", str(out), "--quiet")
            _, err = p.communicate(timeout=300)
            assert p.returncode == 2 and err.strip().startswith("error: ") and "\n" not in err.strip(), err
            assert "is being written by irrepscope sweep" in err
        assert not list(out.glob("runs"))  # nothing trained by the refused drivers
    assert not (out / ".sweep.lock").exists()  # removed by the driver on its way out
    assert cli("sweep", str(sweep_file(1)), "--out", str(out), "--quiet") == 0
    # Alone, a sweep of more epochs extends the runs, and --analyze redoes their now stale analyses.
    from irrepscope.api import analysis_current

    (run_dir,) = (out / "runs").glob("*/seed0")
    assert cli("analyze", str(run_dir), *ANALYSE) == 0 and analysis_current(run_dir)
    assert cli("sweep", str(sweep_file(2)), "--out", str(out), "--quiet", "--analyze") == 0
    assert analysis_current(run_dir)
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert [s["start_epoch"] for s in RunDir.at(run_dir).read_sessions()] == [0, 1]  # extended, not retrained


# -- randomized kill -9 of analyze, export and prune -------------------------------------------


def _analysis_whole(folder: Path) -> float:
    """An analysis directory is whole: its csv and report belong to its usage.json; returns its threshold."""
    usage = json.loads((folder / "usage.json").read_text())
    csv_lines = (folder / "usage.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(usage["rows"])
    col = csv_lines[0].split(",").index("verdict")
    assert [line.split(",")[col] for line in csv_lines[1:]] == [r["verdict"] for r in usage["rows"]]
    assert f"threshold {usage['threshold']:.3g}" in (folder / "report.html").read_text()
    return usage["threshold"]


def _export_whole(folder: Path, runs) -> None:
    """An export directory is whole: its three files are the split of the run its export.json names, its E0s their fit."""
    from irrepscope.data.composition import fit_composition
    from irrepscope.data.xyz import read_extxyz

    meta = json.loads((folder / "export.json").read_text())
    split = json.loads((Path(meta["run"]) / "split.json").read_text())
    for name in ("train", "val", "test"):
        mols, _ = read_extxyz([folder / f"{name}.extxyz"])
        assert sorted(mols.properties["index"].astype(int).tolist()) == split[name], (name, meta["run"])
    train, _ = read_extxyz([folder / "train.extxyz"], energy_key="energy")  # MACE's E0s: fitted on this train set
    e0s = json.loads((folder / "mace_E0s.json").read_text())
    fit = fit_composition(train, np.arange(len(train)), "energy").per_element
    assert e0s == pytest.approx({z: fit[int(z)] for z in e0s})


def _no_leftovers(folder: Path) -> None:
    names = [p.name for p in folder.iterdir()]
    assert not [n for n in names if ".staging-" in n or ".old-" in n or n.endswith(".lock")], names


def test_random_kills_leave_the_old_set_or_the_new_one(runs, tmp_path):
    """20 kill -9s at random moments of analyze, export and prune --train: the old set or the new one, and a rerun finishes."""
    rng = np.random.default_rng(16)
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    out = tmp_path / "export"
    startup_s = 4.0  # a fresh process imports torch, e3nn, ASE first (measured: about 4 s on these machines)

    def timed(*args):
        t = time.perf_counter()
        assert cli(*args) == 0
        return startup_s + time.perf_counter() - t

    def kill_during(args, duration):
        p = irrepscope(*args)
        time.sleep(float(rng.uniform(0.3, 1.0)) * duration)  # mostly while it computes and writes
        p.kill()
        p.wait()

    kills = 0
    # analyze: each attempt asks for another threshold, so the old and the new set differ.
    analyze_s = timed("analyze", str(run), *ANALYSE, "--threshold", "0.5")
    for k in range(6):
        old, new = _analysis_whole(run / "analysis"), round(0.01 * (k + 1), 3)
        kill_during(["analyze", str(run), *ANALYSE, "--threshold", str(new)], analyze_s)
        assert _analysis_whole(run / "analysis") in (old, new)
        assert cli("analyze", str(run), *ANALYSE, "--threshold", str(new)) == 0  # the rerun
        assert _analysis_whole(run / "analysis") == new
        _no_leftovers(run)
        kills += 1

    # export: alternate the two runs' splits into one folder (--force), so the old and the new set differ.
    export_s = timed("export", str(runs[1]), "--out", str(out))
    for k in range(11):  # exports are the cheapest to kill: most of the 20
        source = runs[k % 2]
        old = json.loads((out / "export.json").read_text())["run"]
        kill_during(["export", str(source), "--out", str(out), "--force"], export_s)
        _export_whole(out, runs)
        assert json.loads((out / "export.json").read_text())["run"] in (old, str(source))
        assert cli("export", str(source), "--out", str(out), "--force") == 0
        _export_whole(out, runs)
        _no_leftovers(tmp_path)
        kills += 1

    # prune --train: killed while it trains, analyses or compares; the same command then finishes it.
    prune = ["prune", str(run), "--train", "--least-used", "--quiet"]
    prune_s = timed(*prune, "--out", str(tmp_path / "pruned"))
    for k in range(3):
        pruned = tmp_path / f"pruned{k}"
        kill_during([*prune, "--out", str(pruned)], prune_s)
        if (pruned / "comparison").exists():
            assert sorted(f.name for f in (pruned / "comparison").iterdir()) == ["comparison.json", "comparison.md"]
        assert cli(*prune, "--out", str(pruned)) == 0
        comp = json.loads((pruned / "comparison" / "comparison.json").read_text())
        assert comp["pruned"]["orders"] != comp["original"]["orders"]
        _no_leftovers(pruned)
        kills += 1
    assert kills >= 20


def test_a_key_set_twice_on_the_command_line(capsys):
    one_line_error(capsys, cli("info", TINY, "--set", "train.epochs=1", "--set", "train.epochs=2"), "train.epochs is given twice")


def test_a_legacy_checkpoint_with_another_runs_split(run, runs, capsys):
    """Checkpoints written before pins: the split's own record (seed, limit, fractions) must match the config."""
    import torch

    for which in ("best", "last"):
        path = run / "checkpoints" / f"{which}.pt"
        state = torch.load(path, weights_only=True)
        del state["pins"]
        torch.save(state, path)
    (run / "test.json").write_text(json.dumps({k: v for k, v in json.loads((run / "test.json").read_text()).items() if k != "pins"}))
    assert cli("evaluate", str(run)) == 0  # unpinned files are taken as they are...
    shutil.copy(runs[1] / "split.json", run / "split.json")
    one_line_error(capsys, cli("evaluate", str(run)), "seed 1 (split.json) vs 0")  # ...but not another seed's split


def test_outputs_never_delete_what_they_did_not_write(run, tmp_path, capsys, monkeypatch):
    (run / "analysis").mkdir(exist_ok=True)
    (run / "analysis" / "NOTES.md").write_text("mine")
    one_line_error(capsys, cli("analyze", str(run), *ANALYSE), "NOTES.md")
    assert (run / "analysis" / "NOTES.md").read_text() == "mine"
    (run / "analysis" / "NOTES.md").unlink()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("mine")
    one_line_error(capsys, cli("train", TINY, "--out", str(other), *QUICK), "data.csv")  # no run mixed into a folder
    assert sorted(p.name for p in other.iterdir()) == ["data.csv"]
    # Through a symlink and as ".": the folder behind is replaced, the link stays, nothing is left over.
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert cli("export", str(run), "--out", str(tmp_path / "link")) == 0
    assert (tmp_path / "link").is_symlink() and (real / "test.extxyz").is_file()
    assert cli("export", str(run), "--out", str(tmp_path / "link"), "--force") == 0
    _no_leftovers(tmp_path)
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert cli("export", str(run), "--out", ".") == 0
    assert sorted(p.name for p in empty.iterdir()) == ["export.json", "mace_E0s.json", "test.extxyz", "train.extxyz", "val.extxyz"]


def test_an_interrupted_resume_leaves_a_stale_test_json(run, capsys):
    """best.pt changed, test.json not yet: export (which does not read test.json) works, analyze says why it refuses."""
    import torch

    path = run / "checkpoints" / "best.pt"
    state = torch.load(path, weights_only=True)
    state["best_epoch"] = 99  # another best.pt of the same run, as an extended training writes it
    torch.save(state, path)
    assert cli("export", str(run), "--out", str(run.parent / "exported")) == 0
    one_line_error(capsys, cli("analyze", str(run), *ANALYSE), "interrupted")
    assert cli("evaluate", str(run)) == 0  # the remedy the message names
    assert cli("analyze", str(run), *ANALYSE) == 0


def test_prune_through_a_symlink_takes_its_own_lock_once(run, tmp_path):
    """prune holds the run's lock and analyses inside it: the same lock, however the run is named."""
    shutil.rmtree(run / "analysis", ignore_errors=True)
    (tmp_path / "alias").symlink_to(run)
    assert cli("prune", str(tmp_path / "alias"), "--quiet") == 0
    assert (run / "pruned.yaml").is_file() and (run / "analysis" / "usage.json").is_file()
    assert not (run / ".lock").exists()
