"""Trained NequIP models (``nequip`` 0.19, optional extra ``irrepscope[nequip]``) behind the analysis interface.

The blocks are NequIP's interaction layers ``layer{i}_convnet`` (convolution, then a
gate), found by name: a packaged model (``.nequip.zip``) lives in its own copy of the
nequip and e3nn classes, so ``isinstance`` checks fail on it. A forward hook on each
layer reads (and may replace) its output ``node_features``. NequIP's gates make the
model nonlinear in its features, so every ablation re-runs it (no linear shortcut).
Per-type scale and shift and an optional pair potential act after the readout; no
feature ablation removes them.

Forces: NequIP wraps its energy model in ``ForceStressOutput``, which, when its
``do_derivatives`` flag is on, makes the positions require grad, runs the energy model and
takes ``-dE/dpositions`` by autograd. A model trained with forces has the flag on as saved
(:attr:`NequIPModel.supports_forces`); an energy-only one (``do_derivatives: false``) has
it off and reports no forces, although its energy could be differentiated: its gradient
was never trained to be a force, and NequIP itself gives none for it. The flag is kept
off (energies only: :meth:`NequIPModel.forward` works under ``no_grad``) and turned on
for each :meth:`NequIPModel.energy_and_forces` call only, under ``enable_grad``, with the
same hooks: NequIP's own force computation through the hooked layers.

Handled pitfalls (each tested): loading a ``.ckpt`` needs
``nequip.utils.global_state.set_global_state()``, which sets torch's default dtype to
float64 and reseeds every RNG: everything it touches is restored afterwards; loaded
models come back in train mode; a force-trained model (``do_derivatives``) fails under
``no_grad``, so derivatives are on only inside ``energy_and_forces``; NequIP marks the
positions it gets as requiring grad, so it gets a detached copy, never the batch's
tensor; features are float32 in a float32 model while energies and forces are float64
tensors (the readout is float32-accurate: finite differences need a float64 model);
compiled models (``.nequip.pth``, ``.pt2``) have no submodules to hook and are refused.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from ase.data import chemical_symbols
from e3nn import o3

from irrepscope.analysis.interface import AnalysedModel, ModelBatch, NodeHook, hooked_outputs
from irrepscope.data.structures import Structures, refuse_periodic
from irrepscope.errors import IrrepscopeError
from irrepscope.process_state import environ_restored, numerics_restored

NODE_FEATURES = "node_features"
TOTAL_ENERGY = "total_energy"
FORCES = "forces"  # NequIP's AtomicDataDict.FORCE_KEY
POSITIONS = "pos"  # AtomicDataDict.POSITIONS_KEY
FORMATS = (".ckpt", ".nequip.zip")
INSTALL = "pip install 'irrepscope[nequip]'"
_ENV_KEYS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "PYTORCH_JIT_USE_NNC_NOT_NVFUSER")


def require_nequip() -> None:
    """A one-line error when the optional ``nequip`` package is missing."""
    try:
        import nequip  # noqa: F401
    except ImportError:
        raise IrrepscopeError(f"analysing NequIP models needs the nequip package: {INSTALL}") from None


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore everything ``set_global_state()`` changes: default dtype, RNGs, env, e3nn and torch settings."""
    import e3nn

    e3nn_opts = e3nn.get_optimization_defaults()
    sharing = torch.multiprocessing.get_sharing_strategy()
    dyn = torch._dynamo.config
    dyn_flags = (dyn.capture_dynamic_output_shape_ops, dyn.capture_scalar_outputs)
    with warnings.catch_warnings():  # torch deprecates the call nequip still makes; we only read and restore
        warnings.simplefilter("ignore", DeprecationWarning)
        fusion = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])
        torch.jit.set_fusion_strategy(fusion)  # set_* returns the previous strategy: put it back
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        with environ_restored(_ENV_KEYS), numerics_restored():
            yield
    finally:
        e3nn.set_optimization_defaults(**e3nn_opts)
        torch.multiprocessing.set_sharing_strategy(sharing)
        dyn.capture_dynamic_output_shape_ops, dyn.capture_scalar_outputs = dyn_flags
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.set_fusion_strategy(fusion)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def load_nequip(path: str | Path) -> torch.nn.Module:
    """A NequIP model from a training checkpoint (``.ckpt``) or a package (``.nequip.zip``), in eval mode.

    ``do_derivatives`` is as saved (on for a force-trained model, which then fails under
    ``no_grad``): :class:`NequIPModel` switches it off and back on per force call.
    """
    path = Path(path)
    name = path.name
    if name.endswith((".nequip.pth", ".pt2", ".pth")):
        raise IrrepscopeError(
            f"{path} is a compiled NequIP model, which cannot be hooked; give the {' or '.join(FORMATS)} it was made from"
        )
    if not name.endswith(FORMATS):
        raise IrrepscopeError(f"{path}: not a NequIP model file; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise IrrepscopeError(f"NequIP model not found: {path}")
    require_nequip()
    with preserved_global_state():
        from nequip.model.saved_models.load_utils import load_saved_model
        from nequip.utils.global_state import set_global_state

        with warnings.catch_warnings():  # torch deprecates the fusion-strategy call it makes (first call only)
            warnings.simplefilter("ignore", DeprecationWarning)
            set_global_state()  # rebuilding a model from a .ckpt asserts it
        try:
            model = load_saved_model(str(path))
        except Exception as exc:  # nequip raises many kinds for a file it cannot read
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IrrepscopeError(f"cannot load NequIP model {path}: {first}") from None
    return model.to("cpu").eval()


def derivative_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules with a boolean ``do_derivatives`` (NequIP's ``ForceStressOutput``), found by attribute."""
    return [m for m in model.modules() if isinstance(getattr(m, "do_derivatives", None), bool)]


def convnet_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The interaction layers ``...layer{i}_convnet``, in order, found by name."""
    layers = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1].startswith("layer")
              and name.endswith("_convnet")]  # fmt: skip
    if not layers:
        raise IrrepscopeError("the NequIP model has no layer{i}_convnet modules to analyse")
    return sorted(layers, key=lambda kv: int(kv[0].rsplit("layer", 1)[-1].split("_")[0]))


class NequIPModel(AnalysedModel):
    """A trained NequIP model: blocks are its convolution layers, predictions its total energies (eV).

    ``model`` as :func:`load_nequip` gives it; its ``do_derivatives`` flags are read (they
    say whether it computes forces) and switched off: energies only, except inside
    :meth:`energy_and_forces`.
    """

    family = "nequip"
    linear_in_features = False  # gates

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        modules = derivative_modules(model)
        self._force_modules = [m for m in modules if m.do_derivatives]
        for m in modules:  # energies only, so that no_grad works
            m.do_derivatives = False
        self.layers = convnet_layers(model)
        self.type_names = str(model.metadata["type_names"]).split(" ")
        self.r_max = float(model.metadata["r_max"])
        self._z_to_type = {chemical_symbols.index(t): i for i, t in enumerate(self.type_names) if t in chemical_symbols}

    @classmethod
    def load(cls, path: str | Path) -> "NequIPModel":
        return cls(load_nequip(path))

    @property
    def block_irreps(self) -> list[o3.Irreps]:
        # A packaged model's irreps are its own e3nn's class: convert through the string.
        return [o3.Irreps(str(layer.irreps_out[NODE_FEATURES])) for _, layer in self.layers]

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def batches(self, mols: Structures, indices: np.ndarray, batch_size: int) -> Iterator[ModelBatch]:
        refuse_periodic(mols, indices, who="the NequIP analysis (it builds no periodic images)")
        for start in range(0, len(indices), batch_size):
            chunk = [mols.structure(int(i)) for i in indices[start : start + batch_size]]
            yield self.batch_from_structures(chunk)

    def batch_from_structures(self, structures: list[tuple[np.ndarray, np.ndarray]]) -> ModelBatch:
        """(atomic numbers, positions in Å) per molecule -> a batch of NequIP's AtomicDataDict (radius graph, r_max)."""
        from nequip.data import AtomicDataDict, compute_neighborlist_

        frames = []
        for z, pos in structures:
            missing = sorted({int(a) for a in z} - set(self._z_to_type))
            if missing:
                raise IrrepscopeError(f"elements {missing} are not among the NequIP model's types {self.type_names}")
            d = {
                AtomicDataDict.POSITIONS_KEY: torch.as_tensor(np.asarray(pos), dtype=torch.float64).reshape(-1, 3),
                AtomicDataDict.ATOM_TYPE_KEY: torch.as_tensor([self._z_to_type[int(a)] for a in z], dtype=torch.long),
                AtomicDataDict.PBC_KEY: torch.zeros((1, 3), dtype=torch.bool),  # the neighbour list wants it
            }
            frames.append(AtomicDataDict.with_batch_(compute_neighborlist_(d, self.r_max)))
        data = AtomicDataDict.batched_from_list(frames)
        z = torch.as_tensor(np.concatenate([np.asarray(s[0]) for s in structures]), dtype=torch.long)
        return ModelBatch(len(structures), data["batch"], z, int(data["edge_index"].shape[1]), data)

    @property
    def supports_forces(self) -> bool:
        """Whether the model computes forces: it was saved with ``do_derivatives`` on (trained with forces)."""
        return bool(self._force_modules)

    def forward(self, batch: ModelBatch, hook: NodeHook | None = None) -> torch.Tensor:
        with self._hooked(hook):
            out = self.model(dict(batch.inputs))  # the model copies what it reads: the batch is not changed
        return out[TOTAL_ENERGY].reshape(-1)

    def energy_and_forces(self, batch: ModelBatch, hook: NodeHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Total energies [G] (eV) and NequIP's own forces [N, 3] (eV/Å, atoms in batch order), through the same hooks.

        ``do_derivatives`` is on for this call only; works under ``no_grad``. Detached.
        """
        if not self.supports_forces:
            raise IrrepscopeError("this NequIP model was trained for energies only (do_derivatives false): it has no forces")
        data = dict(batch.inputs)
        data[POSITIONS] = data[POSITIONS].detach()  # NequIP sets requires_grad on it: a new tensor, not the batch's
        with self._hooked(hook), self._derivatives(), torch.enable_grad():
            out = self.model(data)
        return out[TOTAL_ENERGY].reshape(-1).detach(), out[FORCES].detach()

    @contextlib.contextmanager
    def _derivatives(self) -> Iterator[None]:
        """``do_derivatives`` on for the force-trained modules, off again afterwards (whatever happens)."""
        for m in self._force_modules:
            m.do_derivatives = True
        try:
            yield
        finally:
            for m in self._force_modules:
                m.do_derivatives = False

    def _hooked(self, hook: NodeHook | None):
        """``hook(i, node_features)`` on every ``layer{i}_convnet``'s output while the block runs (none: no hooks)."""
        return hooked_outputs([layer for _, layer in self.layers], hook, NODE_FEATURES, copy=True)
