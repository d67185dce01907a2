"""The config contract: base files, overrides, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from stitching.config import ConfigError
from stitching.validate import load_config
from tests.conftest import ROOT


def write(path, text):
    path.write_text(text)
    return path


def test_base_chain_and_overrides(tmp_path):
    write(tmp_path / "root.yaml", "train:\n  lr: 0.01\n  epochs: 3\ndata:\n  img_size: 64\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\nmodel:\n  source: swin_t\n  source_stage: 1\n"
          "  destination_stage: 2\ntrain:\n  epochs: 5\n")
    cfg = load_config(tmp_path / "sub" / "mid.yaml", ["train.lr=0.5", "model.destination=resnet50"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.img_size) == (0.5, 5, 64)
    assert cfg.model.destination == "resnet50" and cfg.model.source == "swin_t"
    assert cfg.source_of("data.img_size").endswith("root.yaml")
    assert cfg.source_of("train.epochs").endswith("mid.yaml")
    assert cfg.source_of("train.lr") == "command line"
    # the resolved config round-trips: the same file gives the same model
    write(tmp_path / "resolved.yaml", cfg.to_yaml())
    assert load_config(tmp_path / "resolved.yaml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize("text,overrides,key,where", [
    ("model:\n  adpter: linear\n", [], "model.adpter", "bad.yaml"),
    ("model:\n  source_stage: 5\n  destination_stage: 5\n", [], "model.source_stage", "bad.yaml"),
    ("model:\n  source_stage: 3\n  destination_stage: 2\n", [], "model.destination_stage", "bad.yaml"),
    ("model:\n  source_stage: 1\n  destination_stage: 2\n  adapter: linear\n  resize: strided\n", [],
     "model.resize", "bad.yaml"),
    ("model:\n  source_stage: 1\n  destination_stage: 2\n  adapter: finetune\n", ["model.destination=swin_t"],
     "model.adapter", "bad.yaml"),
    ("model:\n  source: resnet51\n", [], "model.source", "bad.yaml"),
    ("training:\n  lr: 1\n", [], "training", "bad.yaml"),
    ("train:\n  lr: fast\n", [], "train.lr", "bad.yaml"),
    ("{}\n", ["train.epochs=-1"], "train.epochs", "command line"),
    ("data:\n  hflip: 1.5\n", [], "data.hflip", "bad.yaml"),
    ("{}\n", ["data.hflip=true"], "data.hflip", "command line"),
    ("base: missing.yaml\n", [], "base", "bad.yaml"),
])
def test_bad_configs_name_key_value_and_file(tmp_path, text, overrides, key, where):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "bad.yaml", text), overrides)
    assert err.value.key == key and err.value.source.endswith(where)
    assert "\n" not in str(err.value)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_cli_error_is_one_line_exit_2_no_traceback(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model:\n  source_stage: 1\n  destination_stage: 4\n  adapter: finetune\n"
                "  source: mobilenetv3_large_100\n")
    proc = subprocess.run([sys.executable, "-m", "stitching.summary", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(bad) in lines[0] and "model.adapter='finetune'" in lines[0] and "112" in lines[0]
