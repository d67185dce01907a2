"""Declared cut points against the real modules, for every registered architecture."""

import pytest
import torch

from stitching.models.registry import available, get_spec

from stitching.models.trace import trace_cuts

from stitching.models.weights import load_model, read_state_dict

MAIN = ["resnet50", "mobilenetv3_large_100", "vit_small_patch16_224", "swin_t"]


def test_the_papers_four_architectures_and_their_families_are_registered():
    names = set(available())
    assert set(MAIN) <= names
    assert {"resnet18", "resnet34", "resnet101", "mobilenetv3_small_100", "vit_tiny_patch16_224",
            "vit_base_patch16_224", "swin_s", "swin_b"} <= names
    assert get_spec("resnet50").weights == "resnet50.a1_in1k"
    assert get_spec("vit_small_patch16_224").weights == "vit_small_patch16_224.augreg_in1k"
    assert get_spec("swin_t").library == "torchvision"


@pytest.mark.parametrize("name", sorted(available()))
def test_declared_cuts_match_the_real_model_and_split_reassembles_it(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    model = load_model(name).eval()
    parts = spec.split(model)
    shapes = trace_cuts(spec, parts, 224)
    for s in range(1, 5):
        for where in ("first", "end"):
            cut = spec.cut(s, where)
            c, h, w = shapes[(s, where)]
            assert c == cut.channels and h == w == 224 // cut.stride, (s, where)
    # stem + every block + head is exactly the original network
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        h = parts.stem(x)
        for block in parts.blocks():
            h = block(h)
        torch.testing.assert_close(parts.head(h), model(x), rtol=0, atol=0)


def test_paper_stage_boundaries():
    resnet = get_spec("resnet50").split(load_model("resnet50"))
    assert [len(s) for s in resnet.stages] == [3, 4, 6, 3]
    mnv3 = get_spec("mobilenetv3_large_100")
    m = load_model("mobilenetv3_large_100")
    parts = mnv3.split(m)
    assert parts.stages[2][0] is m.blocks[3][0] and parts.stages[3][0] is m.blocks[5][0]
    assert parts.stages[3][-1] is m.blocks[6][0]
    vit = load_model("vit_small_patch16_224")
    assert [s[0] for s in get_spec("vit_small_patch16_224").split(vit).stages] == [vit.blocks[i] for i in (0, 3, 6, 9)]
    swin = load_model("swin_t")
    assert [s[0] for s in get_spec("swin_t").split(swin).stages] == [swin.features[i] for i in (0, 2, 4, 6)]


def test_a_wrong_declaration_is_caught(monkeypatch):
    import dataclasses

    spec = get_spec("resnet18")
    bad = dataclasses.replace(spec, first=(spec.first[0], dataclasses.replace(spec.first[1], channels=99),
                                           *spec.first[2:]))
    with pytest.raises(RuntimeError, match="declares 99 channels"):
        trace_cuts(bad, spec.split(load_model("resnet18")), 64)


def test_local_weights_files_load_strictly(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = load_model("resnet18", num_classes=10)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        model = load_model("resnet18", weights_file=str(tmp_path / f), num_classes=10)
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(ValueError, match="does not fit resnet50"):
        load_model("resnet50", weights_file=str(tmp_path / "w.safetensors"), num_classes=10)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(str(tmp_path / "nope.pt"))


def test_eval_preprocessing_is_each_models_own():
    vit = get_spec("vit_small_patch16_224").data_config(load_model("vit_small_patch16_224"))
    res = get_spec("resnet50").data_config(load_model("resnet50"))
    swin = get_spec("swin_t").data_config(load_model("swin_t"))
    assert tuple(vit["mean"]) == (0.5, 0.5, 0.5) and vit["interpolation"] == "bicubic"
    assert tuple(res["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    assert swin["crop_pct"] == pytest.approx(224 / 232) and swin["interpolation"] == "bicubic"
