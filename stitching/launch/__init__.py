"""Launchers that run a list of run directories, locally or as SLURM job arrays.

A sweep produces one run directory per configuration; a launcher decides where
and how each of them is trained.  :mod:`stitching.launch.slurm` turns the list
into one ``sbatch`` job array (task *i* trains line *i* of a task file) and can
tell which run directories already have a pending or running task, so that
re-submitting a sweep never puts two jobs on one run directory.
"""
