"""The training step as a unit: :class:`StepState` (what the step touches) and :func:`train_step`.

Owns one micro-batch of training: forward under the run's precision (autocast bf16/fp16, or fp32), the
cross-entropy loss (or the epoch's ``train.objective``, :mod:`stitching.train.objective`), the backward
(scaled by the fp16 gradient scaler; DDP's gradient all-reduce skipped on all but the last micro-batch of an
accumulation), and, on the last micro-batch, the optimizer step, the
scaler update, the scheduler step and zeroing the gradients. Metrics are summed *on the device* (loss x
images, correct, images; float64) so no step waits for the host; the first optimizer step whose loss was
not finite is remembered on the device too (:attr:`StepState.nonfinite_step`).

The step is built by :func:`build_step` (the fast runner, DDP, AdamW over the trainable parameters, the
learning-rate schedule :func:`lr_factor`, the fp16 scaler). The trainer (:mod:`stitching.train.loop`) and
``benchmarks/train_step.py`` both build and call it, so the benchmark times the trainer's own step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stitching.kinds import STITCHED
from stitching.stitch import fast
from stitching.train import distributed as D
from stitching.train import perf as P

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast(precision: str, device: torch.device):
    dtype = AUTOCAST[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass
class StepState:
    """The module that runs the step and everything one step updates."""

    runner: nn.Module                   # the module the step runs (folded / channels-last / compiled / DDP)
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str = "fp32"             # fp32 | bf16 | fp16
    accum: int = 1                      # micro-batches per optimizer step
    channels_last: bool = False
    label_smoothing: float = 0.0
    distributed: bool = False           # runner is DistributedDataParallel
    step: int = 0                       # optimizer steps taken in the run
    sums: torch.Tensor = field(default=None)            # (loss x images, correct, images), float64, device
    nonfinite_step: torch.Tensor = field(default=None)  # first step with a non-finite loss; -1: none
    objective: Callable | None = None   # (st, x, y) -> (logits, loss) of this epoch (stitching.train.objective);
                                        # None: cross-entropy with the labels (the task loss)

    def __post_init__(self):
        if self.sums is None:
            self.reset_sums()
        if self.nonfinite_step is None:
            self.nonfinite_step = torch.tensor(-1, dtype=torch.int64, device=self.device)

    def reset_sums(self, values=(0.0, 0.0, 0.0)) -> None:
        self.sums = torch.tensor(list(values), dtype=torch.float64, device=self.device)

    def nonfinite(self) -> int | None:
        """The first optimizer step (1-based) whose loss was NaN/Inf, or None (one host sync)."""
        s = int(self.nonfinite_step.item())
        return s if s >= 0 else None

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0


def train_step(st: StepState, x: torch.Tensor, y: torch.Tensor, micro: int) -> torch.Tensor:
    """Train on micro-batch number ``micro`` of the epoch (0-based): forward, backward and, when it ends an
    accumulation, the optimizer/scaler/scheduler step (then ``st.step`` grows by one). Returns the loss
    (a device tensor; reading it syncs)."""
    x = x.to(st.device, non_blocking=True)
    y = y.to(st.device, non_blocking=True)
    if st.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    last = (micro + 1) % st.accum == 0
    no_sync = st.runner.no_sync() if st.distributed and not last else contextlib.nullcontext()
    with no_sync:
        if st.objective is None:
            with autocast(st.precision, st.device):
                logits = st.runner(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=st.label_smoothing)
        else:
            logits, loss = st.objective(st, x, y)
        st.scaler.scale(loss / st.accum).backward()
    with torch.no_grad():
        loss_d = loss.detach()
        st.sums[0] += loss_d * len(y)
        st.sums[1] += (logits.detach().argmax(1) == y).sum()
        st.sums[2] += len(y)
        bad = ~torch.isfinite(loss_d) & (st.nonfinite_step < 0)
        st.nonfinite_step.copy_(torch.where(bad, st.step + 1, st.nonfinite_step))
    if last:
        if st.optimizer is not None:
            st.scaler.step(st.optimizer)
            st.scaler.update()
            st.optimizer.zero_grad(set_to_none=True)
        if st.scheduler is not None:
            st.scheduler.step()
        st.step += 1
    return loss_d


def build_step(model: nn.Module, cfg, kind: str, device: torch.device, precision: str, accum: int,
               steps_per_epoch: int, info: D.DistInfo = D.DistInfo()) -> StepState:
    """The step of a run: the fast runner (folded frozen BatchNorms, channels-last, compile; DDP over ranks),
    AdamW over the trainable parameters, the learning-rate schedule and the fp16 scaler. ``model`` is on
    ``device`` already; ``cfg`` is the run's :class:`stitching.config.Config` (read, not imported here: config
    reads the objective, which reads this module)."""
    channels_last = backends(cfg, device)
    runner = fast.prepare_for_training(model, fold_bn=cfg.train.fold_bn and kind == STITCHED,
                                       channels_last=channels_last, compile=cfg.train.compile)
    return step_state(runner, model, cfg, device, precision, accum, steps_per_epoch, info, channels_last)


def backends(cfg, device: torch.device) -> bool:
    """Set the device's backends (:func:`stitching.train.perf.configure_backends`); whether the run is
    channels-last (``train.channels_last``; ``auto``: :func:`stitching.stitch.fast.default_channels_last`)."""
    P.configure_backends(device)            # cuDNN autotuning, TF32 (CUDA only)
    want = cfg.train.channels_last
    return fast.default_channels_last(device) if want == "auto" else bool(want)


def step_state(runner: nn.Module, model: nn.Module, cfg, device: torch.device, precision: str, accum: int,
               steps_per_epoch: int, info: D.DistInfo, channels_last: bool) -> StepState:
    """The step around ``runner`` (the module that runs ``model``'s training step, on ``device``): DDP over ranks,
    AdamW over ``model``'s trainable parameters, the learning-rate schedule and the fp16 scaler."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if info.enabled and cfg.train.epochs > 0:
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[info.local_rank]
                                                     if device.type == "cuda" else None)
    optimizer = P.make_adamw(trainable, cfg.train.lr, cfg.train.weight_decay) if trainable else None
    total_steps = max(1, cfg.train.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch, total_steps)) \
        if optimizer else None
    return StepState(runner, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                     device, precision=precision, accum=accum, channels_last=channels_last,
                     label_smoothing=cfg.train.label_smoothing, distributed=isinstance(
                         runner, nn.parallel.DistributedDataParallel))


def lr_factor(cfg, steps_per_epoch: int, total_steps: int):
    """The learning rate's factor at an optimizer step (``train.lr_schedule``): constant, or cosine annealing to 0
    over the run, stepped per optimizer step or per epoch (``train.lr_schedule_unit``)."""
    if cfg.train.lr_schedule == "constant":
        return lambda step: 1.0
    if cfg.train.lr_schedule_unit == "epoch":
        epochs = max(1, cfg.train.epochs)
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step // steps_per_epoch, epochs) / epochs))
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
