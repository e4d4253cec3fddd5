"""irrepscope: train equivariant graph networks on QM9 and measure which orders they use.

The public Python API (see the README's "Python API"): :func:`load_run`, :func:`analyze`,
:func:`analyze_run`, :func:`analyze_model`, :func:`analyze_nequip`, :func:`analyze_mace`, :func:`analyze_sevenn` and :class:`AnalysedModel`, the interface a
model family implements to be analysed. Imported lazily: ``import irrepscope`` stays cheap
for the CLI.
"""

__version__ = "0.1.0"

from irrepscope.compat import import_e3nn as _import_e3nn

_import_e3nn()  # before any of our modules imports e3nn: e3nn 0.4 (MACE's pin) needs it under torch >= 2.6

__all__ = [
    "AnalysedModel", "OwnModel", "Run", "analyze", "analyze_mace", "analyze_model", "analyze_nequip", "analyze_run", "analyze_sevenn",
    "analyze_sweep", "load_run",
]  # fmt: skip


def __getattr__(name: str):
    if name in __all__:
        from irrepscope import api

        return getattr(api, name)
    raise AttributeError(f"module 'irrepscope' has no attribute {name!r}")
