"""How the trainer uses the hardware: what ``train.precision: auto`` resolves to, the CUDA backend settings,
fused AdamW, when the ranks agree on a preemption signal, and how ``images_per_s`` is measured.

Owns (each decided here and nowhere else; the trainer and ``benchmarks/train_step.py`` call these):

- :func:`choose_precision` / :func:`resolve_precision`: ``auto`` is bf16 autocast on a GPU with bf16 tensor
  cores (compute capability >= 8.0: A100, H100, RTX 30xx/40xx, L4, ...), fp16 autocast with a gradient scaler
  below it (V100 = 7.0, T4 = 7.5: bf16 there is emulated and several times slower than fp16), fp32 on CPU
  (CPU autocast would change the numbers and rarely the speed).
- :func:`configure_backends`: on CUDA, ``cudnn.benchmark`` (the training shapes are fixed: cuDNN's autotuning
  is paid once in the warm-up steps) and TF32 for fp32 matmuls and convolutions (fp32 runs and the fp32 parts
  of an autocast run go through the tensor cores); logged once per process.
- :func:`use_fused_adamw`: AdamW's fused CUDA kernel (one launch for all parameters instead of a few per
  tensor) when every trainable parameter is a floating CUDA tensor. With fp16 it also lets the gradient
  scaler pass its inf check to the kernel instead of reading it on the host every step.
- :func:`preempt_check_due`: a signal (SIGTERM/SIGUSR1) is only remembered by its handler; the step loop looks
  at it at step boundaries. One process looks after every optimizer step (a Python attribute: free). Under
  DDP the ranks must stop at the *same* step, so they agree through an all-reduce, which is a host sync: it
  happens every ``train.preempt_check_every`` optimizer steps (default 10; counted by the run's step number,
  the same on every rank) and after each epoch's last step, not every step. The delay it adds is at most
  ``preempt_check_every - 1`` steps: with the default 10 and a GPU step of 0.05-0.5 s, under 5 s, against SLURM's
  ``--signal=B:USR1@300`` lead (300 s, this project's default) and the 30 s that SLURM's default ``KillWait`` leaves
  between a preemption's SIGTERM and its SIGKILL. Slow steps (multi-process CPU runs, seconds each) want a smaller
  k: k x step time + the checkpoint's write must stay well under 30 s.
- :class:`Throughput` and :data:`WARMUP_STEPS`: ``images_per_s`` is the images of an epoch's *timed window*
  over its wall time. The window leaves out the first ``min(WARMUP_STEPS, n // 2)`` optimizer steps of
  every stretch of ``n`` steps one process trains in an epoch (an epoch, or its part before or after a
  preemption): loader workers starting, ``torch.compile``, cuDNN autotuning, the allocator growing; images
  are counted over all ranks (per-rank images x world size). On CUDA the device is synchronised at the
  window's two edges only (no sync between them), so the window times the GPU's work, not the host's
  queueing. Evaluation is never inside it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import torch

log = logging.getLogger("stitching.train")

PRECISIONS = ("bf16", "fp16", "fp32")
BF16_MIN_CAPABILITY = (8, 0)        # Ampere: the first GPUs with bf16 tensor cores
PREEMPT_CHECK_EVERY = 10            # default of train.preempt_check_every (see the module docstring)
WARMUP_STEPS = 10                   # optimizer steps left out of images_per_s at the start of each stretch


# ----------------------------------------------------------------------------------------- precision
def choose_precision(device_type: str, capability: tuple[int, int] | None = None) -> str:
    """What ``precision: auto`` means on a device: ``bf16`` on a CUDA device of compute capability >= 8.0,
    ``fp16`` (with a gradient scaler) below, ``fp32`` elsewhere (CPU). Pure: the capability is given."""
    if device_type != "cuda":
        return "fp32"
    if capability is None:
        raise ValueError("a CUDA device's compute capability is needed to choose its precision")
    return "bf16" if tuple(capability) >= BF16_MIN_CAPABILITY else "fp16"


def precision_warning(wanted: str, device_type: str, capability: tuple[int, int] | None) -> str | None:
    """A line for an explicit ``bf16`` on a GPU without bf16 tensor cores (it runs, emulated and slowly)."""
    if wanted == "bf16" and device_type == "cuda" and capability is not None \
            and tuple(capability) < BF16_MIN_CAPABILITY:
        return (f"train.precision=bf16 on a GPU of compute capability {capability[0]}.{capability[1]}, which has no "
                "bf16 tensor cores: slow; precision auto would take fp16 with a gradient scaler")
    return None


def resolve_precision(wanted: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` through :func:`choose_precision`, anything else as given
    (with :func:`precision_warning`'s line on the log where it applies)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if wanted == "auto":
        return choose_precision(device.type, capability)
    warning = precision_warning(wanted, device.type, capability)
    if warning:
        log.warning(warning)
    return wanted


# ---------------------------------------------------------------------------------------- backends
_configured: set[str] = set()


def backend_settings(device_type: str) -> dict:
    """The backend flags the trainer sets on ``device_type`` (none on CPU)."""
    if device_type != "cuda":
        return {}
    return {"cudnn.benchmark": True, "tf32 matmul": True, "tf32 conv": True}


def configure_backends(device: torch.device) -> dict:
    """Set :func:`backend_settings` (cuDNN autotuning, TF32) for ``device``; logs them the first time."""
    settings = backend_settings(device.type)
    if not settings:
        return settings
    torch.backends.cudnn.benchmark = True
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):       # torch >= 2.9: the new API (mixing it with the old one is an error)
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type not in _configured:
        _configured.add(device.type)
        log.info("CUDA: %s", ", ".join(settings))
    return settings


def use_fused_adamw(params: Iterable) -> bool:
    """Whether AdamW may take ``fused=True``: some parameters, every one a floating-point CUDA tensor."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)


def make_adamw(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``params``, fused where :func:`use_fused_adamw` allows (logged once)."""
    fused = use_fused_adamw(params)
    if fused and "fused" not in _configured:
        _configured.add("fused")
        log.info("CUDA: fused AdamW")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping this optimizer's own implementation flags (``fused``,
    ``foreach``): a checkpoint written on another device kind (CPU <-> CUDA) would otherwise bring its own,
    and a fused optimizer whose groups say not fused breaks fp16's gradient scaler (it hands the fused kernel
    its inf check)."""
    own = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, own):
        group.update(flags)


# --------------------------------------------------------------------------------------- preemption
def preempt_check_due(step: int, every: int, distributed: bool, epoch_end: bool = False) -> bool:
    """Whether the step loop looks at the preemption flag after optimizer step ``step`` (the run's count,
    1-based, equal on every rank): always for one process; under DDP every ``every`` steps and after an
    epoch's last step (so no evaluation lies between a signal and the ranks' look at it)."""
    return not distributed or epoch_end or step % every == 0


# --------------------------------------------------------------------------------------- throughput
def cuda_sync(device: torch.device) -> Callable[[], None]:
    """A function waiting for ``device``'s queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class Throughput:
    """The timed window of one stretch of ``steps`` optimizer steps (see the module docstring).

    Call :meth:`step` after every optimizer step with the images it trained (over all ranks), :meth:`stop`
    at the end (also early, on preemption). ``clock`` and ``sync`` are injectable (tests use a fake clock).
    """

    def __init__(self, steps: int, sync: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter, warmup: int | None = None):
        self.warmup = min(WARMUP_STEPS if warmup is None else warmup, max(steps, 0) // 2)
        self.sync, self.clock = sync, clock
        self.started = clock()
        self.window_start = self.started if self.warmup == 0 else None
        self.steps = 0
        self.images = 0          # images of the timed window
        self.all_images = 0      # images of every step (warm-up included)

    def step(self, images: int) -> None:
        self.steps += 1
        self.all_images += images
        if self.window_start is not None:
            self.images += images
        elif self.steps == self.warmup:
            self.sync()
            self.window_start = self.clock()

    def stop(self) -> dict:
        """``images`` and ``seconds`` of the timed window (0 and 0 if it never opened), ``wall_s`` of the
        whole stretch."""
        self.sync()
        now = self.clock()
        timed = now - self.window_start if self.window_start is not None else 0.0
        return {"images": self.images if self.window_start is not None else 0, "seconds": timed,
                "wall_s": now - self.started}

    def rate(self) -> float:
        """A progress figure without a sync: every image so far over the time so far (for the progress bar)."""
        return self.all_images / max(self.clock() - self.started, 1e-9)


def device_name(device: torch.device) -> str:
    """The device's name for the result row: the CUDA device's (e.g. ``NVIDIA H100 80GB HBM3``), else ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def images_per_s(images: float, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0
