"""Sweeps: grids of configurations x seeds run as ordinary runs, resumable, summarised with error bars."""
