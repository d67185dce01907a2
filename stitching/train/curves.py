"""Live curves: where a run's metrics go besides ``metrics.csv``, when asked (config ``output.log_to``).

Owns the trackers a run can log to (:data:`LOG_TARGETS`), the optional extra each needs (:data:`EXTRAS`: a
missing one is a one-line config error, :func:`check_installed`) and :class:`Curves`, which the
trainer's main process (rank 0 only) gives every row it appends to ``metrics.csv``: each column but ``epoch`` and
``step`` becomes a scalar of that name at step = the epoch. Off by default (``output.log_to: null``); the
``output`` section is not part of a run's identity, so asking for curves never makes a run another run. Names are
checked with the config (:func:`check`), the extras before the trainer builds anything and before a sweep writes
or submits a run (:func:`check_installed`).

- ``tensorboard`` (``pip install 'stitching[tensorboard]'``): event files in ``<run dir>/tensorboard``, written by
  ``torch.utils.tensorboard.SummaryWriter``; ``tensorboard --logdir runs/<sweep>`` shows every run of a sweep by its
  directory name. The resolved config is logged once as text. A resumed run opens its writer with
  ``purge_step`` = the first epoch it logs, so an epoch logged before a kill and trained again after it shows once.
- ``wandb`` (``pip install 'stitching[wandb]'``): offline unless you configure it (``WANDB_MODE=online`` after
  ``wandb login``; the run's files go to ``<run dir>/wandb``, ``wandb sync`` uploads them), project
  ``$WANDB_PROJECT`` or ``stitching``, named by the run directory, the resolved config as its config. The W&B run id
  is derived from the run directory, so a resumed run continues its W&B run (``resume="allow"``) and an epoch it
  logged already is not logged twice (W&B keeps the first value of a step).

A tracker that fails while the run trains (a full disk, W&B's service gone) is switched off with one line in
``train.log``: the curves are a convenience and never stop a run.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from pathlib import Path

from stitching.rundir import TENSORBOARD_DIR

LOG_TARGETS = ("tensorboard", "wandb")
#: tracker -> (the module it needs, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
#: the columns of a metrics row that are its position, not a curve
POSITION = ("epoch", "step")

log = logging.getLogger("stitching.train")


def check(cfg) -> None:
    """``output.log_to``: known trackers, each named once; otherwise ``cfg.error`` (a ConfigError: one line naming
    the key, its value and the file, exit 2). Part of the config check (``stitching.validate.validate``)."""
    targets = cfg.output.log_to or []
    for target in targets:
        if target not in LOG_TARGETS:
            raise cfg.error("output.log_to", f"{target!r} is not a tracker; choose from {', '.join(LOG_TARGETS)}")
    if len(set(targets)) != len(targets):
        raise cfg.error("output.log_to", "names a tracker twice")


def check_installed(cfg) -> None:
    """Each tracker of ``output.log_to`` has its optional extra here; otherwise ``cfg.error`` naming the extra to
    install. The trainer calls it before it builds anything, the sweep before it writes or submits a run (not the
    config check: a machine that only plans a sweep need not have them)."""
    for target in cfg.output.log_to or []:
        module, extra = EXTRAS[target]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise cfg.error("output.log_to", f"{target} needs the optional extra: pip install 'stitching[{extra}]' "
                            f"({type(err).__name__}: {err})") from None


def wandb_id(run_dir: str | os.PathLike) -> str:
    """The W&B run id of a run directory: the same directory, the same W&B run (resumed)."""
    return hashlib.sha1(str(Path(run_dir).absolute()).encode()).hexdigest()[:16]


class Curves:
    """The trackers of one run (its main process). :meth:`log` a metrics row after each epoch, :meth:`close` at
    the end. Each tracker is opened at the first row it gets (that row's epoch is where a resumed run goes on)."""

    def __init__(self, cfg, run_dir: str | os.PathLike):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.targets = list(cfg.output.log_to or [])
        self.writers: dict[str, object] = {}

    def log(self, row: dict) -> None:
        epoch = int(row["epoch"])
        values = {k: float(v) for k, v in row.items() if k not in POSITION and v not in ("", None)}
        for target in list(self.targets):
            try:
                if target not in self.writers:
                    self.writers[target] = getattr(self, f"_open_{target}")(epoch)
                getattr(self, f"_log_{target}")(self.writers[target], epoch, values)
            except Exception as err:  # noqa: BLE001 - a tracker never stops the run
                log.warning("output.log_to: %s failed (%s: %s); the run goes on without it", target,
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self.targets.remove(target)
                self.writers.pop(target, None)

    def close(self) -> None:
        for target, writer in list(self.writers.items()):
            try:
                writer.close() if target == "tensorboard" else writer.finish()
            except Exception as err:  # noqa: BLE001
                log.warning("output.log_to: closing %s failed (%s)", target, err)
        self.writers.clear()

    # ---- TensorBoard
    def _open_tensorboard(self, epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=epoch)
        if epoch == 1:
            writer.add_text("config", "```\n" + self.cfg.to_yaml() + "```", 0)
        return writer

    @staticmethod
    def _log_tensorboard(writer, epoch: int, values: dict) -> None:
        for key, value in values.items():
            writer.add_scalar(key, value, epoch)
        writer.flush()

    # ---- W&B
    def _open_wandb(self, epoch: int):
        import wandb

        return wandb.init(project=os.environ.get("WANDB_PROJECT", "stitching"), name=self.run_dir.name,
                          id=wandb_id(self.run_dir), resume="allow", dir=str(self.run_dir),   # (its files: wandb/)
                          mode=os.environ.get("WANDB_MODE", "offline"), config=self.cfg.to_dict())

    @staticmethod
    def _log_wandb(run, epoch: int, values: dict) -> None:
        run.log(values, step=epoch)         # (a step W&B has already is dropped, with its warning)
