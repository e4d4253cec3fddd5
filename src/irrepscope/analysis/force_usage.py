"""Which orders a force field needs: zero an order, recompute energies and forces through the hooked model.

For every (block, order) and for every order after all blocks, the energies and forces are
recomputed through the model's own forward pass with the order zeroed by the hook (the
gradient flows through the ablated features). Two kinds of measure come out of one pass:

* against labels, where the structures carry forces: the force MAE per component with the
  order zeroed minus the unablated model's (``ForcePass.delta``);
* against the model itself, which needs no labels (a pretrained potential's labels are of
  another level of theory than any data at hand): the mean |ΔE| per atom and the mean
  |ΔF| per component between the ablated and the unablated model, the latter also relative
  to the model's own mean |F| (``ForcePass.energy_change``, ``ForcePass.force_change``).

Everything is kept per structure, so that any subset (a class of structures, a bootstrap
resample) is summarised without re-running the model. No linear shortcut: the forces of an
ablated model are a second derivative away from the one backward pass the energy shortcut
uses, and other families are nonlinear anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from irrepscope.analysis.interface import AnalysedModel
from irrepscope.data.structures import FORCES, Structures

Progress = Callable[[Iterable, int, str], Iterable]
Case = tuple[int | None, int]  # (block, or None for every block; order)


@dataclass
class ForcePass:
    """Energies and forces of a model and of its ablations on one set of structures, summed per structure.

    Arrays are [M] over ``indices``; a case is (block or None for every block, order);
    blocks without the order have no case. The label arrays are None without forces.
    """

    indices: np.ndarray  # [M] the structures
    atoms: np.ndarray  # [M] atoms per structure
    energy: np.ndarray  # [M] the model's energy (eV)
    force_abs: np.ndarray  # [M] sum over atoms and components of the model's |F|
    energy_shift: dict[Case, np.ndarray]  # [M] E(ablated) - E (eV)
    force_shift: dict[Case, np.ndarray]  # [M] sum of |F(ablated) - F|
    error_abs: np.ndarray | None = None  # [M] sum of |F - F_label|
    error_sq: np.ndarray | None = None  # [M] sum of (F - F_label)^2
    label_abs: np.ndarray | None = None  # [M] sum of |F_label|: the zero-force baseline's error
    ablated_error_abs: dict[Case, np.ndarray] = field(default_factory=dict)  # [M] sum of |F(ablated) - F_label|

    def subset(self, sel: np.ndarray) -> "ForcePass":
        """The same pass restricted to the selected structures (a mask or positions), e.g. one class of them."""
        s = np.asarray(sel)
        pick = lambda v: None if v is None else v[s]  # noqa: E731
        return ForcePass(
            indices=self.indices[s], atoms=self.atoms[s], energy=self.energy[s], force_abs=self.force_abs[s],
            energy_shift={c: v[s] for c, v in self.energy_shift.items()},
            force_shift={c: v[s] for c, v in self.force_shift.items()},
            error_abs=pick(self.error_abs), error_sq=pick(self.error_sq), label_abs=pick(self.label_abs),
            ablated_error_abs={c: v[s] for c, v in self.ablated_error_abs.items()},
        )  # fmt: skip

    @property
    def cases(self) -> list[Case]:
        return list(self.energy_shift)

    @property
    def labelled(self) -> bool:
        return self.error_abs is not None

    @property
    def num_atoms(self) -> int:
        return int(self.atoms.sum())

    def _components(self, sel: np.ndarray | None) -> float:
        return 3.0 * float(self.atoms[_sel(sel, len(self.atoms))].sum())

    # Against labels: the error of the forces (eV/Å per component).
    @property
    def force_mae(self) -> float:
        return float(self.error_abs.sum()) / self._components(None)

    @property
    def force_rmse(self) -> float:
        return float(np.sqrt(self.error_sq.sum() / self._components(None)))

    @property
    def baseline_mae(self) -> float:
        """The zero-force baseline's MAE on the same atoms: the labels' mean |F|."""
        return float(self.label_abs.sum()) / self._components(None)

    @property
    def ablated_mae(self) -> dict[Case, float]:
        return {case: float(v.sum()) / self._components(None) for case, v in self.ablated_error_abs.items()}

    def terms(self, name: str, block: int | None, l: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Per structure (numerator, denominator) of measure ``name`` for a case, its value being sum(num) / sum(den)
        (a mean over structures when den is None); None where the case (or, for a label measure, the labels) is absent.

        The one definition of each measure: point values (:meth:`value`) and bootstrap intervals both sum these.
        """
        if (block, l) not in self.energy_shift or (name.startswith("force_delta") and not self.labelled):
            return None
        components = 3.0 * self.atoms
        if name == "force_delta_mae":  # against labels: eV/Å per component
            return self.ablated_error_abs[(block, l)] - self.error_abs, components
        if name == "force_delta_rel":  # that over the model's force MAE
            return self.ablated_error_abs[(block, l)] - self.error_abs, self.error_abs
        if name == "energy_change_per_atom":  # mean over structures of |ΔE| / atoms
            return np.abs(self.energy_shift[(block, l)]) / self.atoms, None
        if name == "force_change":  # mean |ΔF| per component
            return self.force_shift[(block, l)], components
        if name == "force_change_rel":  # that over the model's own mean |F|
            return self.force_shift[(block, l)], self.force_abs
        raise KeyError(name)

    def value(self, name: str, block: int | None, l: int, sel: np.ndarray | None = None) -> float:
        """Measure ``name`` (:meth:`terms`) over the selected structures (a mask or positions; None: all); NaN where absent."""
        terms = self.terms(name, block, l)
        if terms is None:
            return float("nan")
        s = _sel(sel, len(self.atoms))
        num, den = terms
        total = float(den[s].sum()) if den is not None else float(len(num[s]))
        return float(num[s].sum()) / total if total != 0 else float("nan")

    def delta(self, block: int | None, l: int) -> float:
        """Force MAE with order ``l`` zeroed after ``block`` (None: every block) minus the model's; NaN where absent."""
        return self.value("force_delta_mae", block, l)

    # Against the model itself: no labels needed.
    def mean_force(self, sel: np.ndarray | None = None) -> float:
        """The model's mean |F| per component (eV/Å) over the selected structures (a mask or positions; None: all)."""
        s = _sel(sel, len(self.atoms))
        return float(self.force_abs[s].sum()) / self._components(s)

    def energy_change(self, block: int | None, l: int, sel: np.ndarray | None = None) -> float:
        """Mean over structures of |E(ablated) - E| per atom (eV/atom); NaN where the case is absent."""
        return self.value("energy_change_per_atom", block, l, sel)

    def force_change(self, block: int | None, l: int, sel: np.ndarray | None = None) -> float:
        """Mean |F(ablated) - F| per component (eV/Å) over the selected structures' atoms; NaN where absent."""
        return self.value("force_change", block, l, sel)


def _sel(sel: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if sel is None else np.asarray(sel)


def ablation_cases(model: AnalysedModel, orders: list[int]) -> list[Case]:
    """Every (block, order) where the block puts the order out, then (None, order) for every order."""
    return [
        (b, l) for b, irreps in enumerate(model.block_irreps) for l in orders if any(ir.l == l for _, ir in irreps)
    ] + [(None, l) for l in orders]


def force_pass(
    model: AnalysedModel,
    structures: Structures,
    indices: np.ndarray,
    orders: list[int],
    batch_size: int,
    progress: Progress,
    labels: bool | None = None,
) -> ForcePass:
    """Energies and forces of ``model`` on ``structures[indices]``, unablated and with each order zeroed per block and after all.

    ``labels`` (default: when the structures carry forces) adds the errors against them.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = FORCES in structures.atom_properties if labels is None else labels
    cases = ablation_cases(model, orders)
    parts: dict[str, list[np.ndarray]] = {}
    by_case: dict[str, dict[Case, list[np.ndarray]]] = {"energy": {}, "force": {}, "error": {}}

    def add(store: dict, key, value: np.ndarray) -> None:
        store.setdefault(key, []).append(value)

    chunks = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    for chunk in progress(chunks, len(chunks), "force ablations"):
        (batch,) = list(model.batches(structures, chunk, len(chunk)))
        graph = batch.atom_graph.cpu().numpy()
        energy, forces = model.energy_and_forces(batch)
        energy, forces = energy.double().cpu().numpy(), forces.double().cpu().numpy()

        def per_structure(values: np.ndarray) -> np.ndarray:  # [N] per atom -> [G] sums
            return np.bincount(graph, weights=values, minlength=len(chunk))

        add(parts, "atoms", np.bincount(graph, minlength=len(chunk)))
        add(parts, "energy", energy)
        add(parts, "force_abs", per_structure(np.abs(forces).sum(axis=1)))
        truth = structures.atom_values(FORCES, chunk) if labels else None
        if truth is not None:
            err = forces - truth
            add(parts, "error_abs", per_structure(np.abs(err).sum(axis=1)))
            add(parts, "error_sq", per_structure((err**2).sum(axis=1)))
            add(parts, "label_abs", per_structure(np.abs(truth).sum(axis=1)))
        for block, l in cases:
            e_abl, f_abl = model.force_ablation(batch, block, l)
            e_abl, f_abl = e_abl.double().cpu().numpy(), f_abl.double().cpu().numpy()
            add(by_case["energy"], (block, l), e_abl - energy)
            add(by_case["force"], (block, l), per_structure(np.abs(f_abl - forces).sum(axis=1)))
            if truth is not None:
                add(by_case["error"], (block, l), per_structure(np.abs(f_abl - truth).sum(axis=1)))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    joined = {kind: {case: np.concatenate(v) for case, v in store.items()} for kind, store in by_case.items()}
    return ForcePass(
        indices=indices,
        atoms=cat["atoms"].astype(np.int64),
        energy=cat["energy"],
        force_abs=cat["force_abs"],
        energy_shift=joined["energy"],
        force_shift=joined["force"],
        error_abs=cat.get("error_abs"),
        error_sq=cat.get("error_sq"),
        label_abs=cat.get("label_abs"),
        ablated_error_abs=joined["error"],
    )
