"""Checkpoints: what is saved, per-rank RNG states, and loading the newest good one.

A checkpoint is a dict loadable with ``torch.load(weights_only=True)``: ``trainable`` (the state of
:func:`checkpointed_module`), ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (a list: one entry per rank,
each with the CPU generators and that rank's *own* CUDA device's state, so a run resumes on more or fewer
visible GPUs), ``position`` (:class:`Position`: epoch, micro-batch, optimizer step, every rank's metric sums, times) and
``saved_at``.
Rank 0 writes it through :meth:`stitching.rundir.RunDir.write_checkpoint` (atomic; the one before it kept
as the fallback). :func:`load_latest` takes the newest checkpoint that loads; a damaged one (truncated,
not a checkpoint) is said so in one line and set aside (renamed, never deleted).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from stitching.kinds import STITCHED
from stitching.rundir import RunDir
from stitching.train import distributed as D

log = logging.getLogger("stitching.train")

REQUIRED = ("trainable", "optimizer", "scheduler", "scaler", "rng", "position")

#: the position's optional keys: on disk only while they hold a value (None: absent)
_OPTIONAL = ("world_size", "init_residual", "epoch_timed_s", "epoch_images", "epoch_time")


@dataclasses.dataclass
class Position:
    """Where a run stands, as a checkpoint's ``position`` holds it (:meth:`to_dict` / :meth:`from_dict`: the same
    keys as the dict earlier versions wrote, so their checkpoints resume and theirs resume here).

    ``epoch`` (epochs done), ``batch`` (micro-batches done in the current epoch), ``step`` (optimizer steps done),
    ``wall`` (seconds of wall time, every trainer together), ``train_time`` / ``train_images`` (the run's timed
    windows, :class:`stitching.train.perf.Throughput`), ``sums`` (the epoch's metric sums: loss x images, correct,
    images; in a checkpoint, one list per rank). Optional, on disk while set: ``world_size`` (the processes that
    wrote it), ``init_residual`` (``model.init: least_squares``), ``similarity_before`` (measured once before epoch
    1: on disk once measured, ``measured``, even when None: nothing to measure), and the current epoch's timed
    window and wall time until its metrics row takes them (``epoch_timed_s``, ``epoch_images``, ``epoch_time``)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    wall: float = 0.0
    train_time: float = 0.0
    train_images: int = 0
    sums: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    world_size: int | None = None
    init_residual: float | None = None
    similarity_before: dict | None = None
    measured: bool = False                  # similarity_before is set (it may be None: nothing to measure)
    epoch_timed_s: float | None = None
    epoch_images: int | None = None
    epoch_time: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)   # keys of another version, carried along unread

    def to_dict(self) -> dict:
        """The checkpoint's ``position`` (plain values; ``torch.load(weights_only=True)`` reads it)."""
        out = {"epoch": self.epoch, "batch": self.batch, "step": self.step, "wall": self.wall,
               "train_time": self.train_time, "train_images": self.train_images, "sums": self.sums}
        out.update({k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None})
        if self.measured:
            out["similarity_before"] = self.similarity_before
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, d: dict) -> Position:
        """The position a checkpoint holds (any version's)."""
        named = {f.name for f in dataclasses.fields(cls)} - {"measured", "extra"}
        return cls(**{k: v for k, v in d.items() if k in named}, measured="similarity_before" in d,
                   extra={k: v for k, v in d.items() if k not in named})

    def take_epoch(self) -> tuple[int, float, float]:
        """The finished epoch's (timed images, timed seconds, wall time), cleared for the next epoch."""
        taken = (self.epoch_images or 0, self.epoch_timed_s or 0.0, self.epoch_time or 0.0)
        self.epoch_images = self.epoch_timed_s = self.epoch_time = None
        return taken

    def add_timed(self, timed: dict) -> None:
        """Add a stretch of training (:meth:`stitching.train.perf.Throughput.stop`) to the run's and the epoch's
        timed windows (an epoch cut by a preemption adds its parts) and the epoch's wall time, warm-up included."""
        self.train_time += timed["seconds"]
        self.train_images += timed["images"]
        self.epoch_timed_s = (self.epoch_timed_s or 0.0) + timed["seconds"]
        self.epoch_images = (self.epoch_images or 0) + timed["images"]
        self.epoch_time = (self.epoch_time or 0.0) + timed["wall_s"]

    def images_per_s(self) -> float:
        """The run's training images per second over its timed windows (0 before any)."""
        return self.train_images / self.train_time if self.train_time > 0 else 0.0


def checkpointed_module(model: nn.Module, kind: str, frozen_bn: str = "eval") -> nn.Module:
    """The part of the model whose state a checkpoint holds: the adapters of a stitched model, unless the
    frozen parts' BatchNorm statistics change during training (``train.frozen_bn: train``): then, like the
    fine-tuning baseline and an original model, the whole model."""
    return model.adapters if kind == STITCHED and frozen_bn != "train" else model


def get_rng(device: torch.device) -> dict:
    """This process's RNG states: CPU generators and, on CUDA, its own device's only."""
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
           "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1]),
           "python_version": random.getstate()[0]}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
    random.setstate((rng["python_version"], tuple(rng["python"]), None))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def gather(mine, info: D.DistInfo) -> list:
    """Every rank's ``mine`` (a collective: call on all ranks); index = rank."""
    if not info.enabled:
        return [mine]
    everyone: list = [None] * info.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def rank_sums(sums: list, info: D.DistInfo) -> list[float]:
    """This rank's metric sums from a checkpoint's per-rank list (with another number of ranks: their total on
    rank 0, zeros elsewhere, so the epoch's totals stay right)."""
    if not sums or not isinstance(sums[0], list):     # one list: written before per-rank sums
        sums = [sums or [0.0, 0.0, 0.0]]
    if len(sums) == info.world_size:
        return list(sums[info.rank])
    return [sum(col) for col in zip(*sums)] if info.rank == 0 else [0.0] * len(sums[0])


def restore_rng(rngs, device: torch.device, info: D.DistInfo) -> None:
    """Set this rank's RNG from a checkpoint's list (a run resumed with more ranks reuses them round-robin)."""
    if isinstance(rngs, dict):   # checkpoints written before per-rank states
        rngs = [rngs]
    set_rng(rngs[info.rank % len(rngs)], device)


def make(module: nn.Module, optimizer, scheduler, scaler, rng: list[dict], position: dict) -> dict:
    return {"trainable": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer else {},
            "scheduler": scheduler.state_dict() if scheduler else {},
            "scaler": scaler.state_dict(), "rng": rng, "position": dict(position),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def save(rundir: RunDir, ckpt: dict) -> None:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    rundir.write_checkpoint(buf.getvalue())


def load_latest(rundir: RunDir, set_aside: bool = True) -> dict | None:
    """The newest checkpoint that loads and has every part, or None. A damaged one is reported (one line on
    the log) and, with ``set_aside`` (rank 0), renamed to ``<name>.damaged-<stamp>``."""
    for path in rundir.checkpoint_candidates():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            missing = [k for k in REQUIRED if k not in ckpt] if isinstance(ckpt, dict) else list(REQUIRED)
            if missing:
                raise ValueError(f"not a checkpoint of this trainer (no {', '.join(missing)})")
        except FileNotFoundError:
            continue        # rank 0 set it aside meanwhile
        except Exception as err:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if set_aside:
                moved = rundir.set_aside(path)
                log.warning("damaged checkpoint %s (%s): set aside as %s; trying the previous one", path,
                            why[:200], moved.name)
            continue
        return ckpt
    return None
