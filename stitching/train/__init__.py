"""Train: the paper's recipe on one or many devices, the run directory, resume and preemption.

``python -m stitching.train --config FILE [section.key=value ...]`` (or ``--run-dir DIR``) runs
:func:`stitching.train.loop.run`. Modules: ``distributed`` (torchrun/DDP set-up), ``step`` (the training step as
a unit), ``checkpoint`` (what a checkpoint holds, per-rank RNG, loading the newest good one), ``objective`` (the
loss of ``train.objective``), ``measure`` (the similarity at the join written to the result), ``perf`` (precision
``auto``, the CUDA settings, fused AdamW, the preemption-check cadence, how ``images_per_s`` is timed), ``loop``
(optimizer, schedule, epochs, evaluation, result row). The run directory and the exit codes are
:mod:`stitching.rundir`'s.
"""
