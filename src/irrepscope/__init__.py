"""irrepscope: train equivariant graph networks on QM9 and measure which orders they use."""

__version__ = "0.1.0"
