"""The training loop: AdamW on the MSE of the standardised target (and of the forces), resumable.

Force fields (``train.force_weight > 0``): the forces are the exact negative gradient of
the predicted energy with respect to the positions, and the loss adds their mean squared
error per component over the training forces' RMS (a scale recomputed from the training
split, so a resume gets the same one); the best epoch is the one with the lowest
validation loss (the same weighted sum, on the validation split).

The published recipe standardises the molecule-level target. With ``data.reference:
per_element`` the per-element reference (a least-squares fit on the training split's
element counts) is subtracted first and added back in every prediction. Options
practitioners use for these models: a learning-rate warm-up, a cosine or
reduce-on-plateau schedule, and an exponential moving average (EMA) of the weights
that is what gets validated, saved and evaluated (as NequIP and MACE do).

Batch order is a pure function of (seed, epoch), and the schedule's and the EMA's state
live in the checkpoint, so a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from irrepscope.atomic import atomic_write_json
from irrepscope.config import Config, TrainConfig, recipe_differences
from irrepscope.data.batching import iterate_batches
from irrepscope.data.composition import baseline_errors, baseline_name, fit_composition, force_baseline_errors, unit_of
from irrepscope.data.multipoles import is_equivariant
from irrepscope.data.sources import check_source, load_structures, source_fingerprint, split_groups
from irrepscope.data.split import load_split, random_split, save_split
from irrepscope.data.structures import FORCES, Structures, refuse_periodic
from irrepscope.errors import IrrepscopeError
from irrepscope.locks import lock_run
from irrepscope.model.network import EquivariantGraphConv, build_run_model, energy_and_forces
from irrepscope.training.evaluate import evaluate_run, predict_all, regression_metrics, resolve_device, torch_dtype
from irrepscope.training.runs import RunDir, checkpoint_config, load_checkpoint, save_checkpoint


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)


def learning_rate(config: Config, epoch: float, plateau_scale: float = 1.0) -> float:
    """Learning rate at fractional epoch ``epoch`` (0-based; steps count in fractions of an epoch).

    ``none``: constant (published); ``cosine``: to zero at ``train.epochs``; ``plateau``:
    ``lr x plateau_scale`` (lowered by the trainer when validation stalls). A warm-up
    multiplies any of them by ``min(1, epoch / warmup_epochs)``.
    """
    t = config.train
    lr = t.lr
    if t.schedule == "cosine":
        lr = t.lr * 0.5 * (1 + math.cos(math.pi * min(epoch, t.epochs) / t.epochs))
    elif t.schedule == "plateau":
        lr = t.lr * plateau_scale
    if t.warmup_epochs > 0:
        lr *= min(1.0, epoch / t.warmup_epochs)
    return lr


def after_validation(progress: dict[str, Any], val_mae: float, epoch: int, config: Config) -> bool:
    """Record epoch ``epoch``'s validation MAE in ``progress``; True when it is a new best.

    Reduce-on-plateau: when ``plateau_patience`` epochs have passed since the last new
    best (or the last reduction), the learning-rate scale is multiplied by ``plateau_factor``.
    """
    if val_mae < progress["best_val_mae"]:
        progress.update(best_val_mae=val_mae, best_epoch=epoch, plateau_since=epoch)
        return True
    t = config.train
    if t.schedule == "plateau" and epoch - progress["plateau_since"] > t.plateau_patience:
        progress.update(plateau_scale=progress["plateau_scale"] * t.plateau_factor, plateau_since=epoch)
    return False


def check_resumable(saved: Config, given: Config, done_epochs: int, where: Path) -> None:
    """A resume continues the run's own recipe: only a longer ``train.epochs``, the device and threads may differ."""
    changed = recipe_differences(saved, given)
    if changed:
        raise IrrepscopeError(f"cannot resume {where} with a changed recipe: {', '.join(changed)}; only train.epochs may grow")
    if given.train.schedule == "cosine" and given.train.epochs != saved.train.epochs:
        print(
            f"note: the cosine schedule of {where} is stretched from {saved.train.epochs} to {given.train.epochs} epochs: "
            f"the remaining epochs follow the cosine over {given.train.epochs} epochs, so the learning rate first rises "
            f"from {learning_rate(saved, done_epochs):.3g} to {learning_rate(given, done_epochs):.3g}",
            file=sys.stderr,
        )


def _rms(values: np.ndarray) -> float:
    """One scale for all components of a vector or tensor target (a per-component scale would break equivariance)."""
    return float(np.sqrt(np.mean(np.asarray(values) ** 2)))


def init_source(train: TrainConfig) -> str:
    """``train.init_from`` with ``{seed}`` replaced by ``train.seed``."""
    return train.init_from.replace("{seed}", str(train.seed))


TRUNK = ("embedding.", "blocks.")  # what fine-tuning takes from another run: everything before the heads


def init_trunk(model: EquivariantGraphConv, config: Config, split: dict[str, np.ndarray]) -> None:
    """Load the embedding and blocks of ``config.train.init_from``'s best.pt into ``model`` (heads stay fresh).

    The source must have the same trunk, and must not have trained on this run's test
    molecules (that would leak them into the fine-tuned model's test error).
    """
    source = RunDir.at(init_source(config.train))
    if not source.checkpoint("best").is_file():
        raise IrrepscopeError(f"train.init_from: {source.root} has no checkpoints/best.pt (train it first)")
    state = load_checkpoint(source.checkpoint("best"))
    theirs = checkpoint_config(state, source.checkpoint("best"))
    keys = ("orders", "hidden_mul", "num_blocks", "num_basis", "cutoff", "embedding_dim", "num_elements",
            "radial_hidden", "aggregation_norm", "radial_envelope")  # fmt: skip
    if theirs.data.source != config.data.source:
        raise IrrepscopeError(
            f"train.init_from: {source.root} trained on data.source {theirs.data.source}, this run on {config.data.source}: "
            "their splits index different structures"
        )
    differ = [k for k in keys if getattr(theirs.model, k) != getattr(config.model, k)]
    if differ:
        raise IrrepscopeError(f"train.init_from: {source.root}'s model differs in {', '.join('model.' + k for k in differ)}")
    if not source.split.is_file():
        raise IrrepscopeError(f"train.init_from: {source.root} has no split.json, so its molecules cannot be checked")
    theirs_split = load_split(source.split)
    # Its training molecules shaped the trunk and its validation molecules chose best.pt.
    leaked = np.intersect1d(np.concatenate([theirs_split["train"], theirs_split["val"]]), split["test"])
    if len(leaked):
        raise IrrepscopeError(
            f"train.init_from: {source.root} trained on or validated with {len(leaked)} of this run's test molecules; "
            "use the same data.limit and train.seed (the same split)"
        )
    # Loaded part by part: a partial load of the whole model would run its load hooks (which
    # fill a missing per-element reference with zeros) over this run's fresh statistics.
    for part in TRUNK:
        sub = {k[len(part):]: v for k, v in state["model"].items() if k.startswith(part)}
        try:
            getattr(model, part.rstrip(".")).load_state_dict(sub)
        except RuntimeError as exc:
            raise IrrepscopeError(f"train.init_from: {source.root}'s {part.rstrip('.')} does not fit: {str(exc).splitlines()[0]}") from None


def _milli(value: float, unit: str) -> str:
    """An error for the epoch line: in meV for energies (metrics.csv's *_mev columns hold 1000 x the target unit)."""
    return f"{1000 * value:.1f} meV" if unit == "eV" else f"{value:.4g} {unit}"


class WeightEMA:
    """Exponential moving average of a model's parameters; ``module`` is the averaged copy.

    ``module`` must be a second instance of the model's architecture (built, not deep-copied:
    a deep copy of e3nn's compiled modules renames their buffers). Parameters only: the
    buffers are constants (target statistics, reference, 3j symbols).
    """

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, decay: float) -> None:
        module.load_state_dict(model.state_dict())
        self.module = module.requires_grad_(False)
        self.decay = decay
        self.n_averaged = 0

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged = list(self.module.parameters())
        current = [p.detach() for p in model.parameters()]
        if self.n_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        self.n_averaged += 1


class Trainer:
    """Trains one run into its run directory; :meth:`run` starts or resumes it."""

    def __init__(self, config: Config, run_dir: str | Path, mols: Structures | None = None, progress: bool = True):
        self.config = config
        self.run = RunDir.at(run_dir)
        self.progress = progress
        self.mols = mols if mols is not None else load_structures(config.data, progress, config.train.force_weight > 0)
        refuse_periodic(self.mols)  # before anything is split or written
        self.forces = config.train.force_weight > 0
        if self.forces and FORCES not in self.mols.atom_properties:
            raise IrrepscopeError(
                f"train.force_weight > 0 but the structures of data.source {config.data.source} carry no forces "
                f"(data.forces_key {config.data.forces_key!r})"
            )
        self.device = resolve_device(config.train.device)
        self.dtype = torch_dtype(config.train.dtype)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)

    # -- set-up ---------------------------------------------------------------------------
    def _fresh(self) -> tuple[EquivariantGraphConv, torch.optim.Optimizer, dict[str, Any]]:
        cfg = self.config
        groups = split_groups(self.mols, cfg.data.group_by)
        split = random_split(len(self.mols), tuple(cfg.data.split), seed=cfg.train.seed, limit=cfg.data.limit, groups=groups)
        torch.manual_seed(cfg.train.seed)
        model = build_run_model(cfg)
        y = self.mols.properties[cfg.data.target][split["train"]]
        if is_equivariant(cfg.data.target):
            # No shift and one scale for all components (the RMS): anything else breaks equivariance.
            model.set_target_stats(0.0, _rms(y))
            composition = {"reference": "none", "target": cfg.data.target, "baseline": baseline_name(cfg.data.target)}
        else:
            fit = fit_composition(self.mols, split["train"], cfg.data.target)
            if cfg.data.reference == "per_element":
                model.set_element_reference(torch.from_numpy(fit.reference_vector(cfg.model.num_elements)))
                y = y - fit.predict(self.mols, split["train"])
            composition = {"reference": cfg.data.reference, **fit.to_json()}
            model.set_target_stats(float(y.mean()), float(y.std()))
        for k, name in enumerate(cfg.data.auxiliary):  # vectors/tensors: one RMS scale, no shift
            model.auxiliary_std[k] = _rms(self.mols.properties[name][split["train"]])
        if cfg.train.init_from is not None:
            init_trunk(model, cfg, split)  # may refuse: before anything is written
        self.run.root.mkdir(parents=True, exist_ok=True)
        self.run.write_config(cfg)
        meta = {"seed": cfg.train.seed, "fractions": cfg.data.split, "limit": cfg.data.limit}
        if not cfg.data.from_qm9:
            meta.update(
                source=cfg.data.source, structures=len(self.mols), grouped_by="qm9_index" if groups is not None else "structure",
                **source_fingerprint(cfg.data),
            )
        save_split(self.run.split, split, meta)
        atomic_write_json(self.run.composition, composition)
        model.to(self.device, self.dtype)
        self.run.write_metrics([])
        progress = {"epoch": 0, "best_val_mae": math.inf, "best_epoch": 0, "plateau_scale": 1.0, "plateau_since": 0}
        return model, make_optimizer(model, cfg), progress

    def _resumed(self) -> tuple[EquivariantGraphConv, torch.optim.Optimizer, dict[str, Any]]:
        check_source(self.config.data, self.run.split)  # a structure file: still the one the run was split on?
        state = load_checkpoint(self.run.checkpoint("last"), map_location=self.device)
        for key in ("optimizer", "epoch", "best_val_mae", "best_epoch"):
            if key not in state:
                raise IrrepscopeError(f"cannot resume {self.run.root}: its last.pt has no {key!r} (not a training checkpoint)")
        self.run.check_checkpoint(state, "last")  # trained on this split, composition and config?
        saved = checkpoint_config(state, self.run.checkpoint("last"))
        check_resumable(saved, self.config, state["epoch"], self.run.root)
        model = build_run_model(self.config)
        # With an EMA, "model" holds the averaged (evaluated) weights and "train_model" the raw ones.
        model.load_state_dict(state.get("train_model", state["model"]))
        model.to(self.device, self.dtype)
        opt = make_optimizer(model, self.config)
        opt.load_state_dict(state["optimizer"])
        # The checkpoint carries the metric rows of its epochs: metrics.csv is rewritten from
        # them, so a kill between saving last.pt and writing metrics.csv loses no row, and rows
        # of an epoch that crashed midway are dropped. (Checkpoints from before: the file's rows.)
        rows = state.get("metrics")
        if rows is None:
            rows = [r for r in self.run.read_metrics() if int(r["epoch"]) <= state["epoch"]]
        self.run.write_metrics(rows)
        self.run.write_config(self.config)
        progress = {k: state[k] for k in ("epoch", "best_val_mae", "best_epoch")}
        progress["plateau_scale"] = float(state.get("plateau_scale", 1.0))
        progress["plateau_since"] = int(state.get("plateau_since", state["best_epoch"]))
        if "train_model" in state:  # the averaged weights and how many updates they hold
            progress["ema"] = (state["model"], int(state.get("ema_updates", 0)))
        return model, opt, progress

    # -- loop -------------------------------------------------------------------------------
    def run_training(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``train.epochs`` finished epochs, then evaluate best.pt on the test split.

        Holds the run directory's lock throughout: a second writer is refused at once.
        """
        with lock_run(self.run.root, "irrepscope train --resume" if resume else "irrepscope train", create=not resume):
            if not resume and self.run.checkpoint("last").exists():
                raise IrrepscopeError(
                    f"{self.run.root} already holds a run; use --resume to continue it or choose another --out"
                )
            if not resume:
                self.run.refuse_foreign_files()
            return self._train(resume)

    def _train(self, resume: bool) -> dict[str, Any]:
        cfg = self.config
        model, opt, progress = self._resumed() if resume else self._fresh()
        ema = None
        if cfg.train.ema_decay is not None:
            twin = build_run_model(cfg).to(self.device, self.dtype)
            ema = WeightEMA(model, twin, cfg.train.ema_decay)
            if "ema" in progress:
                averaged, ema.n_averaged = progress.pop("ema")
                ema.module.load_state_dict(averaged)
        split = load_split(self.run.split, len(self.mols))
        rows = self.run.read_metrics()
        self.run.append_session(len(rows), self.device.type)
        target = self.mols.properties[cfg.data.target]
        baseline_val = baseline_errors(self.mols, split["train"], split["val"], cfg.data.target)["baseline_mae_ev"]
        val_forces = self.mols.atom_values(FORCES, split["val"]) if self.forces else None
        unit = unit_of(cfg.data.target)
        for epoch in range(progress["epoch"], cfg.train.epochs):
            t0 = time.perf_counter()
            train_loss, n_mol = self._train_epoch(model, opt, ema, split["train"], epoch, progress["plateau_scale"])
            seconds = time.perf_counter() - t0
            evaluated = ema.module if ema is not None else model
            evaluated.eval()
            pred = predict_all(evaluated, self.mols, split["val"], cfg, forces=self.forces)
            val = regression_metrics(pred.prediction, target[split["val"]])
            score = val["mae_ev"]  # energy models: the best epoch has the lowest validation MAE (as always)
            force_note, force_cols = "", {}
            if self.forces:
                force_err = pred.forces - val_forces
                force_mae = float(np.mean(np.abs(force_err)))
                score = self._validation_loss(model, val["rmse_ev"], float(np.sqrt(np.mean(force_err**2))))
                force_base = force_baseline_errors(val_forces)["force_baseline_mae"]
                force_cols = {"val_force_mae": f"{force_mae:.5f}", "val_force_baseline_mae": f"{force_base:.5f}"}
                force_note = f"  forces {1000 * force_mae:.1f} meV/Å (zero-force {1000 * force_base:.1f})"
            done = epoch + 1
            rows.append(
                {
                    "epoch": done,
                    "train_loss": f"{train_loss:.6g}",
                    "val_mae_mev": f"{1000 * val['mae_ev']:.3f}",
                    "val_rmse_mev": f"{1000 * val['rmse_ev']:.3f}",
                    "val_baseline_mae_mev": f"{1000 * baseline_val:.3f}",
                    **force_cols,
                    "lr": f"{opt.param_groups[0]['lr']:.3g}",
                    "epoch_seconds": f"{seconds:.2f}",
                    "molecules_per_s": f"{n_mol / seconds:.1f}",
                    "device": self.device.type,  # where this epoch ran (a resume may move a run)
                }
            )
            if after_validation(progress, score, done, cfg):
                self._save(self.run.checkpoint("best"), model, ema, opt, progress, rows)
            self._save(self.run.checkpoint("last"), model, ema, opt, progress, rows)
            self.run.write_metrics(rows)
            what = baseline_name(cfg.data.target)
            tqdm.write(
                f"epoch {done}/{cfg.train.epochs}  train loss {train_loss:.4f}  val MAE {_milli(val['mae_ev'], unit)} "
                f"({what} {_milli(baseline_val, unit)}){force_note}  ({n_mol / seconds:.0f} structures/s)"
            )
        test = evaluate_run(self.run.root, "test", device=str(self.device), mols=self.mols)
        self.run.write_test(test)
        return test

    def _train_epoch(self, model, opt, ema, indices: np.ndarray, epoch: int, plateau_scale: float) -> tuple[float, int]:
        cfg = self.config
        mean, std = float(model.target_mean), float(model.target_std)
        model.train()
        batches = iterate_batches(
            self.mols,
            indices,
            cfg.train.batch_size,
            shuffle=True,
            seed=np.random.default_rng([cfg.train.seed, epoch]),
            target=cfg.data.target,
            graph=cfg.data.graph,
            cutoff=cfg.model.cutoff,
            dtype=self.dtype,
            auxiliary=cfg.data.auxiliary,
            forces=self.forces,
        )
        n_batches = math.ceil(len(indices) / cfg.train.batch_size)
        if cfg.train.max_train_batches:
            n_batches = min(n_batches, cfg.train.max_train_batches)
        total, n_mol = 0.0, 0
        bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}", leave=False, disable=not self.progress, unit="batch")
        for step, batch in enumerate(batches):
            if step >= n_batches:
                break
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, epoch + (step + 1) / n_batches, plateau_scale)
            batch = batch.to(self.device)
            if self.forces:
                out, forces = energy_and_forces(model, batch, create_graph=True)
            else:
                out = model(batch)
            reference = model.reference_sum(batch) if model.scalar_output else 0.0
            loss = torch.mean((out.standardized - (batch.y - reference - mean) / std) ** 2)
            if self.forces:
                force_loss = torch.mean(((forces - batch.forces) / self.force_scale) ** 2)
                loss = cfg.train.energy_weight * loss + cfg.train.force_weight * force_loss
            for k, name in enumerate(cfg.data.auxiliary):  # multi-task: same trunk, one head each
                aux_loss = torch.mean((out.auxiliary[name] - batch.aux[name] / model.auxiliary_std[k]) ** 2)
                loss = loss + cfg.train.auxiliary_weight * aux_loss
            if not torch.isfinite(loss):
                raise IrrepscopeError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"last good checkpoint: {self.run.checkpoint('last')} (try a lower train.lr)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            total += loss.item() * batch.num_graphs
            n_mol += batch.num_graphs
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        return total / max(n_mol, 1), n_mol

    @property
    def force_scale(self) -> float:
        """The RMS of the training split's force components (eV/Å): the force loss's unit, from the training data only."""
        if not hasattr(self, "_force_scale"):
            rms = _rms(self.mols.atom_values(FORCES, load_split(self.run.split)["train"]))
            self._force_scale = rms if rms > 0 else 1.0
        return self._force_scale

    def _validation_loss(self, model: EquivariantGraphConv, energy_rmse: float, force_rmse: float) -> float:
        """The training loss's weighted sum on the validation split: what picks the best epoch of a force field."""
        t = self.config.train
        return t.energy_weight * (energy_rmse / float(model.target_std)) ** 2 + t.force_weight * (force_rmse / self.force_scale) ** 2

    def _save(self, path: Path, model, ema, opt, progress: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        # "model" holds the weights that are evaluated (the EMA when there is one): what
        # evaluate, predict and analyze load. The raw weights are kept for resuming.
        state = {
            "config": self.config.to_dict(),
            "model": (ema.module if ema is not None else model).state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": int(rows[-1]["epoch"]),
            **{k: progress[k] for k in ("best_val_mae", "best_epoch", "plateau_scale", "plateau_since")},
            "num_parameters": model.num_parameters(),
            "metrics": [{k: str(v) for k, v in row.items()} for row in rows],  # the record travels with the weights
            "pins": self.run.pins(),  # the split and composition it was trained with
        }
        if ema is not None:
            state["train_model"] = model.state_dict()
            state["ema_updates"] = int(ema.n_averaged)
        save_checkpoint(path, state)


def train(config: Config, run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train a fresh run into ``run_dir``; returns the test metrics."""
    if RunDir.at(run_dir).checkpoint("last").exists():  # said before the data loads; checked again under the lock
        raise IrrepscopeError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
    return Trainer(config, run_dir, progress=progress).run_training(resume=False)


def resume(run_dir: str | Path, overrides: tuple[str, ...] = (), progress: bool = True) -> dict[str, Any]:
    """Continue an interrupted run from ``checkpoints/last.pt`` (overrides may extend ``train.epochs``)."""
    from irrepscope.config import load_config

    run = RunDir.at(run_dir).require()
    if not run.checkpoint("last").exists():
        raise IrrepscopeError(f"cannot resume {run_dir}: no checkpoints/last.pt")
    config = load_config(run.config, overrides, run_record=True)
    return Trainer(config, run_dir, progress=progress).run_training(resume=True)
