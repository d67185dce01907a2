"""Frozen parts as inference graphs: BatchNorm folding, shared adapters, the prepared training step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stitching.stitch import fast
from stitching.stitch.stitcher import StitchedModel, build_model
from tests.conftest import model_cfg

MAIN = ["resnet50", "mobilenetv3_large_100", "vit_small_patch16_224", "swin_t"]
RES = 64


@torch.no_grad()
def randomize_batchnorms(model: nn.Module, seed: int = 0) -> int:
    """Give every BatchNorm non-trivial running statistics and affine parameters (fresh ones are the
    identity in eval mode, which would let a wrong fold pass)."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
            count += 1
    return count


@torch.no_grad()
def calibrate_batchnorms(model: StitchedModel, seed: int = 0) -> None:
    """Running statistics measured on random images, mildly randomised affine parameters and logits scaled to
    order 1: like a trained network, activations stay in range (random statistics make a deep random-init
    net chaotic, which amplifies rounding differences far beyond what a fold introduces)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    model(torch.randn(8, 3, RES, RES, generator=g))
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.zero_()
        m.weight.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    model.train()  # the frozen parts back to eval mode
    # logits of order 1 (random-init residual nets give hundreds: a near one-hot softmax is chaotic)
    classifier = [m for m in model.suffix.modules() if isinstance(m, nn.Linear)][-1]
    model.eval()
    std = model(torch.randn(8, 3, RES, RES, generator=g)).std()
    model.train()
    classifier.weight.div_(std)
    classifier.bias.div_(std)


def stitched(source, destination, s=1, t=3, calibrate=False, **kw) -> StitchedModel:
    if source == destination == "vit_small_patch16_224":
        kw.setdefault("adapter", "linear")          # no convolutional adapter between two token sequences
    model = build_model(model_cfg(source=source, destination=destination, source_stage=s, destination_stage=t,
                                  **kw), img_size=RES).model
    if calibrate:
        calibrate_batchnorms(model)
    else:
        randomize_batchnorms(model)
    return model


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("source", MAIN)
@pytest.mark.parametrize("destination", MAIN)
def test_folded_frozen_parts_compute_what_the_unfolded_parts_do(source, destination, cached_models):
    model = stitched(source, destination).eval()
    folded = fast.fold_frozen(model)
    assert folded is not model and folded.adapters is model.adapters
    assert folded.prefix is not model.prefix and folded.suffix is not model.suffix
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert_close_relative(folded.prefix(x), model.prefix(x))
        mid = model.adapters(model.prefix(x))
        assert_close_relative(folded.suffix(mid), model.suffix(mid))
        assert_close_relative(folded(x), model(x))
    for part, name in ((folded.prefix, source), (folded.suffix, destination)):
        if name in ("resnet50", "mobilenetv3_large_100"):
            assert fast.count_batchnorms(part) == 0, name
            assert fast.count_batchnorms(getattr(model, "prefix" if part is folded.prefix else "suffix")) > 0


def test_folding_changes_only_the_copies_and_keeps_frozen_discipline(cached_models):
    model = stitched("resnet50", "swin_t", 1, 2)
    before = {"prefix": _state(model.prefix), "suffix": _state(model.suffix)}
    assert fast.count_batchnorms(model.prefix) > 0
    folded = fast.fold_frozen(model).train()
    for part in ("prefix", "suffix"):
        after = _state(getattr(model, part))
        assert after.keys() == before[part].keys()
        assert all(torch.equal(after[k], v) for k, v in before[part].items()), part
    assert not any(p.requires_grad for part in (folded.prefix, folded.suffix) for p in part.parameters())
    assert not any(m.training for part in (folded.prefix, folded.suffix) for m in part.modules())
    assert all(m.training for m in folded.adapters.modules())
    # Swin's stochastic depth and dropouts are gone from the frozen suffix
    from torchvision.ops import StochasticDepth

    assert not any(isinstance(m, (StochasticDepth, nn.Dropout)) for m in folded.suffix.modules())
    assert any(isinstance(m, StochasticDepth) for m in model.suffix.modules())


def test_finetune_baseline_and_original_models_are_never_folded(cached_models):
    built = build_model(model_cfg(source_stage=1, destination_stage=3, adapter="finetune"), img_size=RES)
    model = built.model
    n = fast.count_batchnorms(model)
    assert fast.fold_frozen(model) is model
    assert fast.prepare_for_training(model, fold_bn=True, channels_last=False, compile=False) is model
    assert fast.count_batchnorms(model) == n > 0
    original = build_model(model_cfg(), img_size=RES).model
    assert fast.prepare_for_training(original, fold_bn=True, channels_last=False, compile=False) is original
    with pytest.raises(TypeError):
        fast.fold_frozen(original)


class _BnBeforeConv(nn.Module):
    """conv and bn registered adjacently, but the BatchNorm normalises the *input* of the conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


class _ConvOutputUsedTwice(nn.Module):
    """conv -> bn, but the conv's output also feeds a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Folds(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=True), nn.BatchNorm2d(8)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.mismatch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Flatten(0, 0), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.mismatch(self.seq(self.bn(self.conv(x))))


@pytest.mark.parametrize("module,folds", [(_BnBeforeConv, 0), (_ConvOutputUsedTwice, 0), (_Folds, 2)])
def test_only_real_conv_to_batchnorm_pairs_are_folded(module, folds):
    torch.manual_seed(0)
    m = module()
    randomize_batchnorms(m)
    m.eval()
    n = fast.count_batchnorms(m)
    copy_ = copy.deepcopy(m)
    assert fast.fold_batchnorms(copy_) == folds
    assert fast.count_batchnorms(copy_) == n - folds
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert_close_relative(copy_(x), m(x))


def test_timm_batchnorm_act_keeps_its_activation():
    from timm.layers import BatchNormAct2d

    seq = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BatchNormAct2d(6, act_layer=nn.Hardswish))
    randomize_batchnorms(seq)
    seq.eval()
    folded = copy.deepcopy(seq)
    assert fast.fold_batchnorms(folded) == 1
    assert isinstance(folded[1], nn.Hardswish)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close_relative(folded(x), seq(x))


def test_cpu_allocator_tuning_applies_on_linux_glibc():
    import os
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or \
            any(k.startswith("MALLOC_") for k in os.environ) or os.environ.get("GLIBC_TUNABLES"):
        pytest.skip("glibc's mallopt only")
    assert fast.tune_cpu_allocator() is True
    assert fast.tune_cpu_allocator() is True  # idempotent


def test_channels_last_helpers():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 8))
    weight = conv[0].weight
    assert fast.to_channels_last(conv) is conv
    assert conv[0].weight is weight and weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(fast.default_channels_last("cpu"), bool)
    assert isinstance(fast.default_channels_last(torch.device("cuda")), bool)


@pytest.mark.parametrize("source,destination,channels_last", [("resnet50", "resnet50", True),
                                                              ("mobilenetv3_large_100", "swin_t", False),
                                                              ("swin_t", "resnet50", True)])
def test_training_step_through_prepared_model_matches_the_canonical_one(source, destination, channels_last,
                                                                        cached_models):
    # float64: the adapters' train-mode BatchNorms divide by the batch spread of near-dead channels of a
    # random-init prefix, which turns float32 rounding (~1e-6, fold or no fold) into gradient noise ~1e-2
    torch.manual_seed(0)
    model = stitched(source, destination, 1, 3, calibrate=True).double().train()
    reference = copy.deepcopy(model).train()
    frozen = {"prefix": _state(model.prefix), "suffix": _state(model.suffix)}
    x, y = torch.randn(4, 3, RES, RES, dtype=torch.float64), torch.randint(0, 1000, (4,))

    loss_ref = F.cross_entropy(reference(x), y)
    loss_ref.backward()

    runner = fast.prepare_for_training(model, fold_bn=True, channels_last=channels_last, compile=False)
    runner.train()
    assert runner.adapters is model.adapters
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in runner.parameters()) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    loss = F.cross_entropy(runner(xin), y)
    loss.backward()

    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-10)
    # relative to the largest gradient: some are analytically zero (a BatchNorm's bias before another
    # train-mode BatchNorm) and hold only rounding noise
    scale = max(q.grad.abs().max().item() for q in reference.adapters.parameters())
    for (name, p), q in zip(model.adapters.named_parameters(), reference.adapters.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name, buf in model.adapters.named_buffers():  # adapters' BatchNorm statistics updated alike
        torch.testing.assert_close(buf, dict(reference.adapters.named_buffers())[name], rtol=1e-10, atol=1e-12)

    before = _state(model.adapters)
    optimizer.step()
    assert any(not torch.equal(v, _state(model.adapters)[k]) for k, v in before.items() if k.endswith("weight"))
    for part in ("prefix", "suffix"):
        after = _state(getattr(model, part))
        assert after.keys() == frozen[part].keys()
        for k, v in frozen[part].items():
            assert torch.equal(after[k], v), f"{part}.{k} changed"
    assert all(p.grad is None for part in (model.prefix, model.suffix) for p in part.parameters())
