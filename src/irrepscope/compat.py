"""What differs between the e3nn versions irrepscope runs on: 0.4.4 (MACE's pin) to 0.6 (NequIP's).

* **Import.** e3nn < 0.5 loads its constants with ``torch.load`` when ``e3nn.o3`` is first
  imported, and torch >= 2.6 refuses them by default (weights-only: "Unsupported global:
  GLOBAL slice"). :func:`import_e3nn` imports it with ``slice`` allowed for that one load
  (``torch.serialization.safe_globals``, a context: torch's allowlist is left as it was).
  ``import irrepscope`` calls it, so it runs before any of our modules imports e3nn.
* **Noise.** e3nn < 0.5 runs ``torch.jit.script`` on the modules it generates, and torch
  2.13 warns about that (a deprecation and a TorchScript annotation notice per module).
  :func:`quiet_e3nn` silences exactly those two warnings while we build e3nn modules.
* **Numbers.** e3nn 0.5 changed how it computes the Clebsch-Gordan coefficients: 70 of the
  154 ``wigner_3j(l1, l2, l3)`` with odd ``l1 + l2 + l3`` (all l <= 8) changed sign, none with
  an even sum. irrepscope's models have parity ``(-1)^l`` and only even paths, so a
  checkpoint is the same function under every supported version (``tests/test_e3nn_versions.py``
  checks a shipped checkpoint's predictions); models with odd paths (NequIP, MACE, SevenNet)
  are analysed where they were trained, in their own environment.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import warnings
from collections.abc import Iterator

__all__ = ["E3NN_VERSION", "E3NN_LEGACY", "import_e3nn", "quiet_e3nn"]


def _version(package: str) -> tuple[int, ...]:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


E3NN_VERSION = _version("e3nn")
E3NN_LEGACY = bool(E3NN_VERSION) and E3NN_VERSION < (0, 5)  # 0.4.x: MACE's pin


def import_e3nn() -> None:
    """Import ``e3nn.o3`` once so that it works under torch's weights-only default (a no-op for e3nn >= 0.5)."""
    if not E3NN_LEGACY or "e3nn.o3" in sys.modules:
        return
    import torch

    with torch.serialization.safe_globals([slice]), quiet_e3nn(), warnings.catch_warnings():
        # where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set (``import mace`` sets it), torch says so about this load
        warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", category=UserWarning)
        import e3nn.o3  # noqa: F401  (its constants.pt pickles slice objects)


@contextlib.contextmanager
def quiet_e3nn() -> Iterator[None]:
    """Silence e3nn 0.4's TorchScript warnings while e3nn modules are built (nothing else is filtered)."""
    if not E3NN_LEGACY:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The TorchScript type system doesn't support", category=UserWarning)
        yield
