"""Process-wide state that other packages change and that we put back: environment variables,
torch's default dtype and the random number generators.

NequIP sets its global state when a model is loaded, ``import mace`` sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, MACE's data code changes the default dtype, and the xTB
sampler sets thread counts for the workers it spawns; the caller of irrepscope's API finds all of
these as they were.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

__all__ = ["environ_restored", "numerics_restored"]


@contextlib.contextmanager
def environ_restored(keys: Iterable[str], set_to: Mapping[str, str] | None = None) -> Iterator[None]:
    """Within the block, the environment variables ``keys`` (and those of ``set_to``, set to its values) may change;
    afterwards each is as it was before, unset if it was."""
    saved = {k: os.environ.get(k) for k in (*keys, *(set_to or {}))}
    os.environ.update(set_to or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def numerics_restored() -> Iterator[None]:
    """Put back torch's default dtype and the torch (CPU and CUDA), NumPy and Python RNG states after the block."""
    import torch  # here: the xTB sampler's spawned workers import this module and need no torch

    dtype = torch.get_default_dtype()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_rng, py_rng = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
