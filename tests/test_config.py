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


# ------------------------------------------------------------------------ each key declared once (issue 22)
#: the tables as they were written by hand before they were derived from the keys' declarations (pinned once:
#: the derivation must give the same values, in the same order -- result.csv's columns, the captions' words)
OLD_RECIPE = {
    "dataset": None, "num_classes": None, "pretrained": None, "random_init": "model.random_init",
    "model_kwargs": None, "img_size": "data.img_size", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "per_device_batch_size": None, "lr": "train.lr", "weight_decay": "train.weight_decay",
    "lr_schedule": "train.lr_schedule", "lr_schedule_unit": "train.lr_schedule_unit",
    "label_smoothing": "train.label_smoothing", "max_steps_per_epoch": "train.max_steps_per_epoch",
    "precision": None, "adapter_style": "model.adapter_style", "pos_embed": "model.pos_embed", "init": "model.init",
    "init_images": None, "frozen_bn": "train.frozen_bn", "objective": "train.objective",
    "distill_temperature": None, "match_epochs": None, "normalize": "data.normalize",
    "auto_augment": "data.auto_augment", "min_crop_scale": "data.min_crop_scale", "hflip": "data.hflip",
    "train_interpolation": "data.train_interpolation",
    "auto_augment_interpolation": "data.auto_augment_interpolation", "eval_crop_pct": "data.eval_crop_pct",
    "eval_interpolation": "data.eval_interpolation",
}
OLD_UNITS = [
    ("dataset", "{}"), ("epochs", ("{} epoch", "{} epochs")), ("batch_size", "batch {}"),
    ("per_device_batch_size", "{}/device"),
    ("weight_decay", "wd {}"), ("lr_schedule", "{}"), ("lr_schedule_unit", "per {}"),
    ("label_smoothing", "label smoothing {}"), ("max_steps_per_epoch", ("max {} step/epoch", "max {} steps/epoch")),
    ("img_size", "{} px"),
    ("precision", "{}"), ("adapter_style", "adapters: {}"), ("pos_embed", "pos. embed: {}"), ("init", "init: {}"),
    ("init_images", ("{} init image", "{} init images")),
    ("frozen_bn", "frozen BN: {}"), ("objective", "objective: {}"), ("distill_temperature", "T = {}"),
    ("match_epochs", ("{} match epoch", "{} match epochs")),
    ("normalize", "mean/std: {}"), ("auto_augment", "AutoAugment: {}"), ("min_crop_scale", "crop scale >= {}"),
    ("hflip", "flip p = {}"),
    ("train_interpolation", "train interp.: {}"), ("auto_augment_interpolation", "AA interp.: {}"),
    ("eval_crop_pct", "eval crop {}"), ("eval_interpolation", "eval interp.: {}"),
    ("pretrained", "pretrained: {}"), ("random_init", "random init: {}"), ("num_classes", ("{} class", "{} classes")),
]
OLD_READ_ONLY_WHEN = {
    "model.init_images": ("model.init", ("least_squares",)),
    "train.distill_temperature": ("train.objective", ("distill",)),
    "train.match_epochs": ("train.objective", ("match_then_task",)),
}
OLD_OPERATIONAL_KEYS = {"data.workers", "train.log_every", "train.preempt_check_every", "data.label"}
OLD_COMPANIONS = {"objective": ["distill_temperature", "match_epochs"], "init": ["init_images"]}
#: the choices validate checked inline, as they were spelled there or imported from their owners
OLD_CHOICES = {
    "model.adapter_style": ("code", "text"), "model.pos_embed": ("none", "reinject"),
    "model.random_init": ("none", "source", "destination", "both"), "data.name": ("synthetic", "imagefolder"),
    "data.bad_images": ("error", "skip"), "data.normalize": ("model", "imagenet"),
    "data.train_interpolation": ("nearest", "bilinear", "bicubic"),
    "data.auto_augment_interpolation": ("nearest", "bilinear", "bicubic"),
    "data.eval_interpolation": ("nearest", "bilinear", "bicubic"), "train.frozen_bn": ("eval", "train"),
    "train.objective": ("task", "match", "distill", "match_then_task"), "train.lr_schedule": ("cosine", "constant"),
    "train.lr_schedule_unit": ("step", "epoch"), "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"), "data.pipeline": ("fast", "torchvision"),
    "data.decode": ("cpu", "gpu"),
}


def test_the_tables_derived_from_the_key_declarations_are_the_old_ones():
    """RECIPE, the caption words, READ_ONLY_WHEN, OPERATIONAL_KEYS, the plots' companions and the checked
    choices are derived from the fields' metadata (stitching.keyspec.declare): the hand-written tables they
    replace, value for value and in the same order; a key declared later only adds entries (a recipe column
    after the old ones: result.csv's old columns keep their places)."""
    from stitching.config import OPERATIONAL_KEYS, READ_ONLY_WHEN
    from stitching.plots.options import _COMPANIONS
    from stitching.results import recipe
    from stitching.validate import CHOICES

    def old_part(table: dict, old: dict) -> dict:
        return {k: v for k, v in table.items() if k in old}

    assert list(recipe.RECIPE.items())[:len(OLD_RECIPE)] == list(OLD_RECIPE.items())
    assert recipe.RECIPE_COLUMNS[:len(OLD_RECIPE)] == list(OLD_RECIPE)
    assert [(c, u) for c, u in recipe._UNITS if c in OLD_RECIPE] == OLD_UNITS
    assert old_part(READ_ONLY_WHEN, OLD_READ_ONLY_WHEN) == OLD_READ_ONLY_WHEN
    assert isinstance(OPERATIONAL_KEYS, tuple) and set(OPERATIONAL_KEYS) >= OLD_OPERATIONAL_KEYS
    assert old_part(_COMPANIONS, OLD_COMPANIONS) == OLD_COMPANIONS
    assert old_part(CHOICES, OLD_CHOICES) == OLD_CHOICES


def test_every_key_declaration_is_complete_and_names_its_owner():
    """What a declaration gives the derived tables is whole: recipe places 0..n-1 and caption places 0..m-1 with
    no gaps or doubles; a key read only under another names a real key and values of that key's choices (or,
    for model.init, lsinit's modes); a subsystem's choices are named by its owner (a tuple there, not retyped)."""
    import dataclasses
    import importlib

    from stitching.config import SECTIONS, declared
    from stitching.keyspec import Choices
    from stitching.stitch.lsinit import INIT_MODES
    from stitching.validate import CHOICES

    columns = list(declared("recipe").values())
    assert sorted(c.at for c in columns) == list(range(len(columns)))
    captions = [c.caption_at for c in columns if c.unit is not None]
    assert sorted(captions) == list(range(len(captions)))
    assert all((c.unit is None) == (c.caption_at is None) for c in columns)
    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for key, (other, values) in declared("read_when").items():
        assert other in keys and set(values) <= set(CHOICES.get(other, INIT_MODES)), key
    for key, choices in declared("choices").items():
        assert isinstance(choices, (tuple, Choices)) and CHOICES[key], key
        if isinstance(choices, Choices):     # the owner's own tuple, resolved in stitching.validate
            module, _, name = choices.owner.rpartition(".")
            owned = getattr(importlib.import_module(f"stitching.{module}"), name)
            assert isinstance(owned, tuple) and CHOICES[key] == choices.first + owned, key


@pytest.mark.parametrize("key", sorted(OLD_CHOICES))
def test_a_value_outside_a_keys_declared_choices_is_one_line_naming_it(tmp_path, key):
    """Every key that declares choices is checked by validate: a value outside them is a ConfigError naming the
    key, the value and the choices (the message each inline check gave)."""
    from stitching.validate import CHOICES

    base = write(tmp_path / "tiny.yaml", "model:\n  source: resnet18\n  pretrained: false\ndata:\n  img_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(base, [f"{key}=bogus"])
    assert err.value.key == key
    assert str(err.value).endswith(f"{key}='bogus': must be one of {', '.join(CHOICES[key])}")


# ------------------------------------------------------------------ a new key, following docs/architecture.md
NEW_KEY_SCRIPT = r"""
import csv, sys
from pathlib import Path
import stitching
from stitching import config, validate
from stitching.results import recipe, schema
from stitching.rundir import identity
assert Path(stitching.__file__).parent == Path(sys.argv[1]), stitching.__file__   # the edited copy
assert validate.CHOICES["data.my_flip"] == (False, True)
assert recipe.RECIPE_KEYS["my_flip"] == "data.my_flip" and recipe.RECIPE_COLUMNS[-1] == "my_flip"
assert "my_flip" in schema.RESULT_COLUMNS and "data.my_flip" not in config.OPERATIONAL_KEYS
base = {"model": {"source": "resnet18", "source_stage": 1, "destination_stage": 3, "adapter": "linear",
                  "pretrained": False},
        "data": {"name": "synthetic", "img_size": 32, "num_classes": 10, "train_size": 64, "val_size": 32,
                 "workers": 0},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 32, "device": "cpu"}}
a = validate.load_config(base)
b = validate.load_config(base, ["data.my_flip=true"])
assert a.data.my_flip is False and b.data.my_flip is True
assert identity(b.to_dict(), config.IDENTITY) == {**identity(a.to_dict(), config.IDENTITY), "data.my_flip": True}
try:
    validate.load_config(base, ["data.my_flip=maybe"])
    raise SystemExit("a value outside the declared choices was accepted")
except config.ConfigError as err:
    assert "data.my_flip" in str(err), err
run = stitching.train(base, data={"my_flip": True}, output={"dir": sys.argv[2]})
[row] = list(csv.DictReader((run / "result.csv").open()))
assert row["my_flip"] == "True", row
print("new key ok")
"""


@pytest.mark.slow
def test_a_new_key_is_one_declaration_following_the_recipe(tmp_path):
    """docs/architecture.md's "How to add a config key", followed on a copy of the package: the field with
    ``declare(...)`` (choices, a recipe column at the next ``at``), its identity baseline, its ``_one_of`` check.
    The derived tables hold it, a value outside its choices is one line naming it, it is part of a run's
    identity, and a run trained with it writes its column to ``result.csv``."""
    import re
    import shutil

    from stitching.config import declared

    pkg = tmp_path / "copy" / "stitching"
    shutil.copytree(ROOT / "stitching", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    at = max(c.at for c in declared("recipe").values()) + 1
    config = pkg / "config.py"
    text = config.read_text()
    field = "    root: str | None = None"
    assert text.count(field) == 1 and text.count('    "data.name": "synthetic",\n') == 1
    text = text.replace(field, f'    my_flip: bool = declare(False, choices=(False, True), recipe=RecipeColumn("my_flip", '
                               f'{at}))   # a new key\n' + field)
    config.write_text(text.replace('    "data.name": "synthetic",\n',
                                   '    "data.name": "synthetic",\n    "data.my_flip": False,\n'))
    checks = pkg / "validate.py"
    text = checks.read_text()
    assert len(re.findall(r'_one_of\(cfg, "data.name"\)\n', text)) == 1
    checks.write_text(text.replace('_one_of(cfg, "data.name")\n', '_one_of(cfg, "data.name")\n    _one_of(cfg, "data.my_flip")\n'))
    proc = subprocess.run([sys.executable, "-c", NEW_KEY_SCRIPT, str(pkg), str(tmp_path / "run")], cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(pkg.parent), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "new key ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
