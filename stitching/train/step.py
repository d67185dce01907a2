"""The training step as a unit: :class:`StepState` (what the step touches) and :func:`train_step`.

Owns one micro-batch of training: forward under the run's precision (autocast bf16/fp16, or fp32), the
cross-entropy loss (or the epoch's ``train.objective``, :mod:`stitching.train.objective`), the backward
(scaled by the fp16 gradient scaler; DDP's gradient all-reduce skipped on all but the last micro-batch of an
accumulation), and, on the last micro-batch, the optimizer step, the
scaler update, the scheduler step and zeroing the gradients. Metrics are summed *on the device* (loss x
images, correct, images; float64) so no step waits for the host; the first optimizer step whose loss was
not finite is remembered on the device too (:attr:`StepState.nonfinite_step`).

The trainer (:mod:`stitching.train.loop`) and ``benchmarks/train_step.py`` both call :func:`train_step`,
so the benchmark times the trainer's own step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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
