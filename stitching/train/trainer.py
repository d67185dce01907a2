"""The state of one training run between its start and its end: :class:`Trainer` (the single run's; a pack's
branch extends it, :class:`stitching.train.branch.Branch`), the trainer's log and where a run stands in words."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from stitching import rundir as R, rundir_lock
from stitching.config import Config
from stitching.train import checkpoint as C
from stitching.train import curves
from stitching.train import distributed as D
from stitching.train import stop as S
from stitching.train.step import StepState

log = logging.getLogger("stitching.train")


class NonFiniteLoss(R.RunDirError):
    exit_code = R.EXIT_NONFINITE


@dataclasses.dataclass
class Trainer:
    """Everything a run holds between its start and its end (built by :func:`stitching.train.loop._start`)."""

    cfg: Config
    rundir: R.RunDir
    info: D.DistInfo
    device: torch.device
    lock: rundir_lock.Lock | None = None
    built: object = None                    # stitching.stitch.stitcher.BuiltModel
    cost: dict = dataclasses.field(default_factory=dict)
    steps_per_epoch: int = 0
    total_steps: int = 0
    per_device: int = 1
    accum: int = 1
    precision: str = "fp32"
    train_loader: object = None
    val_loader: object = None
    st: StepState | None = None
    pos: C.Position = dataclasses.field(default_factory=C.Position)     # where it stands (its checkpoints')
    metrics: list = dataclasses.field(default_factory=list)
    started: float = 0.0                    # wall clock of the last time accounting
    val_set: object = None                  # the whole validation set (the similarity at the join reads it)
    objective: object = None                # stitching.train.objective.Objective
    stop: S.StopSignals | None = None       # installed while training (stitching.train.stop)
    previous: dict = dataclasses.field(default_factory=dict)    # state.json as the last trainer left it
    saved: str = ""                         # where the last checkpoint written or loaded stands (words)
    ending: str = ""                        # how this trainer stopped, for state.json (a stop signal)
    to_device: tuple = (None, None)         # (train, eval) batch -> device (stitching.data.pipeline.batch_to_device)
    pack: str = ""                          # the pack it trains in (stitching.train.pack; result.csv's pack column)
    trackers: curves.Curves | None = None   # output.log_to: where the curves also go (the main process only)
    logging_was: tuple | None = None        # the log as it was before this run (ending.setup_logging)

    @property
    def model(self) -> nn.Module:
        return self.built.model

    @property
    def epochs(self) -> int:
        return self.cfg.train.epochs

    def checkpointed(self) -> nn.Module:
        return C.checkpointed_module(self.model, self.built.kind, getattr(self.cfg.train, "frozen_bn", "eval"))

    def say(self, msg: str, *args) -> None:
        if self.info.is_main:
            log.info(msg, *args)

    def where(self) -> str:
        """Where the run stands, in words (the position of the checkpoint being written or just loaded)."""
        pos, total = self.pos, self.total_steps
        if pos.batch >= self.steps_per_epoch * self.accum > 0:
            return f"after the training of epoch {pos.epoch + 1}, step {pos.step} of {total}; its evaluation reruns"
        if pos.batch == 0:
            return f"at the end of epoch {pos.epoch}, step {pos.step} of {total}"
        return f"in epoch {pos.epoch + 1} at step {pos.step} of {total}"
