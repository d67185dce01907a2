"""``train.objective``: each loss compares what it says, is zero where the stitch reproduces the destination,
``match_then_task`` switches at an epoch boundary (also across a resume), bad values stop the CLI (exit 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stitching.config import ConfigError
from stitching.validate import load_config
from stitching.stitch.join import destination_at_join
from stitching.stitch.stitcher import build_model
from stitching.train.step import build_step
from stitching.train.objective import OBJECTIVES, Objective, distill_loss, match_epochs, objective_at, train_macs
from stitching.train.step import train_step
from tests.conftest import ROOT, in_background
from tests.test_train import BASE, _interrupted_and_resumed, rows, train, write_cfg

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"


def _setup(*overrides):
    """A tiny stitched model, its step state (the trainer's build_step) and its objective."""
    cfg = load_config(TINY, ["train.device=cpu", *overrides])
    torch.manual_seed(0)
    built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
    st = build_step(built.model, cfg, built.kind, torch.device("cpu"), "fp32", 1, 4)
    return cfg, built, st, Objective(cfg, built, "cpu", st.channels_last)


def _identity_adapter(built) -> None:
    """Make the one linear adapter of a same-stage self-stitch an exact identity (norms off, 1x1 conv = I)."""
    [adapter] = [m for m in built.model.adapters if hasattr(m, "core")]
    adapter.norm_in, adapter.norm_out = nn.Identity(), nn.Identity()
    with torch.no_grad():
        w = adapter.core.weight
        w.zero_()
        w[:, :, 0, 0] = torch.eye(w.shape[0])
        adapter.core.bias.zero_()


SAME_STAGE = ("model.source_stage=2", "model.destination_stage=2", "model.adapter=linear")


@pytest.mark.parametrize("objective", ["match", "distill"])
def test_the_loss_is_zero_where_the_adapter_reproduces_the_destination(objective):
    """A network stitched to itself at one stage with an identity adapter receives exactly its own activation
    (match) and gives exactly its own logits (distill): the real training step reports a loss of 0."""
    cfg, built, st, obj = _setup(*SAME_STAGE, f"train.objective={objective}")
    _identity_adapter(built)
    st = build_step(built.model, cfg, built.kind, torch.device("cpu"), "fp32", 1, 4)   # the folded runner anew
    obj = Objective(cfg, built, "cpu", st.channels_last)
    st.objective = obj.at(0)
    st.runner.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = train_step(st, x, y, 0)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    # and not zero for an adapter that does not: a perturbed identity
    with torch.no_grad():
        [adapter] = [m for m in built.model.adapters if hasattr(m, "core")]
        adapter.core.weight.mul_(0.5)
    assert float(train_step(st, x, y, 1)) > 1e-4


def test_match_compares_the_adapters_output_with_the_destinations_own_activation():
    cfg, built, st, obj = _setup("train.objective=match", "train.fold_bn=false")     # (folding moves the 7th digit)
    st.runner.eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    logits, loss = obj.at(0)(st, x, y)
    with torch.no_grad():
        built.model.eval()
        built.target.eval()
        joined = built.model.adapters(built.model.prefix(x))
        expected = F.mse_loss(joined, destination_at_join(built, x))
        assert torch.allclose(logits, built.model(x), atol=1e-5)      # the logits still come out, for accuracy
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not logits.requires_grad                                  # no gradient path through the suffix
    loss.backward()
    assert all(p.grad is not None for p in built.model.adapters.parameters() if p.requires_grad)


def test_distill_is_hintons_scaled_kl_to_the_destinations_own_logits():
    cfg, built, st, obj = _setup("train.objective=distill", "train.distill_temperature=3", "train.fold_bn=false")
    st.runner.eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    logits, loss = obj.at(0)(st, x, y)
    with torch.no_grad():
        built.model.eval()
        built.target.eval()
        teacher = built.model.suffix(destination_at_join(built, x))       # the destination network, whole
    p_t = torch.softmax(teacher / 3, 1)
    by_hand = 9 * (p_t * (torch.log_softmax(teacher / 3, 1) - torch.log_softmax(logits / 3, 1))).sum(1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert distill_loss(s, s, 2.0).item() == 0.0 and distill_loss(s, t, 2.0).item() > 0


def test_match_then_task_switches_at_an_epoch_boundary():
    cfg = load_config(TINY, ["train.objective=match_then_task", "train.epochs=5", "train.match_epochs=2"])
    assert [objective_at(cfg, e) for e in range(5)] == ["match", "match", "task", "task", "task"]
    half = load_config(TINY, ["train.objective=match_then_task", "train.epochs=5"])
    assert match_epochs(half) == 2
    built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
    obj = Objective(cfg, built)
    assert obj.at(1) == obj._match and obj.at(2) is None          # None: the step's own cross-entropy
    assert obj.suffix is None                                     # no teacher head kept for matching
    # training cost: the destination's extra forward in the match epochs only, averaged over the epochs
    extra = obj.extra_macs(cfg.data.img_size)
    assert extra["match"] > 0 and train_macs(cfg, 1000, extra) == round(1000 + extra["match"] * 2 / 5)
    assert set(OBJECTIVES) == {"task", "match", "distill", "match_then_task"}


@pytest.mark.parametrize("override, key", [
    ("train.objective=copy", "train.objective"),
    ("train.distill_temperature=0", "train.distill_temperature"),
    ("train.match_epochs=0", "train.match_epochs"),
    ("train.similarity_images=-1", "train.similarity_images"),
])
def test_bad_values_name_key_value_and_file(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.objective=match_then_task", "train.epochs=3", override])
    assert err.value.key == key
    assert str(err.value).startswith(f"command line: {key}=")


def test_impossible_objectives_are_refused_in_the_file_that_set_them(tmp_path):
    cfg = write_cfg(tmp_path, BASE + "  objective: match_then_task\n  match_epochs: 2\n")
    with pytest.raises(ConfigError, match=r"train.match_epochs=2: must be < train.epochs \(2\)") as err:
        load_config(cfg)
    assert str(cfg) in str(err.value)
    original = write_cfg(tmp_path, BASE.replace("  source_stage: 1\n  destination_stage: 3\n", "")
                         + "  objective: distill\n", "orig.yaml")
    with pytest.raises(ConfigError, match="train.objective='distill'.*needs a stitched config"):
        load_config(original)
    with pytest.raises(ConfigError, match="train.epochs=1: match_then_task needs at least 2 epochs"):
        load_config(cfg, ["train.epochs=1", "train.match_epochs=null"])


def test_the_cli_exits_2_with_one_line_before_training(tmp_path):
    cfg = write_cfg(tmp_path, BASE + "  objective: memorise\n")
    proc = train("--config", cfg, f"output.dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert str(cfg) in line and "train.objective='memorise'" in line and "task, match, distill" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_match_then_task_resumed_mid_run_equals_an_uninterrupted_one(tmp_path):
    """Interrupted in epoch 2 (the first task epoch), resumed: bit for bit the uninterrupted run, the
    similarity before training carried by the checkpoint. Its first epoch is exactly a match run's."""
    text = (BASE.replace("epochs: 2", "epochs: 3").replace("train_size: 512", "train_size: 1024")
            + "  objective: match_then_task\n  match_epochs: 1\n  similarity_images: 64\n")
    cfg = write_cfg(tmp_path, text)
    straight = in_background(lambda: train("--config", cfg, f"output.dir={tmp_path / 'straight'}"))
    match = in_background(lambda: train("--config", cfg, f"output.dir={tmp_path / 'match'}", "train.objective=match"))
    _interrupted_and_resumed(tmp_path, cfg, tmp_path / "resumed")
    straight.result()
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert ckpt["position"]["similarity_before"]["n"] == 64
    [a], [b] = rows(tmp_path / "straight" / "result.csv"), rows(tmp_path / "resumed" / "result.csv")
    for key in ("top1", "val_loss", "train_loss", "cka_before", "ls_residual_before", "cka_after",
                "match_mse_after", "train_macs"):
        assert a[key] == b[key], key
    ma, mb = rows(tmp_path / "straight" / "metrics.csv"), rows(tmp_path / "resumed" / "metrics.csv")
    assert [m["train_loss"] for m in ma] == [m["train_loss"] for m in mb]
    match.result()
    mm = rows(tmp_path / "match" / "metrics.csv")
    assert ma[0]["train_loss"] == mm[0]["train_loss"]                # epoch 1: the same match steps
    assert float(ma[1]["train_loss"]) == pytest.approx(math.log(10), abs=0.5)     # then cross-entropy
    assert float(mm[1]["train_loss"]) < 1.5


def test_a_chain_that_keeps_the_source_size_is_compared_on_the_destinations_grid():
    """``model.resize: none`` between sizes that differ (the larger map flows on into the destination): the match
    loss and the similarity after training compare the adapters' output resized to the destination's own grid,
    where a comparison of the raw tensors fails (it stopped such runs after their last epoch)."""
    from stitching.stitch.join import adapted_at_join, on_destination_grid, similarity_after

    cfg, built, st, obj = _setup("model.source_stage=1", "model.destination_stage=2", "model.adapter=bottleneck",
                                 "model.resize=none", "train.objective=match")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    adapted, own = adapted_at_join(built, x), destination_at_join(built, x)
    assert adapted.shape[-1] == 2 * own.shape[-1]                     # the sizes do differ
    grid = on_destination_grid(adapted, own)
    assert grid.shape == own.shape
    assert torch.allclose(grid, F.interpolate(adapted, size=own.shape[-2:], mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="cannot be compared"):
        on_destination_grid(adapted[:, :1], own)
    st.objective = obj.at(0)
    st.runner.train()
    assert math.isfinite(float(train_step(st, x, y, 0)))
    after = similarity_after(built, [x[:4], x[4:]])
    assert after["n"] == 8 and math.isfinite(after["mse"]) and -1.5 < after["cka"] <= 1.0 + 1e-6
