"""``model.pos_embed: reinject``: the destination's own position embedding re-added before the suffix."""

import subprocess
import sys

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from stitching.config import ConfigError
from stitching.validate import load_config
from stitching.stitch.posembed import PosReinject
from stitching.stitch.stitcher import build_model
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
TO_VIT = ("model.destination=vit_tiny_patch16_224", "model.adapter=linear")


def _built(*overrides):
    cfg = load_config(TINY, list(overrides))
    return build_model(cfg.model, cfg.data.img_size, cfg.num_classes)


def _suffix_input(built, x):
    seen = []
    handle = built.model.suffix.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        built.model.eval()(x)
    handle.remove()
    return seen[0]


def test_reinjection_adds_exactly_the_interpolated_embedding():
    torch.manual_seed(0)
    plain = _built(*TO_VIT)
    torch.manual_seed(0)                               # same adapters, same random-init destination
    reinject = _built(*TO_VIT, "model.pos_embed=reinject")
    assert isinstance(reinject.model.adapters[-1], PosReinject)
    assert sum(p.numel() for p in reinject.model.adapters.parameters()) == \
        sum(p.numel() for p in plain.model.adapters.parameters())            # no new parameters
    # saved with the model: the destination's stem, which holds the embedding, is not part of it
    assert [k for k in reinject.model.state_dict() if "embedding" in k] == \
        [f"adapters.{len(reinject.model.adapters) - 1}.embedding"]
    pos = reinject.destination_parts.stem.pos_embed                            # the destination's (ViTStem)
    assert torch.equal(pos, plain.destination_parts.stem.pos_embed)
    x = torch.randn(2, 3, 32, 32)
    added = _suffix_input(reinject, x) - _suffix_input(plain, x)
    # 32 px, 16 px patches: the 14x14 grid of the embedding resampled to 2x2; the class token keeps its row
    expected = resample_abs_pos_embed(pos.detach(), new_size=[2, 2], old_size=[14, 14], num_prefix_tokens=1)
    assert added.shape == (2, 5, 192)
    assert torch.allclose(added, expected.expand(2, -1, -1), atol=1e-6)


def test_prefix_tokens_without_rows_get_nothing():
    pos = torch.randn(1, 4, 3)                                 # a 2x2 grid, no rows for prefix tokens
    module = PosReinject(pos, (2, 2), 0, 1, (2, 2))
    x = torch.zeros(1, 5, 3)
    y = module(x)
    assert torch.equal(y[:, 0], torch.zeros(1, 3)) and torch.equal(y[:, 1:], pos)


@pytest.mark.parametrize("overrides,says", [
    (("model.pos_embed=sometimes",), "must be one of none, reinject"),
    (("model.pos_embed=reinject",), "no learned position embedding"),                   # resnet18 destination
    (("model.pos_embed=reinject", "model.destination=swin_t"), "no learned position embedding"),
    (("model.pos_embed=reinject", "model.source_stage=null", "model.destination_stage=null"), "needs a stitched"),
])
def test_refusals_name_the_key_value_and_file(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, list(overrides))
    assert err.value.key == "model.pos_embed" and says in err.value.message


def test_a_refusal_through_the_cli_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"base: {TINY}\nmodel:\n  pos_embed: reinject\n")
    proc = subprocess.run([sys.executable, "-m", "stitching.summary", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    line, = proc.stderr.strip().splitlines()
    assert "model.pos_embed='reinject'" in line and str(cfg) in line


def test_a_reinjecting_run_trains_and_says_so_in_result_csv(tmp_path):
    """The real trainer (folded frozen parts, checkpoint) with re-injection: the recipe column reads it."""
    import os

    import pandas as pd

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "stitching.train", "--config", str(TINY), f"output.dir={out}", *TO_VIT,
         "model.pos_embed=reinject", "train.batch_size=16", "train.max_steps_per_epoch=2", "data.train_size=32",
         "data.val_size=16", "train.device=cpu"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = pd.read_csv(out / "result.csv", dtype=str).iloc[0]
    assert row["pos_embed"] == "reinject" and row["destination"] == "vit_tiny_patch16_224"
    # the reloaded model re-injects the embedding it was trained with (the trainer's seeded destination)
    from stitching.train.saved import load_trained

    cfg = load_config(out / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    trained_with = build_model(cfg.model, cfg.data.img_size, cfg.num_classes).model.adapters[-1].embedding
    assert torch.equal(load_trained(out).adapters[-1].embedding, trained_with)
