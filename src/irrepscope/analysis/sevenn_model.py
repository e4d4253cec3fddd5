"""SevenNet models (``sevenn`` 0.13, optional extra ``irrepscope[sevenn]``) behind the analysis interface.

The pretrained universal potentials that ship inside the ``sevenn`` wheel (no network
needed) load by name, a user's own SevenNet checkpoint (``.pth``) by path. The blocks are
SevenNet's interaction blocks, each ending in ``{t}_equivariant_gate``: a forward hook there
reads (and may replace) the node features ``x`` that the next block, or the readout,
uses. The gates make the model nonlinear in its features: every ablation re-runs it.

Graphs are SevenNet's own (``sevenn.train.dataload.unlabeled_atoms_to_graph``, the
builder its ASE calculator uses), periodic cells included, batched with torch_geometric
as SevenNet's inference does. Energies and forces: SevenNet differentiates its energy with
respect to the edge vectors inside the model (``force_output``); :meth:`SevenNetModel.
energy_and_forces` runs the whole model under ``enable_grad`` with the hooks on, so an
order zeroed by a hook is missing from the forces too. :meth:`SevenNetModel.forward`
(energies only, e.g. under ``no_grad``) runs every module but the force output.

Handled pitfalls (each tested): the modules write their outputs into the batch object, so
each call gets a copy and the batch stays reusable; the multi-fidelity model needs a
modal (its fidelity), refused without one; unknown elements are refused by name.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from e3nn import o3

from irrepscope.analysis.interface import AnalysedModel, ModelBatch, NodeHook, hooked_outputs, known_atoms
from irrepscope.data.structures import Structures
from irrepscope.errors import IrrepscopeError

INSTALL = "pip install 'irrepscope[sevenn]'"
# The checkpoints inside the sevenn 0.13 wheel, by the names sevenn itself accepts.
PRETRAINED = {
    "7net-0": "SevenNet-0 (11Jul2024): l_max 2, 5 blocks, 89 elements, MPtrj (PBE/PBE+U)",
    "7net-0_11Jul2024": "SevenNet-0 (11Jul2024), the same checkpoint as 7net-0",
    "7net-0_22May2024": "SevenNet-0 (22May2024): l_max 2, 5 blocks, MPtrj",
    "7net-l3i5": "SevenNet-l3i5: l_max 3, 5 blocks, MPtrj",
    "7net-mf-0": "SevenNet-MF-0: multi-fidelity (modal PBE or R2SCAN), l_max 2",
}
GATE = re.compile(r"^(\d+)_equivariant_gate$")
NODE_FEATURES = "x"  # sevenn._keys.NODE_FEATURE


def require_sevenn() -> None:
    """A one-line error when the optional ``sevenn`` package is missing."""
    try:
        import sevenn  # noqa: F401
    except ImportError:
        raise IrrepscopeError(f"analysing SevenNet models needs the sevenn package: {INSTALL}") from None


def is_sevenn_model(name: str | Path) -> bool:
    """Whether ``name`` names a pretrained SevenNet model (case-insensitive) or a SevenNet checkpoint file (``.pth``)."""
    text = str(name)
    return text.lower() in {k.lower() for k in PRETRAINED} or text.endswith(".pth")


def load_sevenn(name: str | Path) -> tuple[torch.nn.Module, dict]:
    """A SevenNet model and its config, from a pretrained name or a checkpoint path; in eval mode, on the CPU."""
    text = str(name)
    if text.lower() not in {k.lower() for k in PRETRAINED}:
        if not text.endswith(".pth"):
            raise IrrepscopeError(f"{text}: not a SevenNet model; give a checkpoint (.pth) or one of {', '.join(PRETRAINED)}")
        if not Path(text).is_file():
            raise IrrepscopeError(f"SevenNet checkpoint not found: {text}")
    require_sevenn()
    from sevenn.util import load_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tensor-product accelerator" and torch.load notices
        try:
            checkpoint = load_checkpoint(text)
            model = checkpoint.build_model()
        except Exception as exc:  # sevenn raises many kinds for a file it cannot read
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IrrepscopeError(f"cannot load SevenNet model {text}: {first}") from None
    return model.to("cpu").eval(), checkpoint.config


def gate_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The interaction blocks' last modules ``{t}_equivariant_gate``, in order, found by name."""
    gates = [(name, m) for name, m in model.named_children() if GATE.match(name)]
    if not gates:
        raise IrrepscopeError("the SevenNet model has no {t}_equivariant_gate modules to analyse")
    return sorted(gates, key=lambda kv: int(GATE.match(kv[0]).group(1)))


class SevenNetModel(AnalysedModel):
    """A SevenNet model: blocks are its interaction blocks, predictions its total energies (eV), forces its own.

    ``model`` and ``config`` as :func:`load_sevenn` gives them; ``modal`` is the fidelity
    of a multi-fidelity model (e.g. ``PBE`` for 7net-mf-0), refused for a model without.
    """

    family = "sevenn"
    linear_in_features = False  # gates
    supports_forces = True

    def __init__(self, model: torch.nn.Module, config: dict, modal: str | None = None, name: str = "sevenn") -> None:
        import sevenn._keys as KEY
        from sevenn.nn.force_output import ForceOutput, ForceStressOutput, ForceStressOutputFromEdge

        self.model, self.config, self.name = model, config, name
        self.model.set_is_batch_data(True)
        self.gates = gate_modules(model)
        self.cutoff = float(config[KEY.CUTOFF])
        self.type_map = {int(z): int(i) for z, i in config[KEY.TYPE_MAP].items()}
        modals = sorted(model.modal_map) if getattr(model, "modal_map", None) else []
        if modals and modal is None:
            raise IrrepscopeError(f"SevenNet model {name} is multi-fidelity: give a modal (one of {modals})")
        if modal is not None and modal not in modals:
            raise IrrepscopeError(
                f"SevenNet model {name} has no modal {modal!r}" + (f"; its modals are {modals}" if modals else " (it has none)")
            )
        self.modal = modal
        force_types = (ForceOutput, ForceStressOutput, ForceStressOutputFromEdge)
        self._energy_modules = [m for m in model.children() if not isinstance(m, force_types)]

    @classmethod
    def load(cls, name: str | Path, modal: str | None = None) -> "SevenNetModel":
        model, config = load_sevenn(name)
        return cls(model, config, modal, name=str(name))

    @property
    def block_irreps(self) -> list[o3.Irreps]:
        return [o3.Irreps(str(gate.gate.irreps_out)) for _, gate in self.gates]

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.gates]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    @property
    def elements(self) -> list[int]:
        """The atomic numbers the model knows."""
        return sorted(self.type_map)

    def batches(self, mols: Structures, indices: np.ndarray, batch_size: int) -> Iterator[ModelBatch]:
        for start in range(0, len(indices), batch_size):
            yield self.batch_of(mols, indices[start : start + batch_size])

    def batch_of(self, mols: Structures, indices: np.ndarray) -> ModelBatch:
        """``mols[indices]`` as one torch_geometric batch of SevenNet graphs (its own builder; periodic images where a cell is)."""
        import sevenn._keys as KEY
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from torch_geometric.data import Batch

        graphs = []
        for i in np.asarray(indices, dtype=np.int64):
            atoms = known_atoms(mols, i, self.type_map, f"SevenNet model {self.name}")
            graph = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, self.cutoff))
            if self.modal is not None:
                graph[KEY.DATA_MODALITY] = self.modal
            graphs.append(graph)
        data = Batch.from_data_list(graphs)
        z = torch.as_tensor(mols.atomic_numbers[_atoms_of(mols, indices)], dtype=torch.long)
        return ModelBatch(len(graphs), data.batch, z, int(data.edge_index.shape[1]), data)

    def _run(self, batch: ModelBatch, hook: NodeHook | None, forces: bool):
        """The model on a copy of the batch (its modules write into it), with the hooks on the gates."""
        data = batch.inputs.clone()
        with self._hooked(hook):
            if forces:
                return self.model(data)
            data = self.model._preprocess(data)
            for module in self._energy_modules:
                data = module(data)
            return data

    def forward(self, batch: ModelBatch, hook: NodeHook | None = None) -> torch.Tensor:
        import sevenn._keys as KEY

        return self._run(batch, hook, forces=False)[KEY.PRED_TOTAL_ENERGY].reshape(-1)

    def energy_and_forces(self, batch: ModelBatch, hook: NodeHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Total energies [G] (eV) and SevenNet's own forces [N, 3] (eV/Å, batch order), through the same hooks. Detached."""
        import sevenn._keys as KEY

        with torch.enable_grad():
            out = self._run(batch, hook, forces=True)
        return out[KEY.PRED_TOTAL_ENERGY].reshape(-1).detach(), out[KEY.PRED_FORCE].detach()

    def _hooked(self, hook: NodeHook | None):
        """``hook(i, x)`` on the output node features of every gate while the model runs (none: no hooks)."""
        # in place: the data object is what the next module reads
        return hooked_outputs([gate for _, gate in self.gates], hook, NODE_FEATURES, copy=False)


def _atoms_of(mols: Structures, indices: np.ndarray) -> np.ndarray:
    from irrepscope.data.structures import segment_indices

    atoms, _ = segment_indices(mols.atom_ptr, np.asarray(indices, dtype=np.int64).reshape(-1))
    return atoms
