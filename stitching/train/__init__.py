"""Train: the paper's recipe on one or many devices, the run directory, resume and preemption.

``python -m stitching.train --config FILE [section.key=value ...]`` (or ``--run-dir DIR``) and, from Python,
``stitching.train(config, **overrides)`` (this package is callable: :func:`train`) both resolve the config with
:func:`resolve` and run :func:`stitching.train.loop.run` (both in ``entry``, with :class:`RunFailed`; this
``__init__`` only binds their names and makes the package callable). Modules: ``distributed`` (torchrun/DDP set-up),
``step`` (the training step as a unit, built with AdamW and the learning-rate schedule), ``checkpoint`` (what a
checkpoint holds, its position, per-rank RNG, loading the newest good one), ``objective`` (the loss of
``train.objective``), ``measure`` (the similarity at the join written to the result), ``perf`` (precision
``auto``, the CUDA settings, fused AdamW, the preemption-check cadence, how ``images_per_s`` is timed),
``trainer`` (a run's state), ``opening`` (the start: device, batch split, run directory, model, data),
``evaluation``, ``saved`` (``model.safetensors`` and :func:`~stitching.train.saved.load_trained`), ``ending``
(the log, ``state.json`` and the lock at the end, Ctrl-C), ``loop`` (epochs, checkpoints, stop signals, the
result row from :func:`stitching.results.row.result_row`), ``pack`` / ``branch`` (packed runs). The run
directory and the exit codes are :mod:`stitching.rundir`'s.

Why a callable package: ``stitching.train`` must stay this package (``python -m stitching.train``, ``import
stitching.train.loop``; importing a submodule binds the package to the attribute ``stitching.train``), and be
the function a notebook calls. The package's module class gets a ``__call__`` (:class:`_CallablePackage`), so
whichever is imported first, ``stitching.train`` is one object that is both.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from stitching.train.entry import API, RunFailed, resolve, train  # noqa: F401  (the package's own names)


class _CallablePackage(types.ModuleType):
    """This package's module type: calling the package is calling :func:`train`."""

    def __call__(self, config=None, **kwargs) -> Path:
        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
