"""MACE models (``mace-torch`` 0.3.16, optional extra ``irrepscope[mace]``) behind the analysis interface.

A MACE model as ``mace_run_train`` writes it (``NAME.model``: a pickled ``MACE`` or
``ScaleShiftMACE``) is analysed layer by layer: each layer ends in ``products[i]``
(``EquivariantProductBasisBlock``), whose output, residual included, is the node features
that the next layer and the layer's readout use, so a forward hook there reads (and may
replace) them. The last layer is scalars only by default; its other orders are ``absent``.
Every layer has a readout (the last one nonlinear), so the model is not linear in its
features: every ablation re-runs it. ``NAME_compiled.model`` (TorchScript) cannot be
hooked and is refused with the name of the file to pass instead.

Graphs are MACE's own (``mace.data.AtomicData.from_config``, the builder its ASE calculator
uses, at the model's ``r_max``), batched with MACE's torch_geometric copy. Forces are
MACE's: ``-dE/dpositions`` inside its forward pass (``compute_force``), with the hooks on,
so an order zeroed by a hook is missing from the forces too.

MACE pins e3nn 0.4.4, so it lives in an environment of its own (README, "Two
environments"). Loading leaves the caller's global state as it was: ``import mace`` sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process and prints a notice on
stdout, and MACE's data code reads torch's default dtype; all of that is undone or scoped
(:func:`caller_state`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from e3nn import o3

from irrepscope.analysis.interface import AnalysedModel, ModelBatch, NodeHook, hooked_outputs, known_atoms
from irrepscope.compat import quiet_e3nn
from irrepscope.data.structures import Structures
from irrepscope.errors import IrrepscopeError
from irrepscope.process_state import environ_restored, numerics_restored

INSTALL = "pip install 'irrepscope[mace]' in an environment of its own (mace-torch pins e3nn 0.4.4; README, 'Two environments')"
SUFFIX = ".model"
COMPILED_SUFFIX = "_compiled.model"
_ENV_KEYS = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")


@contextlib.contextmanager
def caller_state() -> Iterator[None]:
    """Run MACE code and put back what it changes globally: the environment variables above, torch's
    default dtype, the torch, NumPy and Python RNG states; MACE's stdout notices are swallowed."""
    with environ_restored(_ENV_KEYS), numerics_restored(), contextlib.redirect_stdout(io.StringIO()), quiet_e3nn():
        yield


def require_mace() -> None:
    """Import ``mace`` (state kept, see :func:`caller_state`), or a one-line error naming the extra."""
    try:
        with caller_state():
            import mace  # noqa: F401
            import mace.data  # noqa: F401
            import mace.modules  # noqa: F401
    except ImportError:
        raise IrrepscopeError(f"analysing MACE models needs the mace-torch package: {INSTALL}") from None


def is_mace_model(path: str | Path) -> bool:
    """Whether ``path`` names a MACE model file (``.model``, as mace_run_train writes them)."""
    return str(path).endswith(SUFFIX)


def load_mace(path: str | Path) -> torch.nn.Module:
    """The MACE model in ``path`` (``NAME.model``), on the CPU, in eval mode; its parameters keep their dtype.

    The file is a pickle (MACE's own format): load only files you trust, as with MACE itself.
    """
    path = Path(path)
    if str(path).endswith(COMPILED_SUFFIX):
        plain = path.name[: -len(COMPILED_SUFFIX)] + SUFFIX
        raise IrrepscopeError(f"{path} is a compiled (TorchScript) MACE model, which cannot be hooked; pass {plain} instead")
    if not path.is_file():
        raise IrrepscopeError(f"MACE model not found: {path}")
    if _is_torchscript(path):
        raise IrrepscopeError(f"{path} is a compiled (TorchScript) MACE model, which cannot be hooked; pass the plain .model file")
    require_mace()
    with caller_state():
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a pickle can fail in many ways
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IrrepscopeError(f"cannot load MACE model {path}: {first}") from None
    if not all(hasattr(model, name) for name in ("products", "interactions", "r_max", "atomic_numbers")):
        raise IrrepscopeError(f"{path} holds a {type(model).__name__}, not a MACE model")
    return model.to("cpu").eval()


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (its zip holds ``code/``), told apart without loading it."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


class MaceModel(AnalysedModel):
    """A MACE model: blocks are its layers (the output of ``products[i]``), predictions its energies (eV), forces its own."""

    family = "mace"
    linear_in_features = False  # a readout per layer, the last nonlinear
    supports_forces = True

    def __init__(self, model: torch.nn.Module, name: str = "mace") -> None:
        require_mace()
        self.model, self.name = model, name
        self.cutoff = float(model.r_max)
        self.elements = [int(z) for z in model.atomic_numbers]
        self.heads = list(getattr(model, "heads", None) or ["Default"])

    @classmethod
    def load(cls, path: str | Path) -> "MaceModel":
        return cls(load_mace(path), name=str(path))

    @property
    def block_irreps(self) -> list[o3.Irreps]:
        return [o3.Irreps(str(product.linear.irreps_out)) for product in self.model.products]

    @property
    def block_names(self) -> list[str]:
        return [f"products.{i}" for i in range(len(self.model.products))]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def batches(self, mols: Structures, indices: np.ndarray, batch_size: int) -> Iterator[ModelBatch]:
        for start in range(0, len(indices), batch_size):
            yield self.batch_of(mols, indices[start : start + batch_size])

    def batch_of(self, mols: Structures, indices: np.ndarray) -> ModelBatch:
        """``mols[indices]`` as one batch of MACE graphs (its own builder, at the model's r_max; cells where given)."""
        from mace import data as mace_data
        from mace.tools import AtomicNumberTable
        from mace.tools.torch_geometric import Batch

        table = AtomicNumberTable(self.elements)
        graphs = []
        with caller_state():
            torch.set_default_dtype(self.dtype)  # MACE's graphs take the default dtype (undone on exit)
            for i in np.asarray(indices, dtype=np.int64):
                atoms = known_atoms(mols, i, self.elements, f"MACE model {self.name}")
                config = mace_data.config_from_atoms(atoms, head_name=self.heads[0])
                graphs.append(mace_data.AtomicData.from_config(config, z_table=table, cutoff=self.cutoff, heads=self.heads))
            data = Batch.from_data_list(graphs)
        z = torch.as_tensor(np.asarray(self.elements)[data["node_attrs"].argmax(1).numpy()], dtype=torch.long)
        return ModelBatch(len(graphs), data["batch"], z, int(data["edge_index"].shape[1]), data)

    def _run(self, batch: ModelBatch, hook: NodeHook | None, forces: bool) -> dict:
        """MACE's forward pass on a fresh dict of the batch (it marks positions as requiring grad), hooks on the products."""
        data = batch.inputs.to_dict()
        data["positions"] = data["positions"].detach().clone()
        with hooked_outputs(self.model.products, hook):
            return self.model(data, training=False, compute_force=forces)

    def forward(self, batch: ModelBatch, hook: NodeHook | None = None) -> torch.Tensor:
        return self._run(batch, hook, forces=False)["energy"].reshape(-1)

    def energy_and_forces(self, batch: ModelBatch, hook: NodeHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies [G] (eV) and MACE's own forces [N, 3] (eV/Å, batch order), through the same hooks. Detached."""
        with torch.enable_grad():
            out = self._run(batch, hook, forces=True)
        return out["energy"].reshape(-1).detach(), out["forces"].detach()
