"""What a training step's loss compares: the objectives of ``train.objective``.

Owns :data:`OBJECTIVES` and the loss of each, the epoch at which ``match_then_task`` switches, the frozen
destination parts the non-task objectives read, and what their extra forward pass costs:

- ``task``: cross-entropy with the labels, the paper's objective. The step computes it itself
  (:func:`stitching.train.step.train_step`, unchanged), so a task run is bit-identical with or without this
  module.
- ``match``: the mean squared error between the adapter chain's output (what the suffix receives) and the
  destination's own activation at the receiving point on the same augmented image -- training the stitch to
  copy the representation it replaces (Hernandez et al.'s representation matching) rather than to solve the
  task. The suffix still runs (on the detached output, without autograd) for the training accuracy.
- ``distill``: ``T^2 KL(teacher || student)`` of the softmaxes at temperature ``T``
  (``train.distill_temperature``; Hinton et al.'s scaling keeps the gradients' size independent of T), the
  teacher being the frozen destination network's own logits on the same image.
- ``match_then_task``: ``match`` for the first ``train.match_epochs`` epochs (default half of them), then
  ``task``. The switch falls on an epoch boundary and is decided from the epoch number, which a checkpoint
  holds, so a resumed run switches where an uninterrupted one does.

The destination's extra forward pass runs under ``torch.no_grad`` on a frozen copy made when the run starts
(eval mode, ``requires_grad=False``, BatchNorm folded when ``train.fold_bn``, stochastic layers off): the
destination as it was loaded, whatever ``train.frozen_bn`` later does to the stitched model's own suffix.
:func:`train_macs` counts it in the result's ``train_macs`` column (the ``macs`` column stays the stitched
model's inference cost); :func:`step_macs` is a whole training step's cost (forward and backward) under each
loss, for the sweep's cost estimate.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from stitching.kinds import STITCHED
from stitching.stitch.join import on_destination_grid
from stitching.train.step import autocast

OBJECTIVES = ("task", "match", "distill", "match_then_task")


def match_epochs(cfg) -> int:
    """The epochs of ``match`` before ``task`` in ``match_then_task`` (``train.match_epochs``; null: half)."""
    return cfg.train.resolved_match_epochs()


def objective_at(cfg, epoch: int) -> str:
    """The loss epoch ``epoch`` (0-based) trains with: ``task``, ``match`` or ``distill``."""
    name = cfg.train.objective
    if name == "match_then_task":
        return "match" if epoch < match_epochs(cfg) else "task"
    return name


def match_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (float32)."""
    return F.mse_loss(output.float(), target.float())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (float32)."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=1)
    log_t = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (t * t)


def frozen_copy(part: nn.Module, fold: bool) -> nn.Module:
    """A deep copy of ``part`` for no-grad inference (BatchNorm folded with ``fold``)."""
    from stitching.stitch.fast import inference_copy

    if fold:
        return inference_copy(part)
    return copy.deepcopy(part).eval().requires_grad_(False)


class Objective:
    """A run's objective: :meth:`at` gives the loss of an epoch for :attr:`StepState.objective` (None: the
    step's own task loss). ``built`` is the run's :class:`~stitching.stitch.stitcher.BuiltModel` (stitched,
    unless the objective is ``task``)."""

    def __init__(self, cfg, built, device: torch.device | str = "cpu", channels_last: bool = False):
        self.cfg = cfg
        self.name = cfg.train.objective
        self.temperature = cfg.train.distill_temperature
        self.target = self.suffix = None
        if self.name == "task":
            return
        if built.kind != STITCHED or built.target is None:
            raise ValueError(f"train.objective={self.name} needs a stitched model with adapters")
        fold = bool(cfg.train.fold_bn)
        self.target = frozen_copy(built.target, fold).to(device)
        if self.name == "distill":
            self.suffix = frozen_copy(built.model.suffix, fold).to(device)
        if channels_last:
            from stitching.stitch.fast import to_channels_last

            for part in (self.target, self.suffix):
                if part is not None:
                    to_channels_last(part)

    def at(self, epoch: int):
        """The step's loss for epoch ``epoch`` (0-based): a callable ``(st, x, y) -> (logits, loss)``, or None
        for the task loss."""
        which = objective_at(self.cfg, epoch)
        return {"task": None, "match": self._match, "distill": self._distill}[which]

    def _match(self, st, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(st.precision, st.device):
            logits, joined = st.runner(x, join=True)
            with torch.no_grad():
                want = self.target(x)
        return logits, match_loss(on_destination_grid(joined, want), want)

    def _distill(self, st, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(st.precision, st.device):
            logits = st.runner(x)
            with torch.no_grad():
                teacher = self.suffix(self.target(x))
        return logits, distill_loss(logits, teacher, self.temperature)

    def extra_macs(self, img_size: int) -> dict[str, int]:
        """MACs per image of the destination's extra forward pass, per loss: ``{task, match, distill}``."""
        from stitching.stitch.cost import count_cost

        out = {"task": 0, "match": 0, "distill": 0}
        if self.target is not None:
            out["match"] = count_cost(self.target, img_size)["macs"]
        if self.suffix is not None:
            out["distill"] = count_cost(nn.Sequential(self.target, self.suffix), img_size)["macs"]
        return out


def train_macs(cfg, macs: int, extra: dict[str, int]) -> int | str:
    """Forward MACs per training image: the stitched model's ``macs`` plus the destination's extra forward
    pass of each epoch's loss, averaged over the epochs (the backward pass is not counted); '' without
    training (``train.epochs: 0``)."""
    epochs = cfg.train.epochs
    if epochs <= 0:
        return ""
    total = sum(macs + extra[objective_at(cfg, e)] for e in range(epochs))
    return round(total / epochs)


def step_macs(cost, loss: str) -> int:
    """MACs of one training image's step, forward and backward, under ``loss`` (``task``, ``match`` or
    ``distill``: :func:`objective_at`) for a model whose parts cost ``cost``
    (:class:`stitching.stitch.cost.StitchCost`). A model trained whole (fine-tuning, an original) costs its
    ``trained``. A stitched one: the frozen prefix's forward pass, the adapters' forward pass and weight
    gradients, then, for ``task``, the frozen suffix's forward pass and its input gradient (back to the
    adapters); ``distill`` adds the teacher's forward pass (the destination's own network up to the join, then
    its suffix); ``match`` runs the suffix forward only (on the detached output, without autograd) and adds
    the destination's own network up to the join (the activation to match)."""
    if cost.kind != STITCHED:
        return cost.trained
    step = cost.prefix + cost.adapters.forward + cost.adapters.backward_weights + cost.suffix.forward
    if loss == "match":
        return step + cost.target
    step += cost.suffix.backward_input
    return step + (cost.target + cost.suffix.forward if loss == "distill" else 0)
