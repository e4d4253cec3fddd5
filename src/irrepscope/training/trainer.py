"""The training loop: the published recipe (AdamW, MSE on the standardised target), resumable.

Batch order is a pure function of (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from irrepscope.config import Config
from irrepscope.data.batching import iterate_batches
from irrepscope.data.qm9 import Molecules, load_qm9
from irrepscope.data.split import load_split, random_split, save_split
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import EquivariantGraphConv, build_model
from irrepscope.training.evaluate import evaluate_run, predict, regression_metrics, resolve_device, torch_dtype
from irrepscope.training.runs import RunDir, checkpoint_config, load_checkpoint, save_checkpoint


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)


def learning_rate(config: Config, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): constant (published) or cosine to zero."""
    if config.train.schedule == "cosine":
        return config.train.lr * 0.5 * (1 + math.cos(math.pi * epoch / config.train.epochs))
    return config.train.lr


class Trainer:
    """Trains one run into its run directory; :meth:`run` starts or resumes it."""

    def __init__(self, config: Config, run_dir: str | Path, mols: Molecules | None = None, progress: bool = True):
        self.config = config
        self.run = RunDir.at(run_dir)
        self.progress = progress
        self.mols = mols if mols is not None else load_qm9(config.data.cache_dir, progress=progress)
        self.device = resolve_device(config.train.device)
        self.dtype = torch_dtype(config.train.dtype)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)

    # -- set-up ---------------------------------------------------------------------------
    def _fresh(self) -> tuple[EquivariantGraphConv, torch.optim.Optimizer, dict[str, Any]]:
        cfg = self.config
        split = random_split(len(self.mols), tuple(cfg.data.split), seed=cfg.train.seed, limit=cfg.data.limit)
        self.run.root.mkdir(parents=True, exist_ok=True)
        self.run.write_config(cfg)
        save_split(self.run.split, split, {"seed": cfg.train.seed, "fractions": cfg.data.split, "limit": cfg.data.limit})
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        y = self.mols.properties[cfg.data.target][split["train"]]
        model.set_target_stats(float(y.mean()), float(y.std()))
        model.to(self.device, self.dtype)
        self.run.write_metrics([])
        return model, make_optimizer(model, cfg), {"epoch": 0, "best_val_mae": math.inf, "best_epoch": 0}

    def _resumed(self) -> tuple[EquivariantGraphConv, torch.optim.Optimizer, dict[str, Any]]:
        state = load_checkpoint(self.run.checkpoint("last"), map_location=self.device)
        saved = checkpoint_config(state, self.run.checkpoint("last"))
        # The run's recipe may be extended (more epochs, another device) but not changed.
        for section in ("model", "data"):
            if getattr(saved, section) != getattr(self.config, section):
                raise IrrepscopeError(f"cannot resume {self.run.root}: its {section} config differs from the one given")
        self.config.train.seed = saved.train.seed
        model = build_model(self.config.model)
        model.load_state_dict(state["model"])
        model.to(self.device, self.dtype)
        opt = make_optimizer(model, self.config)
        opt.load_state_dict(state["optimizer"])
        # Drop metric rows of epochs after the checkpoint (an epoch that crashed midway).
        rows = [r for r in self.run.read_metrics() if int(r["epoch"]) <= state["epoch"]]
        self.run.write_metrics(rows)
        self.run.write_config(self.config)
        return model, opt, {k: state[k] for k in ("epoch", "best_val_mae", "best_epoch")}

    # -- loop -------------------------------------------------------------------------------
    def run_training(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``train.epochs`` finished epochs, then evaluate best.pt on the test split."""
        cfg = self.config
        model, opt, progress = self._resumed() if resume else self._fresh()
        split = load_split(self.run.split)
        rows = self.run.read_metrics()
        mean, std = float(model.target_mean), float(model.target_std)
        for epoch in range(progress["epoch"], cfg.train.epochs):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, epoch)
            t0 = time.perf_counter()
            train_loss, n_mol = self._train_epoch(model, opt, split["train"], epoch, mean, std)
            seconds = time.perf_counter() - t0
            model.eval()
            val = regression_metrics(predict(model, self.mols, split["val"], cfg), self.mols.properties[cfg.data.target][split["val"]])
            done = epoch + 1
            if val["mae_ev"] < progress["best_val_mae"]:
                progress.update(best_val_mae=val["mae_ev"], best_epoch=done)
                self._save(self.run.checkpoint("best"), model, opt, done, progress)
            self._save(self.run.checkpoint("last"), model, opt, done, progress)
            rows.append(
                {
                    "epoch": done,
                    "train_loss": f"{train_loss:.6g}",
                    "val_mae_mev": f"{1000 * val['mae_ev']:.3f}",
                    "val_rmse_mev": f"{1000 * val['rmse_ev']:.3f}",
                    "lr": f"{opt.param_groups[0]['lr']:.3g}",
                    "epoch_seconds": f"{seconds:.2f}",
                    "molecules_per_s": f"{n_mol / seconds:.1f}",
                }
            )
            self.run.write_metrics(rows)
            tqdm.write(
                f"epoch {done}/{cfg.train.epochs}  train loss {train_loss:.4f}  "
                f"val MAE {1000 * val['mae_ev']:.1f} meV  ({n_mol / seconds:.0f} mol/s)"
            )
        test = evaluate_run(self.run.root, "test", device=str(self.device), mols=self.mols)
        self.run.write_test(test)
        return test

    def _train_epoch(self, model, opt, indices: np.ndarray, epoch: int, mean: float, std: float) -> tuple[float, int]:
        cfg = self.config
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
        )
        n_batches = math.ceil(len(indices) / cfg.train.batch_size)
        if cfg.train.max_train_batches:
            n_batches = min(n_batches, cfg.train.max_train_batches)
        total, n_mol = 0.0, 0
        bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}", leave=False, disable=not self.progress, unit="batch")
        for step, batch in enumerate(batches):
            if step >= n_batches:
                break
            batch = batch.to(self.device)
            out = model(batch)
            loss = torch.mean((out.standardized - (batch.y - mean) / std) ** 2)
            if not torch.isfinite(loss):
                raise IrrepscopeError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"last good checkpoint: {self.run.checkpoint('last')} (try a lower train.lr)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * batch.num_graphs
            n_mol += batch.num_graphs
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        return total / max(n_mol, 1), n_mol

    def _save(self, path: Path, model, opt, epoch: int, progress: dict[str, Any]) -> None:
        save_checkpoint(
            path,
            {
                "config": self.config.to_dict(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "best_val_mae": progress["best_val_mae"],
                "best_epoch": progress["best_epoch"],
                "num_parameters": model.num_parameters(),
            },
        )


def train(config: Config, run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train a fresh run into ``run_dir``; returns the test metrics."""
    run = RunDir.at(run_dir)
    if run.checkpoint("last").exists():
        raise IrrepscopeError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
    return Trainer(config, run_dir, progress=progress).run_training(resume=False)


def resume(run_dir: str | Path, overrides: tuple[str, ...] = (), progress: bool = True) -> dict[str, Any]:
    """Continue an interrupted run from ``checkpoints/last.pt`` (overrides may extend ``train.epochs``)."""
    from irrepscope.config import load_config

    run = RunDir.at(run_dir).require()
    if not run.checkpoint("last").exists():
        raise IrrepscopeError(f"cannot resume {run_dir}: no checkpoints/last.pt")
    config = load_config(run.config, overrides)
    return Trainer(config, run_dir, progress=progress).run_training(resume=True)
