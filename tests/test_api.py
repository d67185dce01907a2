"""The Python API (``stitching.create_model`` / ``cost`` / ``list_cuts`` / ``train`` / ``load_run``), the cut
table of ``python -m stitching.summary --cuts``, the stitch's share of its originals in ``summary``, and the
rule that a later layer's cut kind replaces an earlier layer's (block keys on the command line over a base's
stage keys). Tiny random-init models at 64 px (32 px for the trainer)."""

from __future__ import annotations

import csv
import doctest
import json
import os
import re
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch

from stitching.config import ConfigError
from stitching.validate import load_config
from stitching.rundir import CONFIG, EXIT_BUSY, EXIT_CONFIG, LOCK, RESULT
from tests.conftest import ROOT, together

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
#: a stitch on TINY cheap enough for a test: 1 epoch of 2 steps
QUICK = {"train": {"epochs": 1, "max_steps_per_epoch": 2}, "data": {"train_size": 128, "val_size": 64}}


def _cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


# ------------------------------------------------------------------------------------------- create_model
def test_create_model_builds_what_the_trainer_builds_and_only_the_adapters_train():
    import stitching
    from stitching.stitch.stitcher import StitchedModel, build_model
    from stitching.summary import summarize

    model = stitching.create_model("resnet18", source_stage=1, destination_stage=3, adapter="linear",
                                   pretrained=False, img_size=64, num_classes=10, resize="none")
    cfg = load_config(TINY, ["model.adapter=linear", "model.resize=none", "data.img_size=64"])
    trainer = build_model(cfg.model, 64, 10).model      # the trainer's build of the same config
    assert isinstance(model, StitchedModel) and model.plan.signature() == trainer.plan.signature()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in trainer.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    assert trainable == {n for n, _ in model.adapters.named_parameters(prefix="adapters")}
    model.train()
    assert not model.prefix.training and not model.suffix.training and model.adapters.training
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)

    cost = stitching.cost(model, img_size=64)
    assert cost == {k: summarize(cfg)[k] for k in ("macs", "flops", "params", "trainable_params")}
    assert cost["trainable_params"] == sum(p.numel() for p in model.adapters.parameters()) < cost["params"]


def test_create_model_without_a_cut_is_the_original_and_options_reach_the_builder():
    import timm

    import stitching

    original = stitching.create_model("resnet18", pretrained=False, img_size=64, num_classes=10)
    assert type(original) is type(timm.create_model("resnet18", num_classes=10))
    assert all(p.requires_grad for p in original.parameters())
    cost = stitching.cost(original, img_size=64)
    assert cost["params"] == cost["trainable_params"] == sum(p.numel() for p in original.parameters())

    blocks = stitching.create_model("resnet18", "vit_tiny_patch16_224", pretrained=False, img_size=64,
                                    num_classes=10, adapter="linear", source_block=2, destination_block=5,
                                    destination_kwargs={"patch_size": 8})
    assert blocks.plan.cut_label == "b2->b5" and blocks.plan.destination_cut.height == 8    # 64 / 8 px patches


@pytest.mark.parametrize("kwargs, key, says", [
    ({"source_stage": 1}, "model.destination_stage", "required with source_stage"),
    ({"source_stage": 1, "destination_stage": 3, "adaptr": "linear"}, "model.adaptr", "unknown key"),
    ({"source_stage": 1, "destination_stage": 3, "adapter": "mlp"}, "model.adapter", "must be one of"),
    ({"source_stage": 3, "destination_stage": 1}, "model.destination_stage", "must be >= source_stage"),
    ({"source_stage": 1, "destination_stage": 3, "source_block": 2, "destination_block": 5}, "model.source_block",
     "both set"),
    ({"source_stage": 1, "destination_stage": 3, "init": "least_squares"}, "model.init", "stitching.train"),
    ({"source": "no_such_net"}, "model.source", "unknown model 'no_such_net'"),
])
def test_create_model_refuses_bad_arguments_in_one_line_before_building(monkeypatch, kwargs, key, says):
    import stitching
    import stitching.api

    def never(*a, **k):
        raise AssertionError("built a model before the arguments were checked")

    monkeypatch.setattr(stitching.api, "build_model", never)
    kwargs = {"source": "resnet18", "pretrained": False, "img_size": 64, **kwargs}
    with pytest.raises(ValueError) as err:
        stitching.create_model(**kwargs)
    assert isinstance(err.value, ConfigError) and err.value.key == key and says in str(err.value)
    line, = str(err.value).splitlines()
    assert line.startswith(f"stitching.create_model(): {key}=")


# ------------------------------------------------------------------------------------------ list_cuts
def test_list_cuts_tabulates_the_blocks_and_a_row_is_the_cut_the_builder_makes():
    import stitching
    from stitching.api import CUT_COLUMNS

    cuts = stitching.list_cuts("resnet18", img_size=64)
    assert list(cuts.columns) == CUT_COLUMNS and list(cuts.block) == list(range(8))
    stages = cuts[cuts.stage_cut.notna()]
    assert stages[["block", "module", "stage_cut", "channels", "height"]].values.tolist() == [
        [0, "layer1.0", 1, 64, 16], [2, "layer2.0", 2, 128, 8], [4, "layer3.0", 3, 256, 4], [6, "layer4.0", 4, 512, 2]]
    assert cuts.relative_depth.iloc[-1] == 1.0 and (cuts.format == "image").all()

    vit = stitching.list_cuts("vit_tiny_patch16_224", img_size=64, kwargs={"patch_size": 8})
    assert len(vit) == 12 and set(vit.format) == {"tokens_cls"} and (vit.height == 8).all()
    assert vit.stage_cut.dropna().tolist() == [1, 2, 3, 4] and vit.block[vit.stage_cut == 3].item() == 6
    # the table's rows are the cuts the builder makes: source block 3's output, received after ViT block 6
    model = stitching.create_model("resnet18", "vit_tiny_patch16_224", source_block=3, destination_block=6,
                                   adapter="linear", pretrained=False, img_size=64, num_classes=10,
                                   destination_kwargs={"patch_size": 8})
    src, dst = cuts.iloc[3], vit.iloc[6]
    assert (model.plan.source_cut.channels, model.plan.source_cut.height) == (src.channels, src.height)
    assert (model.plan.destination_cut.channels, model.plan.destination_cut.format) == (dst.channels, dst.format)

    with pytest.raises(ConfigError, match="unknown model 'no_such_net'") as err:
        stitching.list_cuts("no_such_net")
    assert err.value.key == "model.source" and str(err.value).startswith("stitching.list_cuts(): ")


def test_the_api_docstring_examples_run():
    import stitching.api

    result = doctest.testmod(stitching.api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


# ------------------------------------------------------------------------------------- train and load_run
def test_train_runs_the_cli_path_in_process_and_load_run_reads_it_back(tmp_path):
    """``stitching.train`` with section and dotted overrides (block keys over the base's stage cut) trains,
    returns the run directory (a path with a space and '#'); again: the finished run is not redone;
    ``load_run`` gives the trained model and the typed result row; bad input and a busy directory raise."""
    import stitching
    from stitching.stitch.stitcher import StitchedModel

    out = tmp_path / "api run #1"
    run_dir = stitching.train(TINY, **QUICK, output={"dir": str(out)},
                              **{"model.source_block": 1, "model.destination_block": 4, "model.adapter": "linear"})
    assert run_dir == out and (out / RESULT).is_file()
    written = (out / RESULT).stat().st_mtime_ns
    assert stitching.train(TINY, **QUICK, output={"dir": str(out)}, **{"model.source_block": 1,
                           "model.destination_block": 4, "model.adapter": "linear"}) == out
    assert (out / RESULT).stat().st_mtime_ns == written               # finished: skipped, not redone

    model, row = stitching.load_run(out)
    assert isinstance(model, StitchedModel) and not model.training and model.plan.cut_label == "b1->b4"
    with (out / RESULT).open() as f:
        [written_row] = list(csv.DictReader(f))
    assert row["gap"] == "b1->b4" and row["source_block"] == 1 and row["source_stage"] is pd.NA
    assert row["top1"] == float(written_row["top1"]) and isinstance(row["macs"], float)
    assert row["macs"] == stitching.cost(model, img_size=32)["macs"]

    with pytest.raises(ConfigError) as err:         # a bad key: one line naming it, nothing written
        stitching.train(TINY, **QUICK, output={"dir": str(tmp_path / "bad")}, **{"train.lr": -1})
    assert str(err.value) == "stitching.train(): train.lr=-1.0: must be >= 0"
    assert not (tmp_path / "bad").exists()

    busy = tmp_path / "busy"                        # another (live) trainer holds the directory
    busy.mkdir()
    (busy / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(stitching.api.RunFailed) as failed:
        stitching.train(TINY, **QUICK, output={"dir": str(busy)})
    assert failed.value.exit_code == EXIT_BUSY and failed.value.status == "failed" and failed.value.run_dir == busy
    assert f"in use by pid {os.getppid()}" in str(failed.value) or "run directory in use" in str(failed.value)

    with pytest.raises(ValueError, match="not a run directory"):
        stitching.load_run(busy)
    started = tmp_path / "started"
    started.mkdir()
    (started / CONFIG).write_text((out / CONFIG).read_text())
    with pytest.raises(ValueError, match=f"the run is new, not finished \\(no {RESULT}\\)"):
        stitching.load_run(started)


def test_train_arguments_are_checked_before_anything_is_written(tmp_path):
    import stitching

    with pytest.raises(ConfigError, match="give a dotted key") as err:
        stitching.train(TINY, lr=0.1)
    assert err.value.key == "lr"
    with pytest.raises(ConfigError, match="exactly one of a config or a run directory"):
        stitching.train()
    with pytest.raises(ConfigError, match=f"no {CONFIG} in it"):
        stitching.train(run_dir=tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / CONFIG).write_text(TINY.read_text())
    with pytest.raises(ConfigError, match="leave output.dir out"):
        stitching.train(run_dir=old, output={"dir": str(tmp_path / "elsewhere")})
    sections = {"base": str(TINY), "model": {"source_block": 1, "destination_block": 9}}
    with pytest.raises(ConfigError, match=r"0\.\.7 \(resnet18 has 8 blocks\)") as err:   # a mapping, not a file
        stitching.train(sections, output={"dir": str(tmp_path / "run")})
    assert str(err.value).startswith("stitching.train(): model.destination_block=9")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["old", f"old/{CONFIG}"]


def test_run_dir_with_a_hash_in_its_path_trains_there(tmp_path):
    """``--run-dir "runs/study #2/x"`` (a sweep's runs folder with a space and '#'): the directory reached the
    trainer as a YAML override, ``output.dir=runs/study #2/x``, and YAML read ``runs/study`` (the rest a comment):
    the run trained into another directory. Now the run trains where its config.yaml is."""
    run_dir = tmp_path / "study #2" / "run #1"
    run_dir.mkdir(parents=True)
    cfg = load_config(TINY, ["train.epochs=0", "data.val_size=64", f"output.dir={tmp_path / 'elsewhere'}"])
    (run_dir / CONFIG).write_text(cfg.to_yaml())
    proc = _cli("-m", "stitching.train", "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / RESULT).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study #2"] and \
        sorted(p.name for p in (tmp_path / "study #2").iterdir()) == ["run #1"]


IMPORT_ORDERS = [
    "import stitching\nassert not {'torch', 'pandas', 'stitching.api', 'stitching.train'} & set(sys.modules)",
    "import stitching.train.loop\nimport stitching",
    "from stitching import train\nimport stitching\nassert train is stitching.train",
    "import stitching.api, stitching.train.__main__\nimport stitching",
]


@pytest.mark.slow
def test_stitching_train_is_the_callable_package_in_any_import_order():
    """Each order in a fresh interpreter: ``stitching.train`` is the package (``python -m``, submodules) and
    callable (the call reaches :func:`stitching.train.train`: a bad argument is its error), before and after
    ``stitching.train.loop`` is imported. ``import stitching`` alone loads neither torch nor the API."""
    check = f"""
from stitching.config import ConfigError
t = stitching.train
assert t is sys.modules["stitching.train"] and callable(t), type(t)
try:
    t({str(TINY)!r}, lr=-1)
except ConfigError as err:
    print(err)
import stitching.train.loop
assert stitching.train is t and callable(stitching.train) and stitching.train.loop.run
"""
    procs = together(*[lambda order=order: _cli("-c", "import sys\n" + order + "\n" + check)
                       for order in IMPORT_ORDERS])
    for order, proc in zip(IMPORT_ORDERS, procs):
        assert proc.returncode == 0, f"{order}:\n{proc.stderr[-2000:]}"
        assert proc.stdout.strip().startswith("stitching.train(): lr=-1: give a dotted key"), order


# ------------------------------------------------------------------------------- the cut rule between layers
def test_a_later_layers_cut_kind_replaces_the_earlier_ones(tmp_path):
    blocks = tmp_path / "blocks.yaml"
    blocks.write_text(f"base: {TINY}\nmodel:\n  source_block: 2\n  destination_block: 5\n")  # base: stages
    cfg = load_config(blocks)                                        # the file over its base
    assert (cfg.model.source_stage, cfg.model.destination_stage, cfg.model.source_block) == (None, None, 2)
    cfg = load_config(blocks, ["model.source_stage=2", "model.destination_stage=4"])    # the command line over both
    assert (cfg.model.source_stage, cfg.model.destination_stage, cfg.model.source_block) == (2, 4, None)
    cfg = load_config(TINY, updates={"model.source_block": 0, "model.destination_block": 7}, updates_source="grid")
    assert (cfg.model.source_stage, cfg.model.source_block, cfg.model.destination_block) == (None, 0, 7)
    cfg = load_config(blocks, ["model.source_block=3"])              # the same kind: only that key changes
    assert (cfg.model.source_block, cfg.model.destination_block) == (3, 5)
    cfg = load_config(blocks, ["model.source_stage=null", "model.destination_stage=null"])   # nulls replace nothing
    assert (cfg.model.source_block, cfg.model.destination_block) == (2, 5)

    with pytest.raises(ConfigError) as err:                          # both kinds on one command line
        load_config(blocks, ["model.source_stage=1", "model.source_block=3"])
    assert err.value.key == "model.source_block" and err.value.source == "command line" and "both set" in str(err.value)
    with pytest.raises(ConfigError) as err:                          # the stage cut replaced half given
        load_config(blocks, ["model.source_stage=1"])
    assert str(err.value) == (f"{blocks}: model.destination_stage=None: required with source_stage "
                              "(source_stage..4)")      # the file that dropped the base's stage keys
    both = tmp_path / "both.yaml"                                    # both kinds in one file, over a base
    both.write_text(f"base: {TINY}\nmodel:\n  source_block: 2\n  destination_stage: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(both)
    assert err.value.key == "model.source_block" and err.value.source == str(both) and "not destination_stage" \
        in str(err.value)


# ------------------------------------------------------------------------------------------- summary CLI
@pytest.mark.slow
def test_summary_prints_the_cut_table_and_the_stitchs_share_of_its_originals(tmp_path, capsys):
    """The real CLI: ``--cuts`` (a table), a stitched config's lines for people (G/M/K, the share of both
    originals) before the JSON, ``--json`` alone, block keys on the command line over the config's stage keys;
    in this process (``run_cli`` as ``python -m`` calls it, to keep the suite fast): ``--cuts --json`` (the rows
    of ``list_cuts``) and one-line errors (exit 2)."""
    import stitching
    from stitching.cli import run_cli
    from stitching.summary import main

    vit = ["model.destination=vit_tiny_patch16_224", "model.destination_kwargs={patch_size: 8}", "model.adapter=linear"]
    cwd = tmp_path / "a dir #2"
    cwd.mkdir()
    table, human, blocks = together(
        lambda: _cli("-m", "stitching.summary", "--cuts", "resnet18", "--img-size", "64", cwd=cwd),
        lambda: _cli("-m", "stitching.summary", "--config", TINY, "data.img_size=64", *vit),
        lambda: _cli("-m", "stitching.summary", "--json", "--config", TINY, "model.source_block=2",
                     "model.destination_block=5"))
    for proc in (table, human, blocks):
        assert proc.returncode == 0, proc.stderr[-2000:]

    lines = table.stdout.splitlines()
    assert lines[0] == "resnet18 at 64 px: 8 blocks" and "model.source_block" in lines[1]
    assert lines[3].split() == ["block", "module", "stage", "stage_cut", "format", "shape", "depth"]
    assert lines[4].split() == ["0", "layer1.0", "1", "1", "image", "64@16x16", "0.125"]
    assert lines[5].split() == ["1", "layer1.1", "1", "image", "64@16x16", "0.250"]     # no stage cut there
    assert len(lines) == 4 + 8

    text, _, body = human.stdout.partition("\n\n")
    out = json.loads(body)
    orig = out["originals"]
    assert orig["source"]["model"] == "resnet18" and orig["destination"]["model"] == "vit_tiny_patch16_224"
    for role in ("source", "destination"):                           # each original's own summary
        own = _original_macs(orig[role]["model"], {"patch_size": 8} if role == "destination" else None)
        assert orig[role]["macs"] == own
    head, cost, shares, joins = text.splitlines()
    assert head.startswith("stitched resnet18 stage 1 -> vit_tiny_patch16_224 stage 3 (gap 1->3): 2 linear adapters")
    assert re.fullmatch(r"  \d+(\.\d+)? MMACs \(\d+(\.\d+)? MFLOPs\), \d+(\.\d+)? M parameters, \d+(\.\d+)? K trainable",
                        cost), cost
    pct = [round(100 * out["macs"] / orig[r]["macs"]) for r in ("source", "destination")]
    assert shares == (f"  = {pct[0]}% of resnet18 ({orig['source']['macs'] / 1e6:.3g} MMACs), "
                      f"{pct[1]}% of vit_tiny_patch16_224 ({orig['destination']['macs'] / 1e6:.3g} MMACs)")
    assert joins.startswith("  joins: 64@16x16 from resnet18 stage 1") and "into vit_tiny_patch16_224" in joins

    out = json.loads(blocks.stdout)                                  # --json: the JSON alone
    assert (out["gap"], out["num_adapters"], out["source_block"]) == ("b2->b5", 1, 2) and "source_stage" not in out

    capsys.readouterr()
    assert main(["--cuts", "vit_tiny_patch16_224", "--img-size", "64", "--kwargs", "{patch_size: 8}", "--json"]) == 0
    expected = stitching.list_cuts("vit_tiny_patch16_224", 64, {"patch_size": 8})
    assert json.loads(capsys.readouterr().out) == json.loads(expected.to_json(orient="records"))
    for argv, says in ((["--config", str(TINY), "model.source_block=2", "model.destination_stage=4"],
                        "command line: model.source_block=2: needs model.destination_block"),
                       (["--cuts", "no_such_net"], "command line: --cuts='no_such_net': unknown model 'no_such_net'"),
                       (["--cuts", "resnet18", "--img-size", "8"], "command line: --img-size=8: must be at least")):
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: main(argv))
        out, err = capsys.readouterr()
        assert exit_.value.code == EXIT_CONFIG and out == ""
        line, = err.strip().splitlines()
        assert line.startswith("error: " + says), line


def _original_macs(name: str, kwargs: dict | None) -> int:
    from stitching.models.weights import load_model
    from stitching.stitch.cost import count_cost

    return count_cost(load_model(name, False, None, 10, kwargs), 64)["macs"]


# ---------------------------------------------------------------------------------------------- README
@pytest.mark.slow
def test_the_readme_python_api_example_runs(tmp_path):
    """The README's "Python API" block, as written (run from the repository, its run directory moved to a
    temporary folder)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "stitching.create_model(" in block and "stitching.load_run(" in block
    script = block.replace('"runs/api_tiny"', repr(str(tmp_path / "api_tiny")))
    proc = _cli("-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'trainable_params'" in proc.stdout and "layer4.0" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("b1->b4 ")
    assert (tmp_path / "api_tiny" / RESULT).is_file()
