"""Train: the paper's recipe on one or many devices, the run directory, resume and preemption.

``python -m stitching.train --config FILE [section.key=value ...]`` (or ``--run-dir DIR``) runs
:func:`stitching.train.loop.run`. Modules: ``distributed`` (torchrun/DDP set-up), ``rundir`` (files of a
run, atomic writes, checkpoints), ``loop`` (optimizer, schedule, steps, evaluation, result row).
"""

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1; run the same command again
