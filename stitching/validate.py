"""The config check above the subsystems: everything that can be known wrong in a run's config before anything is
built, and the configs that may train together.

Owns :func:`validate` (names, ranges and impossible stitches, each subsystem's choices imported here from their
owners), :func:`load_config` (a config loaded by :func:`stitching.config.read_config`, then validated: what every
command and the API call), :func:`model_spec` (the registry spec of a config's source or destination, its errors
named by key), :func:`check_files` (the files a run reads, without reading them), and the pack rule
(:data:`PACK_BRANCH_KEYS`, :func:`pack_key`, :func:`pack_refusal`). :mod:`stitching.config` keeps the schema,
loading and identity and imports no subsystem; this module sits above both.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
import typing
from pathlib import Path

import torch

from stitching.config import CLI, IDENTITY, SECTIONS, Config, config_value, declared, read_config
from stitching.data import bad_images, datasets, pipeline, transforms
from stitching.kinds import FINETUNE
from stitching.models.derive import ArgumentsError, SplitError
from stitching.models.formats import is_token
from stitching.models.registry import available, get_spec
from stitching.models.trace import list_blocks
from stitching.rundir import identity as rundir_identity
from stitching.stitch.lsinit import check_config as check_init
from stitching.stitch import plan, posembed, stitcher
from stitching.stitch.plan import PlanError, check_quirks, plan_config
from stitching.stitch.posembed import learned_pos_embed
from stitching.train import objective, perf
from stitching.train.curves import check as check_curves

#: the modules that own the choices a key declares (:class:`stitching.keyspec.Choices`), imported here
_OWNERS = {m.__name__.removeprefix("stitching."): m
           for m in (datasets, bad_images, pipeline, transforms, plan, posembed, stitcher, objective, perf)}


def _resolve(choices) -> tuple:
    """A key's declared choices as values: a tuple as declared, or its owner's tuple after ``first``."""
    if isinstance(choices, tuple):
        return choices
    module, _, name = choices.owner.rpartition(".")
    return choices.first + tuple(getattr(_OWNERS[module], name))


#: dotted key -> the values it may take: derived from the keys' declarations (``choices=``), each subsystem's tuple
#: read from its owner; every one is checked by :func:`validate` (tests/test_config.py)
CHOICES: typing.Mapping[str, tuple] = types.MappingProxyType({k: _resolve(c) for k, c in declared("choices").items()})
_HINTS = {f"{s}.{k}": h for s, cls in SECTIONS.items() for k, h in typing.get_type_hints(cls).items()}


def load_config(path: str | os.PathLike | typing.Mapping | None, overrides: typing.Sequence[str] = (),
                check: bool = True,
                updates: typing.Mapping[str, typing.Any] | None = None, updates_source: str = CLI,
                run_dir: bool = False) -> Config:
    """:func:`stitching.config.read_config` (the file, its bases, ``updates`` and command-line ``overrides``),
    then, with ``check``, :func:`validate`: the config every command and the API run."""
    cfg = read_config(path, overrides, updates=updates, updates_source=updates_source, run_dir=run_dir)
    if check:
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Everything that can be known wrong before building: names, ranges and impossible stitches."""
    m, d, t = cfg.model, cfg.data, cfg.train
    src_spec = model_spec(cfg, "source")
    _check_cut_keys(cfg)
    if m.is_original:
        for key in ("destination_stage", "destination_block", "destination", "destination_weights",
                    "destination_kwargs"):
            if getattr(m, key) is not None:
                raise cfg.error(f"model.{key}", "needs model.source_stage or model.source_block (without a cut "
                                "the config describes the original source model)")
    else:
        model_spec(cfg, "destination")
        try:
            plan_config(m, d.img_size if m.source_block is not None else 224)   # stages: declared, nominal
        except PlanError as err:
            raise cfg.error(err.key, str(err)) from None
        except RuntimeError as err:         # a block that does not output its stage's format (registry)
            raise cfg.error("model.source_block", str(err)) from None
    _one_of(cfg, "model.adapter_style")
    try:
        check_quirks(m.code_quirks, m.adapter_style)        # stitched configs: plan_config checked it
    except PlanError as err:
        raise cfg.error(err.key, str(err)) from None
    _check_random_init(cfg)
    _check_pos_embed(cfg)

    check_init(cfg, lambda: (model_spec(cfg, "source"), model_spec(cfg, "destination")))
    _one_of(cfg, "data.name")
    _one_of(cfg, "data.bad_images")
    _one_of(cfg, "data.normalize")
    for key in ("data.train_interpolation", "data.auto_augment_interpolation", "data.eval_interpolation"):
        _one_of(cfg, key)
    if d.eval_crop_pct is not None and not 0 < d.eval_crop_pct <= 1:
        raise cfg.error("data.eval_crop_pct", "must be in (0, 1] (or null: the model's own)")
    _one_of(cfg, "train.frozen_bn")
    if t.frozen_bn == "train" and t.fold_bn:
        raise cfg.error("train.frozen_bn", "train mode re-estimates the frozen BatchNorm statistics, which "
                        "folded BatchNorms cannot: set train.fold_bn=false")
    _check_objective(cfg)

    check_curves(cfg)
    _one_of(cfg, "train.lr_schedule")
    _one_of(cfg, "train.lr_schedule_unit")
    _one_of(cfg, "train.device")
    _one_of(cfg, "train.precision")
    if isinstance(t.channels_last, str) and t.channels_last != "auto":
        raise cfg.error("train.channels_last", "must be auto, true or false")

    _one_of(cfg, "data.pipeline")
    _one_of(cfg, "data.decode")
    if d.decode == "gpu" and d.pipeline != "fast":
        raise cfg.error("data.decode", "gpu decoding is part of data.pipeline=fast (torchvision decodes with PIL)")
    for role in ("source", "destination"):
        size = (m.args(role) or {}).get("img_size")
        if size is not None and size not in (d.img_size, [d.img_size] * 2):
            own = role == "source" or m.destination_kwargs is not None
            key = f"model.{role}_kwargs" if own else "model.source_kwargs"
            raise cfg.error(key, f"img_size {size} differs from data.img_size {d.img_size}: both models run on "
                            "data.img_size images (their cuts are traced there)")
    if d.img_size < src_spec.min_img_size:
        raise cfg.error("data.img_size", f"must be at least {src_spec.min_img_size} for {m.source}")
    for key, low in [("data.num_classes", 2), ("data.train_size", 1), ("data.val_size", 1), ("data.workers", 0),
                     ("train.epochs", 0), ("train.batch_size", 1), ("train.per_device_batch_size", 1),
                     ("train.max_steps_per_epoch", 1), ("train.log_every", 1), ("train.preempt_check_every", 1)]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < low:
            raise cfg.error(key, f"must be >= {low}")
    if not 0 < d.min_crop_scale <= 1:
        raise cfg.error("data.min_crop_scale", "must be in (0, 1]")
    if isinstance(d.hflip, bool) or not isinstance(d.hflip, (int, float)) or not 0 <= d.hflip <= 1:
        raise cfg.error("data.hflip", "must be a probability in [0, 1] (0.5: the paper's flip, 0: no flip)")
    for key in ("train.lr", "train.weight_decay", "train.label_smoothing"):
        if getattr(t, key.split(".")[1]) < 0:
            raise cfg.error(key, "must be >= 0")
    if d.name == "imagefolder" and not d.root:
        raise cfg.error("data.root", "imagefolder data needs a root folder (root/train, root/val)")


def _check_objective(cfg: Config) -> None:
    """``train.objective`` and its keys (:mod:`stitching.train.objective`): a known objective; anything but the
    task loss needs adapters to train (a stitched config, not finetune); a positive temperature; match epochs
    that leave task epochs to follow; a similarity image count >= 0."""
    t, m = cfg.train, cfg.model
    _one_of(cfg, "train.objective")
    if t.objective != "task" and (m.is_original or m.adapter == FINETUNE):
        raise cfg.error("train.objective", "trains the adapters against the destination's own activation or "
                        "logits: it needs a stitched config with adapters (model.source_stage, not finetune)")
    if not t.distill_temperature > 0:
        raise cfg.error("train.distill_temperature", "must be > 0")
    if t.match_epochs is not None and t.match_epochs < 1:
        raise cfg.error("train.match_epochs", "must be >= 1 (or null: half of train.epochs)")
    if t.objective == "match_then_task":
        if t.epochs < 2:
            raise cfg.error("train.epochs", "match_then_task needs at least 2 epochs (match first, then task)")
        if t.match_epochs is not None and t.match_epochs >= t.epochs:
            raise cfg.error("train.match_epochs", f"must be < train.epochs ({t.epochs}): match_then_task ends "
                            "with task epochs")
    if t.similarity_images < 0:
        raise cfg.error("train.similarity_images", "must be >= 0 (0: not measured)")


def _check_cut_keys(cfg: Config) -> None:
    """A cut is named by stage keys (``model.source_stage`` + ``destination_stage``) or by block keys
    (``model.source_block`` + ``destination_block``): one kind per side, the same kind on both sides."""
    m = cfg.model
    for side in ("source", "destination"):
        if getattr(m, f"{side}_stage") is not None and getattr(m, f"{side}_block") is not None:
            raise cfg.error(f"model.{side}_block", f"model.{side}_stage and model.{side}_block are both set: "
                            "a side is cut at a stage or at a block, not both")
    if m.source_block is not None and m.destination_block is None:
        raise cfg.error("model.source_block", "needs model.destination_block (block cuts name a block on both "
                        "sides)" + (", not destination_stage" if m.destination_stage is not None else ""))
    if m.source_stage is not None and m.destination_stage is None:
        raise cfg.error("model.destination_stage", "required with source_stage (source_stage..4)"
                        + ("; destination_block needs model.source_block instead of source_stage"
                           if m.destination_block is not None else ""))


def _check_pos_embed(cfg: Config) -> None:
    """``model.pos_embed``: one of the modes; ``reinject`` needs adapters and a destination with a learned
    absolute position embedding (checked on the destination built on the meta device: no weights read)."""
    _one_of(cfg, "model.pos_embed")
    m = cfg.model
    if m.pos_embed == "none":
        return
    if m.is_original or m.adapter == FINETUNE:
        raise cfg.error("model.pos_embed", "reinject adds the destination's position embedding after the adapters: "
                        "it needs a stitched config with adapters (model.source_stage, not finetune)")
    spec = model_spec(cfg, "destination")
    name = m.destination or m.source
    found = None
    if m.destination_block is not None:
        fmt = list_blocks(name, m.destination_args(), cfg.data.img_size)[m.destination_block].format
    else:
        fmt = spec.cut(m.destination_stage, "first").format
    if is_token(fmt):
        try:
            with torch.device("meta"):
                model = spec.build(False, cfg.num_classes)
        except Exception:  # noqa: BLE001 - an architecture that cannot be built on meta: build it for real
            model = spec.build(False, cfg.num_classes)
        found = learned_pos_embed(model)
    if found is None:
        raise cfg.error("model.pos_embed", f"destination {name} has no learned position embedding to re-inject "
                        "(ViT-like destinations only)")


def _check_random_init(cfg: Config) -> None:
    """``model.random_init``: which side is built with random weights (:data:`stitching.stitch.stitcher.RANDOM_INIT`); a random
    destination needs a stitched config."""
    _one_of(cfg, "model.random_init")
    if cfg.is_original and cfg.model.random_init in ("destination", "both"):
        raise cfg.error("model.random_init", "an original (unstitched) model has no destination: use none or "
                        "source")


def model_spec(cfg: Config, role: str):
    """The registry spec of the config's ``source`` or ``destination`` model with its constructor arguments; a
    name no library knows, a model that cannot be cut into four stages or arguments its constructor refuses
    are a :class:`ConfigError` on ``model.<role>`` / ``model.<role>_kwargs``."""
    m = cfg.model
    name = m.source if role == "source" else (m.destination or m.source)
    kwargs = m.source_args() if role == "source" else m.destination_args()
    key = f"model.{role}" if role == "source" or m.destination is not None else "model.source"
    try:
        return get_spec(name, kwargs)
    except KeyError as err:
        raise cfg.error(key, f"{err.args[0]}; registered by hand: {', '.join(available())}") from None
    except ArgumentsError as err:
        kw = f"model.{role}_kwargs" if role == "source" or m.destination_kwargs is not None else "model.source_kwargs"
        raise cfg.error(kw, str(err)) from None
    except SplitError as err:
        raise cfg.error(key, str(err)) from None


def check_files(cfg: Config, data: bool = True) -> None:
    """Files a run needs (weights; with ``data``, the data root): checked by commands that will read them,
    without reading them."""
    for key in ("model.source_weights", "model.destination_weights"):
        value = getattr(cfg.model, key.split(".")[1])
        if value is not None and not Path(value).is_file():
            raise cfg.error(key, "weights file not found")
        if value is not None and not os.access(value, os.R_OK):
            raise cfg.error(key, "weights file not readable (permissions)")
    if data and cfg.data.name == "imagefolder":
        root = Path(cfg.data.root)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise cfg.error("data.root", f"missing folder {root / split}")


def _one_of(cfg: Config, key: str) -> None:
    """``key``'s value is one of its :data:`CHOICES` (or null, where the key may be unset)."""
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value not in CHOICES[key] and not (value is None and type(None) in typing.get_args(_HINTS[key])):
        raise cfg.error(key, f"must be one of {', '.join(CHOICES[key])}")


# ------------------------------------------------------------------------------------------------- packs
#: The keys in which the runs of one *pack* may differ (:mod:`stitching.train.pack`: one process trains them over
#: one data pass): each run is a branch with its own cut, destination, adapters, objective, optimizer and schedule.
#: Every other key a run's identity holds is shared -- source model, its weights and constructor arguments, the
#: data section (so the preprocessing), seed, epochs, batch size and accumulation, device, precision, layout and
#: folding of the frozen parts -- so every branch sees the same images in the same order with the same
#: augmentation, and the same frozen source prefix. ``model.random_init`` is a branch key for its destination
#: side only (whether the source is random is shared). ``train.frozen_bn: train`` and ``model.adapter: finetune``
#: branches run their own prefix (it is not frozen in eval mode) and share the data pass only.
PACK_BRANCH_KEYS = frozenset({
    "model.destination", "model.destination_kwargs", "model.destination_weights", "model.source_stage",
    "model.destination_stage", "model.source_block", "model.destination_block", "model.adapter", "model.resize",
    "model.schedule", "model.adapter_style", "model.pos_embed", "model.init", "model.init_images",
    "model.random_init", "train.lr", "train.weight_decay", "train.lr_schedule", "train.lr_schedule_unit",
    "train.label_smoothing", "train.objective", "train.distill_temperature", "train.match_epochs",
    "train.similarity_images", "train.frozen_bn",
})

#: what stands for the source side of ``model.random_init`` in the shared part of a pack key
_RANDOM_SOURCE = "model.random_init (source side)"


def _pack_shared(config: dict) -> tuple[dict | None, str, str]:
    """``(the part of a run's identity every branch of its pack shares, "", "")``, or ``(None, the key that makes
    the run train alone, why)``."""
    if config_value(config, "model.source_stage") is None and config_value(config, "model.source_block") is None:
        return None, "model.source_stage", "an original (unstitched) model has no stitch to share a data pass: " \
                                           "it trains alone"
    if config_value(config, "train.compile") is True:
        return None, "train.compile", "a compiled run trains alone"
    shared = {k: v for k, v in rundir_identity(config, IDENTITY).items() if k not in PACK_BRANCH_KEYS}
    shared[_RANDOM_SOURCE] = config_value(config, "model.random_init") in ("source", "both")
    return shared, "", ""


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def pack_key(config: dict) -> str | None:
    """The pack rule: runs with the same key may train in one pack (one process, one data pass, the frozen source
    prefix run once for all), each branch's result the one it would have alone. ``config`` is a resolved config
    (``Config.to_dict()`` or a run directory's ``config.yaml``, a missing key at its baseline); the key is
    ``<source>.seed<seed>.<8 hex digits>``, the digits naming its identity (:func:`stitching.rundir.identity`)
    without :data:`PACK_BRANCH_KEYS`. None: the run trains alone (an original model; ``train.compile``)."""
    shared, _, _ = _pack_shared(config)
    if shared is None:
        return None
    digest = hashlib.sha1(_json(shared).encode()).hexdigest()[:8]
    return f"{config_value(config, 'model.source')}.seed{config_value(config, 'train.seed')}.{digest}"


def pack_refusal(config: dict, other: dict) -> tuple[str, str] | None:
    """Why the runs of ``config`` and ``other`` cannot train in one pack (:func:`pack_key`'s rule, in words):
    ``(the first key that keeps them apart, the reason)``, or None when they may."""
    (a, key_a, why_a), (b, key_b, why_b) = _pack_shared(config), _pack_shared(other)
    if a is None or b is None:
        return (key_a, why_a) if a is None else (key_b, why_b)
    differ = sorted(k for k in set(a) | set(b) if k not in a or k not in b or _json(a[k]) != _json(b[k]))
    if not differ:
        return None
    return differ[0].split(" ")[0], (f"differs in {', '.join(differ)}: the runs of a pack share all but their "
                                     "cut, destination, adapters, objective, lr and schedule")
