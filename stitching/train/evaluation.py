"""Evaluation: top-1, top-5 (percent) and mean loss over a validation loader, summed on the device (float64:
no host sync per batch) and reduced exactly over the ranks. :func:`evaluate` runs one model's;
:func:`eval_sums` / :func:`eval_batch` / :func:`eval_result` are its parts (a pack evaluates its branches on the
same batches with them, :mod:`stitching.train.pack`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stitching.train import distributed as D
from stitching.train.step import StepState, autocast


@torch.no_grad()
def evaluate(st: StepState, loader, info: D.DistInfo, prepare=None, stop=None) -> dict | None:
    """Top-1, top-5 (percent) and mean loss over ``loader`` (this rank's share): summed on the device
    (float64: loss, top-1 hits, top-5 hits, images; no host sync per batch), then one all-reduce over the
    ranks and one read. ``stop(batches done)`` is asked before each batch but the first (so never after
    the last: a complete evaluation is kept); when it says stop, None."""
    device = st.device
    st.runner.eval()
    sums = eval_sums(st)
    for i, (x, y) in enumerate(loader, start=1):
        if stop is not None and i > 1 and stop(i - 1):
            return None
        # prepare: the pipeline's device stage (uint8 -> normalised float there; stitching.data.pipeline)
        x, y = prepare(x, y) if prepare else (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        eval_batch(st, x, y, sums)
    return eval_result(sums, info)


def eval_sums(st: StepState) -> torch.Tensor:
    """An evaluation's running sums on the device (float64: loss, top-1 hits, top-5 hits, images)."""
    return new_sums(st.device)


def new_sums(device: torch.device) -> torch.Tensor:
    """Zeroed evaluation sums on ``device`` (float64: loss, top-1 hits, top-5 hits, images)."""
    return torch.zeros(4, dtype=torch.float64, device=device)


def add_logits(sums: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Add one batch's float logits and labels to ``sums`` (on the device, no host sync)."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
    sums[1] += (topk[:, 0] == y).sum()
    sums[2] += (topk == y[:, None]).any(dim=1).sum()
    sums[3] += len(y)


def result_of(loss_sum: float, top1: float, top5: float, n: float) -> dict:
    """The evaluation's result from its summed values: top-1, top-5 (percent) and mean loss."""
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "val_loss": loss_sum / n}


@torch.no_grad()
def eval_batch(st: StepState, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
    """Add one validation batch (on the device, the runner in eval mode) to ``sums``."""
    if st.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(st.precision, st.device):
        logits = st.runner(x).float()
    add_logits(sums, logits, y)


def eval_result(sums: torch.Tensor, info: D.DistInfo) -> dict:
    """Top-1, top-5 (percent) and mean loss of an evaluation's sums, summed over the ranks (one read)."""
    return result_of(*D.all_sum_tensor(sums, info).tolist())
