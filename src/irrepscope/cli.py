"""Command-line interface: ``irrepscope info | train | evaluate | predict | analyze | sweep | prune | export | sample-xtb |
sample-crystals``.

Bad input raises :class:`IrrepscopeError`; :func:`main` prints it as one line on stderr
and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from irrepscope.analysis.runner import ABLATION_MOLECULES, BATCH_SIZE, MAP_MOLECULES, PROBE_MOLECULES
from irrepscope.analysis.bootstrap import LEVEL, RESAMPLES
from irrepscope.analysis.usage import THRESHOLD
from irrepscope.config import load_config
from irrepscope.errors import IrrepscopeError

def _unique_keys(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Click callback: a key set twice is an error, as in a YAML file (which value was meant?)."""
    keys = [item.partition("=")[0].strip() for item in value]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise IrrepscopeError(f"--set {twice[0]} is given twice; give each key once")
    return value


set_option = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", callback=_unique_keys,
    help="Override a config value (repeatable, each key once).",
)  # fmt: skip


def _finite_fraction(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Click callback: a threshold must be a finite number >= 0 (NaN would silently declare every order unused)."""
    from irrepscope.analysis.usage import check_threshold

    return None if value is None else check_threshold(value, f"--{param.name}")


def _level(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Click callback: a confidence level lies strictly between 0 and 1."""
    if not 0 < value < 1:
        raise IrrepscopeError(f"--{param.name} must lie strictly between 0 and 1, got {value}")
    return value


def _uncertain_note(result: dict) -> str:
    """``; uncertain orders [..] (kept)`` where some order's interval straddles the threshold, else empty."""
    uncertain = result.get("uncertain_orders") or []
    return f"; uncertain orders {uncertain} (kept: their interval straddles the threshold)" if uncertain else ""


def _count(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """Click callback: molecule counts and batch sizes are positive."""
    if value is not None and value <= 0:
        raise IrrepscopeError(f"--{param.name.replace('_', '-')} must be a positive integer, got {value}")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="irrepscope")
def cli() -> None:
    """Train equivariant graph networks on QM9 and measure which spherical-harmonic orders they use."""


@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info(config_path: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Describe the model a config builds: parameters, orders, irreps, paths."""
    from irrepscope.model.network import build_run_model

    config = load_config(config_path, overrides)
    model = build_run_model(config)
    summary = {
        "params": model.num_parameters(),
        "orders": config.model.orders,
        "irreps": str(model.irreps_hidden),
        "hidden_mul": config.model.hidden_mul,
        "num_blocks": config.model.num_blocks,
        "paths_per_block": [len(b.tp.instructions) for b in model.blocks],
        "backend": config.model.backend,
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        for key, value in summary.items():
            click.echo(f"{key:>16}: {value}")


@cli.command()
@click.argument("config_path", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@set_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(config_path: str | None, out: str | None, resume_dir: str | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Train CONFIG_PATH into --out, or continue an interrupted run with --resume RUN_DIR."""
    from irrepscope.training import trainer

    if resume_dir:
        if config_path or out:
            raise IrrepscopeError("--resume takes only the run directory (and optional --set), not a config or --out")
        test = trainer.resume(resume_dir, overrides, progress=not quiet)
    else:
        if not config_path or not out:
            raise IrrepscopeError("train needs CONFIG_PATH and --out RUN_DIR (or --resume RUN_DIR)")
        test = trainer.train(load_config(config_path, overrides), out, progress=not quiet)
    vector = "component_mae" in test  # a vector or tensor target: the error of a molecule is its error vector's length
    click.echo(
        f"test MAE {test['mae_ev']:.4f} {test['unit']}{' (length of the error vector)' if vector else ''}, "
        f"RMSE {test['rmse_ev']:.4f} {test['unit']} over {test['n']} molecules; "
        + (f"per component {test['component_mae']:.4f}, length error {test['norm_mae']:.4f}; zero baseline " if vector else
           "composition baseline on the same molecules: ")
        + f"MAE {test['baseline_mae_ev']:.4f} {test['unit']}"
    )


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--device", default="cpu", show_default=True)
def evaluate(run_dir: str, split: str, checkpoint: str, device: str) -> None:
    """Recompute a run's metrics on its own saved split (writes test.json for the test split)."""
    from irrepscope.locks import lock_run
    from irrepscope.training.evaluate import evaluate_run
    from irrepscope.training.runs import RunDir

    if split == "test" and checkpoint == "best":  # writes test.json: one writer at a time
        with lock_run(run_dir, "irrepscope evaluate"):
            metrics = evaluate_run(run_dir, split, checkpoint, device)
            RunDir.at(run_dir).write_test(metrics)
    else:
        metrics = evaluate_run(run_dir, split, checkpoint, device)
    click.echo(json.dumps(metrics))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("structures", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
def predict(run_dir: str, structures: str, as_json: bool, checkpoint: str) -> None:
    """Predict the run's target (and, for energies, the forces -dE/dx) for every structure of an .xyz/.extxyz file."""
    from irrepscope.training.predict import predict_file

    results = predict_file(run_dir, structures, checkpoint)
    for r in results:
        for note in r["warnings"]:
            click.echo(f"warning: molecule {r['index']}: {note}", err=True)
    if as_json:
        click.echo(json.dumps(results))
    else:
        for r in results:
            value = r["prediction"]
            shown = " ".join(f"{v:.4f}" for v in value) if isinstance(value, list) else f"{value:.4f}"
            click.echo(f"{r['index']:>5}  {r['formula']:<12} {shown} {r['unit']}")
            for k, f in enumerate(r.get("forces", [])):
                click.echo(f"       atom {k:>3}  force {f[0]:10.4f} {f[1]:10.4f} {f[2]:10.4f} {r['force_unit']}")


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), help="Sweep directory [default: runs/sweeps/NAME].")
@click.option("--workers", default=1, show_default=True, help="Runs trained in parallel (processes).")
@click.option("--device", default=None, help="Train every run on this device (cpu, cuda, cuda:1, auto) [default: the configs'].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--analyze", is_flag=True, help="Also analyse every finished run that has no analysis yet (order usage per seed in the summary)."
)
@click.option("--ray", "use_ray", is_flag=True, help="Train every run as a task on a local Ray cluster started for this sweep.")
@click.option("--ray-address", default=None, help="Join a running Ray cluster instead (auto, or HOST:PORT of its head).")
@click.option("--cpus-per-run", type=float, default=1.0, show_default=True, help="With Ray: CPUs each run declares (and its torch threads).")
@click.option("--gpus-per-run", type=float, default=0.0, show_default=True, help="With Ray: GPUs each run declares; 0.25 packs 4 runs on a GPU.")
@click.option("--ray-retries", type=int, default=3, show_default=True, help="With Ray: reruns of a run whose worker or node died (each resumes it).")
def sweep(
    sweep_file: str, out: str | None, workers: int, device: str | None, quiet: bool, analyze: bool, use_ray: bool,
    ray_address: str | None, cpus_per_run: float, gpus_per_run: float, ray_retries: int,
) -> None:  # fmt: skip
    """Run a grid of configurations x seeds; re-running skips finished runs, resumes interrupted ones and retries failed ones.

    A failing run (diverged, corrupt checkpoint) does not stop the others: it is listed in the
    report, and the command exits with status 2 after writing it. With --ray or --ray-address
    every run is a Ray task; a run whose worker dies is retried by Ray and resumed from its
    last checkpoint. One driver per sweep directory: a second one is refused.
    """
    from irrepscope.report.sweep import write_sweep_report
    from irrepscope.api import analyze_sweep
    from irrepscope.sweeps.runner import run_sweep
    from irrepscope.sweeps.spec import load_sweep

    engine = None
    if use_ray or ray_address:
        from irrepscope.sweeps.ray_engine import ray_engine

        if workers != 1:
            raise IrrepscopeError("--workers is for sweeps without Ray; with Ray, --cpus-per-run sets how many runs share the CPUs")
        engine = ray_engine(ray_address, cpus_per_run, gpus_per_run, ray_retries)
    elif (cpus_per_run, gpus_per_run, ray_retries) != (1.0, 0.0, 3):
        raise IrrepscopeError("--cpus-per-run, --gpus-per-run and --ray-retries need --ray or --ray-address")
    spec = load_sweep(sweep_file, device=device)
    out_dir = Path(out or Path("runs") / "sweeps" / spec.name)
    counts = run_sweep(spec, out_dir, workers=workers, progress=not quiet, engine=engine)
    if analyze:
        counts["analysed"] = analyze_sweep(spec, out_dir, progress=not quiet)
    paths = write_sweep_report(spec, out_dir)
    click.echo(", ".join(f"{n} {k}" for k, n in counts.items()))
    click.echo(f"wrote {', '.join(str(p) for p in paths)}")
    if counts.get("failed"):
        raise IrrepscopeError(f"{counts['failed']} of {len(spec.runs)} runs failed; their errors are in {paths[0]}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--train", "do_train", is_flag=True, help="Train the pruned config with the same budget and seed, then compare.")
@click.option("--out", "out", type=click.Path(file_okay=False), help="Pruned run directory [default: RUN_DIR-pruned].")
@click.option("--threshold", type=float, default=None, callback=_finite_fraction, help="Re-decide the verdicts with this threshold [default: the analysis's].")
@click.option("--least-used", is_flag=True, help="Prune exactly one order: the one whose removal raises the MAE least.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prune(run_dir: str, do_train: bool, out: str | None, threshold: float | None, least_used: bool, quiet: bool) -> None:
    """Write RUN_DIR/pruned.yaml without the orders the analysis found unused; --train trains and compares it.

    The verdicts come from the run's analysis of best.pt on its test split with every order
    analysed (else the run is analysed first, with a note saying why). An interrupted
    --train is resumed by running the same command again.
    """
    from irrepscope.atomic import atomic_write_text
    from irrepscope.locks import lock_run
    from irrepscope.sweeps import prune as p
    from irrepscope.training.runs import RunDir

    if least_used and threshold is not None:
        raise IrrepscopeError("--least-used and --threshold exclude each other")
    if out is not None and not do_train:
        raise IrrepscopeError("--out is where --train trains the pruned run; without --train nothing is written there")
    original = RunDir.at(run_dir).require()
    with lock_run(original.root, "irrepscope prune"):
        usage = p.current_usage(run_dir, progress=not quiet)
        rule = f"threshold {usage['threshold']:.3g} of the analysis"
        uncertain = usage.get("uncertain_orders") or []
        if threshold is not None:
            (usage["unused_orders"], uncertain), rule = p.decide_at(usage, threshold), f"threshold {threshold:.3g}"
        elif least_used:
            usage["unused_orders"], rule = p.least_used(usage), "the least used order"
        config = p.pruned_config(run_dir, usage)
        target = Path(run_dir) / "pruned.yaml"
        atomic_write_text(target, config.to_yaml())
    before = original.load_config().model.orders
    click.echo(
        f"orders {before} -> {config.model.orders} (unused: {usage['unused_orders']}; from the analysis of best.pt on "
        f"{usage['n_molecules']} test structures, {rule}); wrote {target}"
    )
    if uncertain and not least_used:
        click.echo(
            f"note: orders {uncertain} are uncertain (the interval of their effect straddles the threshold on these "
            "structures) and are kept; analyse more structures to decide them, or --least-used to prune one anyway"
        )
    if not do_train:
        return
    if config.model.orders == before:
        click.echo("nothing to prune: every order is used; not training")
        return
    out_dir = Path(out) if out else Path(str(Path(run_dir).resolve()) + "-pruned")
    outcome = p.train_pruned(config, out_dir, progress=not quiet)
    if outcome == "kept":
        click.echo(f"{out_dir} already holds the trained pruned run: kept")
    with lock_run(out_dir, "irrepscope prune"):
        p.current_usage(out_dir, progress=not quiet)
        comp = p.write_comparison(run_dir, out_dir)
    click.echo(p.comparison_markdown(comp), nl=False)
    click.echo(f"wrote {out_dir / p.COMPARISON} (comparison.json, comparison.md)")


def _order_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        orders = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise IrrepscopeError(f"--orders must be comma-separated integers, got {value!r}") from None
    if not orders:
        raise IrrepscopeError("--orders is empty; give comma-separated orders such as 0,2 (or leave it out for all)")
    return orders


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--molecules", type=click.Path(), default=None,
              help="For a NequIP (.ckpt/.nequip.zip) or MACE (.model) model: the irrepscope run whose saved split and target to use, "
                   "or a structure file (extxyz) with energies.")
@click.option("--train-molecules", type=click.Path(dir_okay=False), default=None,
              help="With a structure file: the file the model was trained on (composition baseline and probes are fit on it).")
@click.option("--energy-key", default="energy", show_default=True, help="With structure files: the frames' energy key (eV).")
@click.option("--forces-key", default="forces", show_default=True, help="With structure files: the frames' forces key (eV/Å), where present.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="For a NequIP, MACE or SevenNet model: where to write [default: analysis/ beside the model; runs/sevenn/NAME/analysis].")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--max-molecules", type=int, default=None, callback=_count,
              help="Analyse a seeded random subset of N molecules of the split (SevenNet: at most N of each --structures).")
@click.option("--embedding", type=click.Choice(["phate", "umap", "pca"]), default="phate", show_default=True)
@click.option("--orders", "orders", default=None, metavar="0,2,...", help="Analyse only these orders (default: all).")
@click.option("--map-molecules", type=int, callback=_count, default=MAP_MOLECULES, show_default=True, help="Structures drawn in the latent maps (seeded subset).")
@click.option("--probe-molecules", type=int, callback=_count, default=PROBE_MOLECULES, show_default=True, help="Training molecules the linear probes are fit on.")
@click.option("--ablation-molecules", type=int, callback=_count, default=ABLATION_MOLECULES, show_default=True, help="Structures (seeded subset) that every ablation and grad x input are measured on.")
@click.option("--threshold", type=float, default=THRESHOLD, callback=_finite_fraction, show_default=True, help="Unused: zeroing raises the MAE by less than this fraction of the model's MAE.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--batch-size", type=int, default=None, callback=_count, help=f"Structures per batch [default: {BATCH_SIZE}; 8 for SevenNet].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--structures", multiple=True, metavar="FILE|SET",
              help="For a SevenNet model: a structure file (extxyz, cells welcome) or a shipped set (qm9_xtb, crystals); repeatable.")
@click.option("--modal", default=None, help="For a multi-fidelity SevenNet model (7net-mf-0): its fidelity, e.g. PBE.")
@click.option("--energy-threshold", type=float, default=None, callback=_finite_fraction,
              help="For a SevenNet model: used when zeroing changes the energy by at least this (eV/atom) [default: 0.001].")
@click.option("--force-threshold", type=float, default=None, callback=_finite_fraction,
              help="For a SevenNet model: ... or the forces by at least this fraction of their mean |F| [default: 0.01].")
@click.option("--resamples", type=int, callback=_count, default=RESAMPLES, show_default=True,
              help="Bootstrap resamples for the intervals of every usage number.")
@click.option("--level", type=float, default=LEVEL, callback=_level, show_default=True, help="Confidence level of the intervals.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def analyze(
    run_dir: str,
    molecules: str | None,
    train_molecules: str | None,
    energy_key: str,
    forces_key: str,
    out: str | None,
    split: str,
    max_molecules: int | None,
    embedding: str,
    orders: str | None,
    map_molecules: int,
    probe_molecules: int,
    ablation_molecules: int | None,
    threshold: float,
    checkpoint: str,
    batch_size: int | None,
    device: str,
    structures: tuple[str, ...],
    modal: str | None,
    energy_threshold: float | None,
    force_threshold: float | None,
    resamples: int,
    level: float,
    quiet: bool,
) -> None:
    """Measure which orders a trained run uses; write RUN_DIR/analysis/ (usage.csv, usage.json, plots, report.html).

    RUN_DIR may also be a trained NequIP model (.ckpt or .nequip.zip) or MACE model (.model, in MACE's
    environment) with --molecules RUN, or with --molecules FILE.extxyz --train-molecules TRAIN.extxyz; or a SevenNet model (a pretrained name
    such as 7net-0, or a .pth checkpoint) with --structures FILE|SET, measured against itself.
    """
    from irrepscope.analysis.mace_model import SUFFIX as MACE_SUFFIX
    from irrepscope.analysis.mace_model import is_mace_model
    from irrepscope.analysis.sevenn_model import is_sevenn_model
    from irrepscope.api import analyze_mace, analyze_nequip, analyze_run, analyze_sevenn

    sevenn_only = {"--structures": bool(structures), "--modal": modal is not None,
                   "--energy-threshold": energy_threshold is not None, "--force-threshold": force_threshold is not None}  # fmt: skip
    if is_sevenn_model(run_dir) and not run_dir.endswith(".nequip.pth"):
        if not structures:
            raise IrrepscopeError(f"analysing SevenNet model {run_dir} needs --structures FILE|SET (e.g. crystals, qm9_xtb)")
        if molecules is not None or train_molecules is not None or energy_key != "energy":
            raise IrrepscopeError("--molecules, --train-molecules and --energy-key are for NequIP and MACE models; SevenNet takes --structures")
        result = analyze_sevenn(
            run_dir, list(structures), out, modal=modal, forces_key=forces_key, max_structures=max_molecules, orders=_order_list(orders),
            batch_size=batch_size or 8, progress=not quiet, resamples=resamples, level=level,
            **({"energy_threshold": energy_threshold} if energy_threshold is not None else {}),
            **({"force_threshold": force_threshold} if force_threshold is not None else {}),
        )  # fmt: skip
        alls = ", ".join(
            f"l={r['order']}: {100 * r['force_change_rel']:.3g} %" for r in result["rows"] if r["block"] == "all"
        )
        click.echo(
            f"{result['model']} on {result['n_structures']} structures: force change when an order is zeroed after every block "
            f"(of mean |F| {result['mean_force']:.3g} eV/Å): {alls}; unused orders {result['unused_orders']}"
            + _uncertain_note(result)
        )
        return
    given = [name for name, on in sevenn_only.items() if on]
    if given:
        raise IrrepscopeError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for SevenNet models (7net-0, ..., or a .pth checkpoint)")
    batch_size = batch_size or BATCH_SIZE
    if Path(run_dir).is_file() or run_dir.endswith((".ckpt", ".zip", ".pth", ".pt2", MACE_SUFFIX)):
        family, analyze_file = ("MACE", analyze_mace) if is_mace_model(run_dir) else ("NequIP", analyze_nequip)
        if molecules is None:
            raise IrrepscopeError(
                f"analysing a {family} model needs --molecules RUN_DIR (the run whose split and target to use) "
                "or --molecules FILE.extxyz --train-molecules TRAIN.extxyz"
            )
        result = analyze_file(
            run_dir, molecules, split, max_molecules, out, train_molecules=train_molecules, energy_key=energy_key, forces_key=forces_key,
            embedding=embedding, orders=_order_list(orders),
            map_molecules=map_molecules, probe_molecules=probe_molecules, ablation_molecules=ablation_molecules,
            threshold=threshold, batch_size=batch_size, progress=not quiet, resamples=resamples, level=level,
        )  # fmt: skip
        click.echo(
            f"MAE {result['model_mae']:.4f} {result['unit']} (composition baseline {result['baseline_mae']:.4f}) on "
            f"{result['n_molecules']} {result['split']} molecules; unused orders {result['unused_orders']}" + _uncertain_note(result)
        )
        return
    if molecules is not None or out is not None or train_molecules is not None or (energy_key, forces_key) != ("energy", "forces"):
        raise IrrepscopeError(
            "--molecules, --train-molecules, --out, --energy-key and --forces-key are for NequIP and MACE models (a run reads its "
            "own data.source with its own keys); a run is analysed into RUN_DIR/analysis/"
        )
    result = analyze_run(
        run_dir,
        split=split,
        max_molecules=max_molecules,
        embedding=embedding,
        orders=_order_list(orders),
        map_molecules=map_molecules,
        probe_molecules=probe_molecules,
        ablation_molecules=ablation_molecules,
        threshold=threshold,
        checkpoint=checkpoint,
        device=device,
        batch_size=batch_size,
        resamples=resamples,
        level=level,
        progress=not quiet,
    )
    click.echo(
        f"MAE {result['model_mae']:.4f} {result['unit']} on {result['n_molecules']} {split} molecules; "
        f"unused orders {result['unused_orders']}{_uncertain_note(result)}; suggested orders {result['suggested_orders']}"
    )
    click.echo(f"wrote {Path(run_dir) / 'analysis'} (usage.csv, usage.json, report.html)")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False), required=False)
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder for train/val/test.extxyz.")
@click.option("--limit", type=int, default=None, callback=_count, help="Without RUN_DIR: a seeded subset of this many molecules.")
@click.option("--seed", type=int, default=None, help="Without RUN_DIR: the subset's and split's seed [default: 0].")
@click.option("--target", default=None, help="Without RUN_DIR: the property written as energy [default: U0_atomization].")
@click.option("--force", is_flag=True, help="Replace an earlier export in --out.")
def export(run_dir: str | None, out: str, limit: int | None, seed: int | None, target: str | None, force: bool) -> None:
    """Write structures as extxyz (train/val/test): a run's own split (with its forces, if any), or a seeded QM9 subset, for other codes."""
    from irrepscope.config import MAX_SEED, DataConfig
    from irrepscope.data.export import export_split
    from irrepscope.data.sources import load_run_structures, load_structures
    from irrepscope.data.split import load_split, random_split
    from irrepscope.training.runs import RunDir

    if run_dir is not None:
        given = [name for name, value in (("--limit", limit), ("--seed", seed), ("--target", target)) if value is not None]
        if given:
            raise IrrepscopeError(f"{', '.join(given)}: a run exports its own split and target; these are for exports without RUN_DIR")
        run = RunDir.at(run_dir).require()
        run.check_checkpoints()  # they were trained on this split (test.json is not exported: not checked)
        config = run.load_config()
        mols = load_run_structures(config.data, run.split)
        split, target = load_split(run.split, len(mols)), config.data.target
        meta = {"run": str(run.root), "split_sha256": run.pins()["split.json"]}
    else:
        target, seed = target or "U0_atomization", 0 if seed is None else seed
        data = DataConfig(target=target, limit=limit)
        data.validate()
        if not 0 <= seed <= MAX_SEED:
            raise IrrepscopeError(f"--seed must be in [0, {MAX_SEED}], got {seed}")
        mols = load_structures(data)
        split = random_split(len(mols), (0.8, 0.1, 0.1), seed=seed, limit=limit)
        meta = {"seed": seed, "limit": limit}
    paths = export_split(mols, split, out, target, force=force, meta=meta)
    click.echo(", ".join(f"{name}: {len(split[name])} structures -> {path}" for name, path in paths.items()))


@cli.command("sample-xtb")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--molecules", type=int, default=None, callback=_count, help="A seeded random subset of this many QM9 molecules [default: 1000].")
@click.option("--qm9-index", type=int, default=None, help="Instead: one QM9 molecule (by its QM9 index) with many frames (the MD17 setting).")
@click.option("--frames", type=int, default=4, callback=_count, show_default=True, help="Frames per molecule.")
@click.option("--every", type=int, default=40, callback=_count, show_default=True, help="MD steps between frames.")
@click.option("--equilibration", type=int, default=100, show_default=True, help="MD steps before the first frame.")
@click.option("--temperature", type=float, default=500.0, show_default=True, help="Langevin temperature (K).")
@click.option("--timestep", "timestep_fs", type=float, default=0.5, show_default=True, help="MD time step (fs).")
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes the subset, the velocities and the Langevin noise.")
@click.option("--workers", type=int, default=1, callback=_count, show_default=True, help="Molecules computed in parallel (processes).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sample_xtb(
    out: str, molecules: int | None, qm9_index: int | None, frames: int, every: int, equilibration: int,
    temperature: float, timestep_fs: float, seed: int, workers: int, quiet: bool,
) -> None:  # fmt: skip
    """Label QM9 molecules off equilibrium with GFN2-xTB energies and forces (Langevin MD, ASE, tblite) into OUT.extxyz[.gz].

    Seeded (the same command writes the same bytes), resumable after a kill (OUT.parts/), parallel over molecules.
    """
    from irrepscope.data.xtb_md import sample_md

    result = sample_md(
        out, molecules=molecules, qm9_index=qm9_index, frames=frames, every=every, equilibration=equilibration,
        temperature=temperature, timestep_fs=timestep_fs, seed=seed, workers=workers, progress=not quiet,
    )  # fmt: skip
    skipped = f"; skipped {len(result.skipped)} molecules (see {result.sidecar})" if result.skipped else ""
    click.echo(f"wrote {result.frames} frames of {len(result.molecules)} molecules to {result.path}{skipped}")


@cli.command("sample-crystals")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--model", default="7net-0", show_default=True, help="The SevenNet potential that drives the MD (a pretrained name or .pth).")
@click.option("--temperature", "temperatures", type=float, multiple=True, help="Langevin temperature (K), repeatable [default: 300 and 1000].")
@click.option("--frames", type=int, default=2, callback=_count, show_default=True, help="Frames per crystal and temperature.")
@click.option("--every", type=int, default=10, callback=_count, show_default=True, help="MD steps (1 fs) between frames.")
@click.option("--equilibration", type=int, default=20, show_default=True, help="MD steps before the first frame.")
@click.option("--crystal", "crystals", multiple=True, help="Only these crystals (repeatable; e.g. Si, NaCl) [default: all twelve].")
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes the rattle, the velocities and the Langevin noise.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sample_crystals(
    out: str, model: str, temperatures: tuple[float, ...], frames: int, every: int, equilibration: int,
    crystals: tuple[str, ...], seed: int, quiet: bool,
) -> None:  # fmt: skip
    """Sample rattled crystals (covalent, metallic, ionic; 32-64 atoms) by Langevin MD with a SevenNet potential into OUT.extxyz.gz.

    Unlabelled frames with their class, crystal, temperature and seed; the same command writes the same bytes.
    """
    from irrepscope.data.crystals import sample_crystals as sample

    path = sample(
        out, model=model, temperatures=temperatures or (300.0, 1000.0), frames=frames, every=every,
        equilibration=equilibration, seed=seed, crystals=list(crystals) or None, progress=not quiet,
    )  # fmt: skip
    click.echo(f"wrote {path} ({path}.json holds the parameters)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``irrepscope`` console script."""
    try:
        cli.main(args=argv, prog_name="irrepscope", standalone_mode=False)
    except IrrepscopeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # Usage errors (unknown option, bad value, a file where a folder is wanted): one line, status 2.
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except OSError as exc:
        # The environment refused (read-only folder, full disk, ...): say what and where, keep what is written.
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error: cannot access{where}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
