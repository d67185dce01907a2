"""The stitched model: every pair and gap builds, adapters x resize modes, frozen-part discipline."""

import itertools

import pytest
import torch

from stitching.stitch.plan import PlanError, plan_stitch
from stitching.models.registry import get_spec
from stitching.stitch.stitcher import StitchedModel, build_model
from tests.conftest import model_cfg

MAIN = ["resnet50", "mobilenetv3_large_100", "vit_small_patch16_224", "swin_t"]
VIT = "vit_small_patch16_224"
GAPS = [(s, t) for s in range(1, 5) for t in range(s, 5)]
RES = 64


@pytest.mark.parametrize("source,destination", list(itertools.product(MAIN, MAIN)))
def test_every_pair_and_gap_builds_bottleneck_bilinear(source, destination, cached_models):
    assert len(GAPS) == 10
    x = torch.randn(2, 3, RES, RES)
    adapter = "linear" if source == destination == VIT else "bottleneck"   # no conv adapter between tokens
    for s, t in GAPS:
        built = build_model(model_cfg(source=source, destination=destination, source_stage=s,
                                      destination_stage=t, adapter=adapter), img_size=RES)
        model = built.model
        assert isinstance(model, StitchedModel) and built.kind == "stitched"
        assert built.plan.num_adapters == max(t - s, 1)
        assert built.plan.steps[-1].c_out == built.plan.destination_cut.channels
        with torch.no_grad():
            assert model.eval()(x).shape == (2, 1000), (s, t)


REPRESENTATIVE = [("resnet50", "resnet50", 1, 3), ("resnet50", "swin_t", 1, 4), ("swin_t", "resnet50", 2, 3),
                  ("vit_small_patch16_224", "resnet50", 1, 2), ("mobilenetv3_large_100", "swin_t", 1, 1),
                  ("resnet50", "vit_small_patch16_224", 2, 4), ("vit_small_patch16_224", "vit_small_patch16_224", 1, 3)]


@pytest.mark.parametrize("source,destination,s,t", REPRESENTATIVE)
def test_every_adapter_and_resize_on_representative_pairs(source, destination, s, t, cached_models):
    x = torch.randn(2, 3, RES, RES)
    for adapter, resize in itertools.product(["linear", "linear_relu", "conv3x3", "bottleneck", "vit_block"],
                                             ["none", "bilinear", "strided"]):
        cfg = model_cfg(source=source, destination=destination, source_stage=s, destination_stage=t,
                        adapter=adapter, resize=resize)
        try:
            plan_stitch(get_spec(source), get_spec(destination), s, t, adapter, resize, "paper")
        except PlanError as err:
            # the only refusals: strided without a 3x3 conv, vit_block off ViT, conv adapters between tokens
            assert (resize == "strided" and adapter not in ("conv3x3", "bottleneck")
                    or adapter == "vit_block" and "ViT-like" in str(err)
                    or source == destination == VIT and adapter in ("conv3x3", "bottleneck")
                    and "feature map" in str(err)), (adapter, resize, err)
            with pytest.raises(PlanError):
                build_model(cfg, img_size=RES)
            continue
        built = build_model(cfg, img_size=RES)
        steps = built.plan.steps
        if resize == "none":
            assert all(st.size_out == steps[0].size_in for st in steps)
        model = built.model.train()
        out = model(x)
        assert out.shape == (2, 1000)
        out.sum().backward()
        assert all(p.grad is not None for p in model.adapters.parameters()), (adapter, resize)


def test_linear_adapter_has_no_padding_and_bottleneck_has_the_papers_shape(cached_models):
    built = build_model(model_cfg(source_stage=1, destination_stage=2, adapter="linear"), img_size=RES)
    conv = built.model.adapters[1].core
    assert conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.bias is not None
    built = build_model(model_cfg(source_stage=1, destination_stage=2, adapter="bottleneck", resize="strided"),
                        img_size=RES)
    core = built.model.adapters[1].core
    assert (core.conv1.out_channels, core.conv2.stride, core.conv3.out_channels) == (128, (2, 2), 512)
    assert isinstance(built.model.adapters[1].norm_in, torch.nn.Identity)      # code style: no outer norms
    built = build_model(model_cfg(source_stage=1, destination_stage=2, adapter="bottleneck", resize="strided",
                                  adapter_style="text"), img_size=RES)
    assert isinstance(built.model.adapters[1].norm_in, torch.nn.BatchNorm2d)


def test_identical_modules_across_resize_modes_share_a_signature():
    vit, res = get_spec("vit_small_patch16_224"), get_spec("resnet50")
    sigs = {r: plan_stitch(res, res, 2, 2, "conv3x3", r, "paper") for r in ("none", "bilinear", "strided")}
    assert {p.effective_resize for p in sigs.values()} == {"none"}
    assert len({p.signature() for p in sigs.values()}) == 1
    diff = {r: plan_stitch(res, res, 1, 2, "conv3x3", r, "paper").signature() for r in ("none", "bilinear", "strided")}
    assert len(set(diff.values())) == 3
    assert plan_stitch(vit, vit, 1, 4, "linear", "bilinear", "paper").effective_resize == "none"


def test_destination_schedule_option():
    res, swin = get_spec("resnet50"), get_spec("swin_t")
    paper = plan_stitch(res, swin, 1, 4, "bottleneck", "bilinear", "paper")
    own = plan_stitch(res, swin, 1, 4, "bottleneck", "bilinear", "destination")
    assert [s.c_out for s in paper.steps] == [512, 768, 768]      # doubling from 256, capped at 768
    assert [s.c_out for s in own.steps] == [192, 384, 768]        # Swin-T's own stage widths
    assert plan_stitch(res, res, 1, 4, "bottleneck", "bilinear", "destination").steps == \
        plan_stitch(res, res, 1, 4, "bottleneck", "bilinear", "paper").steps


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("source,destination", [("resnet50", "swin_t"), ("vit_small_patch16_224", "resnet50"),
                                                ("mobilenetv3_large_100", "mobilenetv3_large_100")])
def test_training_step_leaves_frozen_parts_bit_identical(source, destination, cached_models):
    torch.manual_seed(0)
    built = build_model(model_cfg(source=source, destination=destination, source_stage=1, destination_stage=3),
                        img_size=RES)
    model = built.model.train()
    frozen = {"prefix": _state(model.prefix), "suffix": _state(model.suffix)}
    adapters = _state(model.adapters)
    assert not any(p.requires_grad for p in model.prefix.parameters())
    assert not any(p.requires_grad for p in model.suffix.parameters())
    assert not any(m.training for part in (model.prefix, model.suffix) for m in part.modules())
    assert all(m.training for m in model.adapters.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x, y = torch.randn(4, 3, RES, RES), torch.randint(0, 1000, (4,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for part in ("prefix", "suffix"):
        after = _state(getattr(model, part))
        assert after.keys() == frozen[part].keys()
        for k, v in frozen[part].items():
            assert torch.equal(after[k], v), f"{part}.{k} changed"
    changed = [k for k, v in _state(model.adapters).items() if not torch.equal(v, adapters[k])]
    assert any("running_mean" in k for k in changed) and any(k.endswith("weight") for k in changed)
    # no stochastic depth / dropout in frozen parts: train-mode forward is deterministic
    with torch.no_grad():
        model.adapters.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_no_autograd_graph_through_the_prefix(cached_models):
    built = build_model(model_cfg(source="swin_t", destination="resnet50", source_stage=1, destination_stage=2),
                        img_size=RES)
    model = built.model.train()
    seen = {}
    model.prefix.register_forward_hook(lambda m, i, o: seen.update(out=o))
    model.adapters.register_forward_hook(lambda m, i, o: seen.update(adapters=o))
    x = torch.randn(2, 3, RES, RES, requires_grad=True)
    model(x).sum().backward()
    assert seen["out"].grad_fn is None and not seen["out"].requires_grad
    assert seen["adapters"].grad_fn is not None
    assert x.grad is None  # nothing flowed back into the prefix


def test_any_batch_size_and_resolution(cached_models):
    built = build_model(model_cfg(source="resnet50", destination="vit_small_patch16_224", source_stage=1,
                                  destination_stage=3), img_size=96)
    with torch.no_grad():
        for b in (1, 3):
            assert built.model.eval()(torch.randn(b, 3, 96, 96)).shape == (b, 1000)


def test_finetune_baseline_keeps_destination_downsampling_blocks_and_trains_everything(cached_models):
    built = build_model(model_cfg(source_stage=1, destination_stage=3, adapter="finetune"), img_size=RES)
    model = built.model
    assert built.kind == "finetune" and built.plan.kept_blocks == [2, 3]
    assert len(model.adapters) == 2 and all(p.requires_grad for p in model.parameters())
    model.train()
    assert all(m.training for m in model.modules())
    before = model.prefix[0][1].running_mean.clone()
    model(torch.randn(4, 3, RES, RES)).sum().backward()
    assert not torch.equal(before, model.prefix[0][1].running_mean)
    assert all(p.grad is not None for p in model.prefix.parameters())


@pytest.mark.parametrize("s,t", [(3, 3), (3, 4), (2, 4), (1, 4), (4, 4)])
def test_finetune_refuses_gaps_whose_blocks_do_not_join(s, t):
    m = get_spec("mobilenetv3_large_100")
    with pytest.raises(PlanError, match="expects") as err:
        plan_stitch(m, m, s, t, "finetune", "none", "paper")
    assert err.value.key == "model.adapter"


def test_finetune_joins_where_widths_agree():
    m = get_spec("mobilenetv3_large_100")
    assert plan_stitch(m, m, 1, 3, "finetune", "none", "paper").kept_blocks == [2, 3]
    r = get_spec("resnet50")
    assert all(plan_stitch(r, r, s, t, "finetune", "none", "paper") for s, t in GAPS)
    with pytest.raises(PlanError, match="only joins a model to itself"):
        plan_stitch(r, get_spec("swin_t"), 1, 2, "finetune", "none", "paper")
