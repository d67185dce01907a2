"""Sweeps: a grid of run configs expanded into run directories, launched locally or on SLURM.

``spec`` reads sweep files and expands them (dropping impossible and duplicate runs); ``__main__`` is the
command ``python -m stitching.sweep SWEEP.yaml --launcher local|slurm [--runs-dir DIR] [--dry-run]``.
"""
