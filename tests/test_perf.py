"""The GPU-side decisions of :mod:`stitching.train.perf`, checked on CPU: the precision ``auto`` picks for a
given compute capability, when AdamW is fused, the CUDA backend flags, the cadence of the ranks' preemption
check, ``images_per_s``'s timed window (a fake clock, then the real trainer with a slow first step standing
for compilation), and evaluation's on-device sums against the per-batch figures."""

from __future__ import annotations

import csv
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stitching.train import perf as P
from tests.conftest import ROOT


# ----------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("device_type,capability,expected", [
    ("cpu", None, "fp32"),
    ("cuda", (7, 0), "fp16"),      # V100: no bf16 tensor cores
    ("cuda", (7, 5), "fp16"),      # T4
    ("cuda", (8, 0), "bf16"),      # A100
    ("cuda", (8, 6), "bf16"),      # RTX 30xx / A10
    ("cuda", (8, 9), "bf16"),      # L4 / RTX 40xx
    ("cuda", (9, 0), "bf16"),      # H100
    ("cuda", (12, 0), "bf16"),
])
def test_auto_precision_follows_the_compute_capability(device_type, capability, expected):
    assert P.choose_precision(device_type, capability) == expected


def test_auto_precision_on_cuda_needs_the_capability_and_explicit_choices_pass_through():
    with pytest.raises(ValueError):
        P.choose_precision("cuda", None)
    assert P.resolve_precision("auto", torch.device("cpu")) == "fp32"
    for p in ("bf16", "fp16", "fp32"):
        assert P.resolve_precision(p, torch.device("cpu")) == p


def test_a_step_built_for_what_auto_picks_on_a_gpu(tmp_path):
    """The step built for what ``auto`` picks on a V100 (fp16) has an enabled gradient scaler; on an A100
    (bf16) none; AdamW over CPU parameters is not fused."""
    from stitching.validate import load_config
    from stitching.stitch.stitcher import build_model
    from stitching.train.step import build_step

    cfg = load_config(ROOT / "configs" / "synthetic" / "tiny.yaml", ["train.device=cpu"])
    built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
    st = build_step(built.model, cfg, built.kind, torch.device("cpu"), P.choose_precision("cuda", (7, 0)), 1, 4)
    assert st.precision == "fp16" and st.scaler.is_enabled()
    st = build_step(built.model, cfg, built.kind, torch.device("cpu"), P.choose_precision("cuda", (8, 0)), 1, 4)
    assert st.precision == "bf16" and not st.scaler.is_enabled()
    assert not st.optimizer.defaults.get("fused")                 # CPU parameters: not fused


def test_explicit_bf16_on_a_gpu_without_bf16_tensor_cores_is_warned_about():
    assert "fp16" in P.precision_warning("bf16", "cuda", (7, 0))
    assert P.precision_warning("bf16", "cuda", (8, 0)) is None
    assert P.precision_warning("fp16", "cuda", (7, 5)) is None
    assert P.precision_warning("bf16", "cpu", None) is None


def test_a_run_in_fp16_trains_through_the_gradient_scaler(tmp_path):
    """What ``auto`` gives a V100 or T4 (fp16 autocast + gradient scaler), through the real trainer on CPU:
    the run finishes, its result says fp16 and its checkpoint holds the scaler's state."""
    from stitching.train.__main__ import main

    out = tmp_path / "run"
    assert main(["--config", str(ROOT / "configs" / "synthetic" / "tiny.yaml"), "train.device=cpu",
                 "train.precision=fp16", "data.val_size=64", f"output.dir={out}"]) == 0
    with (out / "result.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["precision"] == "fp16" and float(row["train_loss"]) > 0
    scaler = torch.load(out / "checkpoint.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0


# ----------------------------------------------------------------------------------- fused AdamW
def _param(device: str, dtype=torch.float32):
    """What use_fused_adamw reads of a parameter (a CUDA tensor cannot be made without a GPU)."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


def test_fused_adamw_only_when_every_parameter_is_a_floating_cuda_tensor():
    assert P.use_fused_adamw([_param("cuda:0"), _param("cuda:0", torch.bfloat16), _param("cuda:1", torch.float16)])
    assert not P.use_fused_adamw([_param("cuda:0"), _param("cpu")])           # one on the host
    assert not P.use_fused_adamw([_param("cuda:0"), _param("cuda:0", torch.int64)])
    assert not P.use_fused_adamw([])
    assert not P.use_fused_adamw(nn.Linear(2, 2).parameters())               # real CPU parameters
    opt = P.make_adamw(list(nn.Linear(2, 2).parameters()), 0.002, 0.05)
    assert not opt.defaults.get("fused") and opt.defaults["lr"] == 0.002 and opt.defaults["weight_decay"] == 0.05


def test_resuming_keeps_the_optimizers_own_fused_flag():
    """A checkpoint written by a non-fused optimizer (CPU) loaded into a fused one (what CUDA builds; fused
    AdamW also runs on CPU) keeps it fused, so fp16's scaler may hand it the inf check; and the reverse."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    plain = torch.optim.AdamW(model.parameters(), lr=0.002)
    model(torch.randn(4, 3)).sum().backward()
    plain.step()
    fused = torch.optim.AdamW(model.parameters(), lr=0.002, fused=True)
    P.load_optimizer_state(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"] is True and fused.state_dict()["state"][0]["step"] == 1
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    scaler.step(fused)                                 # the fused path takes the scaler's grad_scale/found_inf
    assert fused.state_dict()["state"][0]["step"] == 2
    P.load_optimizer_state(plain, fused.state_dict())
    assert not plain.param_groups[0]["fused"] and plain.state_dict()["state"][0]["step"] == 2


# ---------------------------------------------------------------------------------------- backends
def test_backend_flags_are_set_for_cuda_only():
    assert P.configure_backends(torch.device("cpu")) == {}
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    new_api = hasattr(matmul, "fp32_precision")
    before = (conv.benchmark, matmul.fp32_precision if new_api else matmul.allow_tf32,
              conv.conv.fp32_precision if new_api else conv.allow_tf32)
    try:
        settings = P.configure_backends(torch.device("cuda"))      # the flags are process-wide, no GPU needed
        assert set(settings) == {"cudnn.benchmark", "tf32 matmul", "tf32 conv"}
        assert conv.benchmark
        if new_api:
            assert matmul.fp32_precision == "tf32" and conv.conv.fp32_precision == "tf32"
        else:
            assert matmul.allow_tf32 and conv.allow_tf32
    finally:
        conv.benchmark = before[0]
        if new_api:
            matmul.fp32_precision, conv.conv.fp32_precision = before[1], before[2]
        else:
            matmul.allow_tf32, conv.allow_tf32 = before[1], before[2]


# -------------------------------------------------------------------------------------- preemption
def test_preemption_check_cadence():
    assert all(P.preempt_check_due(s, 10, distributed=False) for s in range(1, 30))   # one process: every step
    assert [s for s in range(1, 30) if P.preempt_check_due(s, 10, distributed=True)] == [10, 20]
    assert [s for s in range(1, 10) if P.preempt_check_due(s, 1, distributed=True)] == list(range(1, 10))
    assert P.preempt_check_due(15, 10, distributed=True, epoch_end=True)           # before the evaluation


def test_preempt_check_every_is_validated():
    from stitching.config import ConfigError
    from stitching.validate import load_config

    with pytest.raises(ConfigError, match="train.preempt_check_every"):
        load_config(ROOT / "configs" / "synthetic" / "tiny.yaml", ["train.preempt_check_every=0"])


# -------------------------------------------------------------------------------------- throughput
class FakeClock:
    def __init__(self):
        self.now, self.syncs = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sync(self) -> None:
        self.syncs.append(self.now)


def test_throughput_leaves_the_warm_up_steps_out():
    clock = FakeClock()
    meter = P.Throughput(20, clock.sync, clock, warmup=5)
    for i in range(20):
        clock.now += 30.0 if i < 5 else 1.0          # slow first steps: compilation, autotuning, workers
        meter.step(64)
    out = meter.stop()
    assert out == {"images": 15 * 64, "seconds": 15.0, "wall_s": 5 * 30.0 + 15.0}
    assert P.images_per_s(out["images"], out["seconds"]) == 64.0
    assert clock.syncs == [250.0, 265.0]             # the device waited for at the window's edges only


def test_throughput_of_short_and_cut_stretches():
    clock = FakeClock()
    meter = P.Throughput(4, clock.sync, clock, warmup=10)   # 4 steps: 2 of warm-up (half)
    for _ in range(4):
        clock.now += 2.0
        meter.step(8)
    assert meter.stop() == {"images": 16, "seconds": 4.0, "wall_s": 8.0}
    clock = FakeClock()
    meter = P.Throughput(100, clock.sync, clock, warmup=10)  # preempted during the warm-up: nothing timed
    for _ in range(3):
        clock.now += 1.0
        meter.step(8)
    assert meter.stop() == {"images": 0, "seconds": 0.0, "wall_s": 3.0}
    clock = FakeClock()
    meter = P.Throughput(1, clock.sync, clock, warmup=10)    # one step: no warm-up to leave out
    clock.now += 1.5
    meter.step(8)
    assert meter.stop() == {"images": 8, "seconds": 1.5, "wall_s": 1.5}


@pytest.mark.slow
def test_trainer_images_per_s_leaves_a_slow_first_step_out(tmp_path, monkeypatch):
    """The real trainer, with the first step of every epoch made 1.5 s slower (what compilation or cuDNN
    autotuning does on a GPU): each epoch's images_per_s is timed over its last 4 of 8 steps, so the slow
    step is outside the window, and the result row's is the two windows together."""
    import stitching.train.loop as loop
    from stitching.train.__main__ import main

    step = loop.train_step

    def slow_first(st, x, y, micro):
        if micro == 0:
            time.sleep(1.5)
        return step(st, x, y, micro)

    monkeypatch.setattr(loop, "train_step", slow_first)
    out = tmp_path / "run"
    assert main(["--config", str(ROOT / "configs" / "synthetic" / "tiny.yaml"), "train.device=cpu",
                 "data.train_size=512", "data.val_size=64", "train.epochs=2", f"output.dir={out}"]) == 0
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    windows = []
    for row in rows:
        window = 4 * 64 / float(row["images_per_s"])          # seconds of the timed window
        assert window + 1.5 <= float(row["epoch_time_s"]), row
        windows.append(window)
    with (out / "result.csv").open() as f:
        [res] = list(csv.DictReader(f))
    assert float(res["images_per_s"]) == pytest.approx(8 * 64 / sum(windows), rel=1e-6)


# -------------------------------------------------------------------------------------- evaluation
def test_evaluation_sums_on_the_device_equal_the_per_batch_figures():
    from stitching.train.distributed import DistInfo
    from stitching.train.evaluation import evaluate
    from stitching.train.step import StepState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    st = StepState(model, None, None, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    batches = [(torch.randn(n, 3, 2, 2), torch.randint(0, 7, (n,))) for n in (9, 5, 1, 16)]
    got = evaluate(st, batches, DistInfo())
    loss = top1 = top5 = n = 0.0                          # per batch, read on the host (the old way)
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(5, dim=1).indices
            top1 += (top[:, 0] == y).sum().item()
            top5 += (top == y[:, None]).any(dim=1).sum().item()
            n += len(y)
    assert got == {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "val_loss": loss / n}   # bit for bit
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        assert got["val_loss"] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
        assert got["top1"] == pytest.approx(100 * (model(x).argmax(1) == y).float().mean().item())
