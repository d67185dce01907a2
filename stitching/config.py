"""The run configuration: one YAML file is the whole truth of a run.

Sections and defaults are the dataclasses below; :data:`IDENTITY_BASELINE` gives every key the value runs
had before the key existed, and :data:`IDENTITY` adds the keys a run never reads (:func:`unread_keys`): what a
run's identity is measured against (:mod:`stitching.rundir`). A file may
build on another with ``base: other.yaml`` (a path relative to the file; chains allowed), and any key can be
overridden on the command line as ``section.key=value``, the value written as the key's type reads it
(:func:`parse_value`: a string or path exactly as typed, never parsed as YAML). A cut is named by stage
keys or by block keys (:data:`CUT_KEYS`); a layer (a base file, the file on it, a sweep's grid point or an API
call's arguments, the command line) that gives one kind a value replaces the other kind an earlier layer gave
(:func:`_replace_cut_kind`), and one layer giving both is an error. Every leaf remembers
the file it came from, so an error names the key, the value and the file: an unknown key, a wrong type, an
impossible combination (checked against the registry's declared shapes, before anything is built) or a
missing file raises :class:`ConfigError`, which the command-line tools print as one line and exit with code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stitching.kinds import FINETUNE
from stitching.messages import MAX_MESSAGE_CHARS, clip, short_repr
# EXIT_CONFIG is re-exported: the exit code of a ConfigError
from stitching.rundir import EXIT_CONFIG, EXIT_INTERRUPTED, IdentityRules  # noqa: F401
from stitching.rundir import identity as rundir_identity

CLI = "command line"


class ConfigError(ValueError):
    """A bad key, value or combination: ``str()`` is the one line naming the source (file, command line or the
    Python call), the key and the value; :func:`run_cli` prints it and exits with :data:`EXIT_CONFIG`. The value
    is quoted with :func:`stitching.messages.short_repr` and the key and message are clipped, so the line stays
    short whatever the value (an alias bomb, a megabyte string)."""

    def __init__(self, key: str, value, source: str, message: str):
        self.key, self.value, self.source, self.message = key, value, source, message
        key, message = clip(key), clip(message, MAX_MESSAGE_CHARS)
        super().__init__(f"{source}: {key}={short_repr(value)}: {message}" if key else f"{source}: {message}")


@dataclass
class ModelConfig:
    source: str = "resnet50"
    destination: str | None = None          # defaults to source
    source_stage: int | None = None         # None: the original, unstitched source model
    destination_stage: int | None = None
    source_block: int | None = None         # block cuts instead of stages: the source's output after its block i
    destination_block: int | None = None    # (0-based, registry.list_blocks) into the destination after block j
    adapter: str = "bottleneck"             # an adapter kind (stitching/kinds.py) | finetune
    resize: str = "bilinear"                # none | bilinear | strided
    schedule: str = "paper"                 # paper | destination (intermediate adapter shapes)
    adapter_style: str = "code"             # code | text: adapters as the paper's code or its text builds them
    code_quirks: bool = False               # code style: the paper code's padded 1x1 convs, "no downsample" maps
    pos_embed: str = "none"                 # none | reinject: the destination's position embedding re-added
                                            # to the adapters' output tokens (ViT-like destinations)
    init: str = "default"                   # default (the paper code's) | pytorch (PyTorch's own) | least_squares:
                                            # adapters fitted to the destination's activations first (stitch/lsinit.py)
    init_images: int = 2048                 # least_squares: training images (eval transforms) the fit streams
    pretrained: bool = True                 # false: random init
    source_weights: str | None = None       # local weights file (safetensors / torch state dict)
    destination_weights: str | None = None
    random_init: str = "none"               # none | source | destination | both: that side built with random
                                            # weights whatever pretrained / *_weights say (matrix controls)
    source_kwargs: dict | None = None       # constructor arguments (timm / torchvision), e.g. {img_size: 64}
    destination_kwargs: dict | None = None  # null: the source's when the destination is the source, else none

    @property
    def is_original(self) -> bool:
        """No cut on either key (stage or block): the original, unstitched source model."""
        return self.source_stage is None and self.source_block is None

    def args(self, role: str) -> dict | None:
        """Constructor arguments of the ``source`` or ``destination`` (None: the constructor's defaults):
        ``<role>_kwargs``; a destination without its own takes the source's when it is the source."""
        own = getattr(self, f"{role}_kwargs")
        if role == "source" or own is not None:
            return own or None
        return self.args("source") if (self.destination or self.source) == self.source else None

    def source_args(self) -> dict | None:
        return self.args("source")

    def destination_args(self) -> dict | None:
        return self.args("destination")


@dataclass
class DataConfig:
    name: str = "synthetic"                 # synthetic | imagefolder
    root: str | None = None                 # imagefolder: root/train/<class>/..., root/val/<class>/...
    label: str | None = None                # the dataset's name in figures and tables (null: data.name for
                                            # synthetic, the root folder's name for imagefolder); not identity
    img_size: int = 224
    num_classes: int | None = None          # synthetic: 10; imagefolder: 1000 (checked against the folders)
    train_size: int = 2000                  # synthetic only
    val_size: int = 500                     # synthetic only
    workers: int | None = None              # loader workers per process; null = the job's CPUs per process - 1
    pipeline: str = "fast"                  # fast (crop box first, reduced-size JPEG decode, uint8 to the device,
                                            # normalised there) | torchvision (PIL, float on the CPU); same distribution
    decode: str = "cpu"                     # fast pipeline: cpu | gpu (nvJPEG on the training GPU; the CPU where none)
    auto_augment: bool = True
    min_crop_scale: float = 0.08            # RandomResizedCrop's smallest area (paper: torchvision's 0.08)
    hflip: float = 0.5                      # RandomHorizontalFlip's probability (paper: 0.5; 0 for digits, text)
    normalize: str = "model"                # model (the source's own mean/std) | imagenet (ImageNet's, any model)
    train_interpolation: str | None = None  # crop resizing: null = the source model's | nearest | bilinear | bicubic
    auto_augment_interpolation: str | None = None  # null = train_interpolation (the paper's code: nearest)
    eval_crop_pct: float | None = None      # null = the source model's own (0.875 = resize 256, crop 224)
    eval_interpolation: str | None = None   # null = the source model's own
    seed: int = 0                           # synthetic data seed
    bad_images: str = "error"               # imagefolder: an unreadable file stops the run naming it (error)
                                            # or is left out of its batch and counted in train.log (skip)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 512                   # effective batch = per-device x world size x accumulation
    per_device_batch_size: int | None = None  # None: batch_size / world size (no accumulation)
    lr: float = 0.002
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"             # cosine (to 0) | constant
    lr_schedule_unit: str = "step"          # step | epoch
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"                    # auto | cpu | cuda
    precision: str = "auto"                 # auto (bf16 on CUDA >= 8.0, fp16 below, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: str | bool = "auto"      # auto (on CUDA for conv parts) | true | false
    fold_bn: bool = True                    # fold frozen BatchNorm into convs (stitched runs only)
    compile: bool = False                   # torch.compile the trainable part
    frozen_bn: str = "eval"                 # eval | train (the paper's code: frozen parts in train mode, BatchNorm
                                            # statistics re-estimated, stochastic depth on; weights stay frozen)
    max_steps_per_epoch: int | None = None  # cap for quick runs; None = the whole epoch
    log_every: int = 10
    objective: str = "task"                 # task (cross-entropy) | match (MSE to the destination's activation at
                                            # the join) | distill (KL to the destination's logits) | match_then_task
    distill_temperature: float = 4.0        # distill: softmax temperature T (the loss is scaled by T^2)
    match_epochs: int | None = None         # match_then_task: epochs of match before task; null = half the epochs
    similarity_images: int = 1024           # validation images for the similarity at the join written to
                                            # result.csv (before and after training); 0 = not measured
    preempt_check_every: int = 10           # under DDP the ranks agree on a SIGTERM/SIGUSR1 every N optimizer
                                            # steps (one host sync; one process looks every step), train/perf.py


@dataclass
class OutputConfig:
    dir: str | None = None                  # default: runs/<config file stem>/<run name> (rundir.run_dir_name)
    save_model: bool = True
    log_to: list | None = None              # live curves besides metrics.csv: [tensorboard], [wandb] or both
                                            # (optional extras; stitching/train/curves.py); null: none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    path: str | None = field(default=None, repr=False)          # the file it was loaded from
    origins: dict = field(default_factory=dict, repr=False)     # dotted key -> file or "command line"

    @property
    def is_original(self) -> bool:
        return self.model.is_original

    @property
    def num_classes(self) -> int:
        if self.data.num_classes is not None:
            return self.data.num_classes
        return 10 if self.data.name == "synthetic" else 1000

    def to_dict(self) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def source_of(self, key: str) -> str:
        return self.origins.get(key, self.path or "defaults")

    def error(self, key: str, message: str) -> ConfigError:
        section, name = key.split(".", 1)
        return ConfigError(key, getattr(getattr(self, section), name), self.source_of(key), message)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "output": OutputConfig}

#: The two ways a config names a cut, each kind's (sender key, receiver key): stage cuts (the stage convention of
#: docs/method.md) or block cuts (indices into :func:`stitching.models.trace.list_blocks`). A side is cut one
#: way only, and both sides the same way (:func:`_check_cut_keys`); between layers the later kind wins
#: (:func:`_replace_cut_kind`).
CUT_KEYS = {"stages": ("model.source_stage", "model.destination_stage"),
            "blocks": ("model.source_block", "model.destination_block")}

#: The identity baseline (:func:`stitching.rundir.identity`): for every key of every section a run's identity
#: reads (all but ``output``), the value a run directory written *before the key existed* implicitly had --
#: normally the key's default when it was introduced. A run's identity is its keys that differ from this table
#: (a key missing from an older ``config.yaml`` counts as its baseline), so adding a key never changes the
#: identity, the directory name or the "same run" verdict of a run that leaves it at its baseline.
#: A literal on purpose, never computed from the defaults above, and frozen: an entry is written once, with the
#: key, and never edited -- changing a default later must not make new runs "equal" to older ones that ran
#: with the former value. A new key gets an entry here (tests/test_rundir.py checks that every key has one and
#: that it equals today's default unless the test's CHANGED_DEFAULTS names it).
IDENTITY_BASELINE: typing.Mapping[str, typing.Any] = types.MappingProxyType({
    "model.source": "resnet50",
    "model.destination": None,
    "model.source_stage": None,
    "model.destination_stage": None,
    "model.source_block": None,
    "model.destination_block": None,
    "model.adapter": "bottleneck",
    "model.resize": "bilinear",
    "model.schedule": "paper",
    "model.adapter_style": "code",
    "model.code_quirks": False,
    "model.pos_embed": "none",
    "model.init": "default",
    "model.init_images": 2048,
    "model.pretrained": True,
    "model.source_weights": None,
    "model.destination_weights": None,
    "model.random_init": "none",
    "model.source_kwargs": None,
    "model.destination_kwargs": None,
    "data.name": "synthetic",
    "data.root": None,
    "data.label": None,
    "data.img_size": 224,
    "data.num_classes": None,
    "data.train_size": 2000,
    "data.val_size": 500,
    "data.workers": None,
    "data.pipeline": "torchvision",     # introduced with default fast; runs before it had the torchvision transforms
    "data.decode": "cpu",
    "data.auto_augment": True,
    "data.min_crop_scale": 0.08,
    "data.hflip": 0.5,
    "data.normalize": "model",
    "data.train_interpolation": None,
    "data.auto_augment_interpolation": None,
    "data.eval_crop_pct": None,
    "data.eval_interpolation": None,
    "data.seed": 0,
    "data.bad_images": "error",
    "train.epochs": 10,
    "train.batch_size": 512,
    "train.per_device_batch_size": None,
    "train.lr": 0.002,
    "train.weight_decay": 0.05,
    "train.lr_schedule": "cosine",
    "train.lr_schedule_unit": "step",
    "train.label_smoothing": 0.0,
    "train.seed": 0,
    "train.device": "auto",
    "train.precision": "auto",
    "train.channels_last": "auto",
    "train.fold_bn": True,
    "train.compile": False,
    "train.frozen_bn": "eval",
    "train.max_steps_per_epoch": None,
    "train.log_every": 10,
    "train.objective": "task",
    "train.distill_temperature": 4.0,
    "train.match_epochs": None,
    "train.similarity_images": 0,       # introduced with default 1024; runs before it measured no similarity
    "train.preempt_check_every": 10,
})

#: Keys that change how a run is carried out or named, never what it computes, so never part of its identity
#: (another value on a re-run or a resume is the same run): loader processes (every sample is seeded by its index,
#: so any number of workers gives the same batches, tests/test_pipeline.py), how often the trainer logs, how often
#: DDP ranks agree on a preemption signal (a preempted run resumes exactly), and the dataset's display name.
OPERATIONAL_KEYS = ("data.workers", "train.log_every", "train.preempt_check_every", "data.label")

#: Keys a run reads only when another key has one of some values: key -> (that key, those values). Otherwise
#: the key is not part of the identity (``model.init_images`` means nothing under ``model.init: default``), and
#: results write it as '' (:mod:`stitching.results.recipe`). The values are :data:`stitching.stitch.lsinit.
#: INIT_MODES` and :data:`stitching.train.objective.OBJECTIVES` members (tests/test_rundir.py checks).
READ_ONLY_WHEN: typing.Mapping[str, tuple[str, tuple]] = types.MappingProxyType({
    "model.init_images": ("model.init", ("least_squares",)),
    "train.distill_temperature": ("train.objective", ("distill",)),
    "train.match_epochs": ("train.objective", ("match_then_task",)),
})


def config_value(config: dict | None, dotted: str):
    """The value of the dotted key in a resolved config dict (``Config.to_dict()`` or a run directory's
    ``config.yaml``), or its :data:`IDENTITY_BASELINE` value where the file lacks it (written before the key
    existed: the value that run had)."""
    section, _, name = dotted.partition(".")
    values = (config or {}).get(section)
    return values[name] if isinstance(values, dict) and name in values else IDENTITY_BASELINE.get(dotted)


def unread_keys(config: dict) -> set[str]:
    """The dotted keys the run of ``config`` (as :func:`config_value` reads it) never reads:
    :data:`OPERATIONAL_KEYS`, and the :data:`READ_ONLY_WHEN` keys whose condition does not hold."""
    return set(OPERATIONAL_KEYS) | {k for k, (other, when) in READ_ONLY_WHEN.items()
                                    if config_value(config, other) not in when}


#: A run's identity (:func:`stitching.rundir.identity`): its keys off their :data:`IDENTITY_BASELINE`, without
#: the keys it never reads (:func:`unread_keys`). Directory names, "same run" and duplicates all use it.
IDENTITY = IdentityRules(IDENTITY_BASELINE, unread_keys)


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


# ------------------------------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | typing.Mapping | None, overrides: typing.Sequence[str] = (), check: bool = True,
                updates: typing.Mapping[str, typing.Any] | None = None, updates_source: str = CLI,
                run_dir: bool = False) -> Config:
    """Load ``path`` (its ``base:`` chain first; or a mapping of sections, as a file would hold them, whose
    keys are attributed to ``updates_source``), apply ``updates`` (dotted key -> value, e.g. one point
    of a sweep grid, attributed to ``updates_source``), then the ``overrides`` (``section.key=value``
    strings from the command line), and validate. ``run_dir``: ``path`` is a run directory's resolved
    ``config.yaml``, where a key the file lacks (written before the key existed) takes its
    :data:`IDENTITY_BASELINE` value, the value that run had, rather than today's default."""
    tree: dict = {}
    origins: dict = {}
    if isinstance(path, typing.Mapping):         # the sections themselves (Python callers), base: from the cwd
        _merge_data(copy.deepcopy(dict(path)), updates_source, Path.cwd(), tree, origins, seen=())
        path = None
    elif path is not None:
        _merge_file(Path(path), tree, origins, seen=())
    if run_dir:
        for key, value in IDENTITY_BASELINE.items():
            section, _, name = key.partition(".")
            if name not in tree.setdefault(section, {}):
                tree[section][name] = copy.deepcopy(value)
                origins[key] = f"{path} (no {key}: written before it existed; its baseline)"
    _replace_cut_kind(tree, origins, updates or {}, updates_source)
    for key, value in (updates or {}).items():
        section, _, name = key.partition(".")
        if not name or not isinstance(tree.setdefault(section, {}), dict):
            raise ConfigError(key, value, updates_source, "keys are written section.key")
        tree[section][name] = copy.deepcopy(value)
        origins[key] = updates_source
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(item, None, CLI, "overrides are written section.key=value")
        section, name = key.split(".", 1)
        hint = _hints(SECTIONS[section]).get(name) if section in SECTIONS else None
        parsed[key] = raw if hint is None else parse_value(hint, raw, key)   # an unknown key: named by _from_tree
    _replace_cut_kind(tree, origins, parsed, CLI)
    for key, value in parsed.items():
        section, name = key.split(".", 1)
        node = tree.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(section, node, origins.get(section, CLI), "must be a mapping of keys")
        node[name] = value
        origins[key] = CLI
    cfg = _from_tree(tree, origins, str(path) if path is not None else None)
    if check:
        validate(cfg)
    return cfg


def _merge_file(path: Path, tree: dict, origins: dict, seen: tuple) -> None:
    src = str(path)
    if path.resolve() in seen:
        raise ConfigError("base", src, str(seen[-1]), "base files form a cycle")
    if not path.is_file():
        where = str(seen[-1]) if seen else CLI
        raise ConfigError("base" if seen else "--config", src, where, "file not found")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError("", None, src, "a config file must be a mapping of sections")
    _merge_data(data, src, path.parent, tree, origins, seen + (path.resolve(),))


def _merge_data(data: dict, src: str, folder: Path, tree: dict, origins: dict, seen: tuple) -> None:
    """Merge one layer's sections (a file's, or a mapping given in Python) into ``tree``: its ``base:`` first
    (a path relative to ``folder``), then its own keys, attributed to ``src``."""
    data = dict(data)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, (str, os.PathLike)):
            raise ConfigError("base", base, src, "must be a path relative to this file")
        if not (folder / base).is_file():
            raise ConfigError("base", str(folder / base), src, "file not found")
        _merge_file(folder / base, tree, origins, seen)
    if isinstance(data.get("model"), dict):
        _replace_cut_kind(tree, origins, {f"model.{k}": v for k, v in data["model"].items()}, src)
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(section, values, src, "must be a mapping of keys")
        node = tree.setdefault(section, {})
        for key, value in values.items():
            node[key] = copy.deepcopy(value)
            origins[f"{section}.{key}"] = src


def _replace_cut_kind(tree: dict, origins: dict, layer: typing.Mapping[str, typing.Any], source: str) -> None:
    """The cut rule between layers: ``layer`` (dotted key -> value: a file's keys, a grid point, the command
    line's) giving the keys of one cut kind (:data:`CUT_KEYS`) a value (not null) drops the other kind's keys
    that the earlier layers put in ``tree``, so ``model.source_block=3 model.destination_block=5`` on the
    command line replaces a base's stage cut (and stage keys a base's block cut) without nulls by hand. A layer
    giving both kinds is a conflict of its own: the earlier layers' cut keys are dropped too, so that
    :func:`_check_cut_keys` names this layer's keys (and its file) in its one-line error. A dropped key is
    attributed to ``source`` (the layer's file, or the command line): an error about its absence names where
    the replacing cut came from."""
    given = [kind for kind, keys in CUT_KEYS.items() if any(layer.get(k) is not None for k in keys)]
    model = tree.get("model")
    if not given or not isinstance(model, dict):
        return
    for kind, keys in CUT_KEYS.items():
        if kind not in given or len(given) > 1:
            for key in keys:
                if model.pop(key.partition(".")[2], None) is not None:
                    origins[key] = source


_HINTS: dict = {}       # section dataclass -> its field types


# ------------------------------------------------------------------------------------------------- YAML files
#: The most a YAML file the framework reads (a config and its base files, a sweep or matrix file, a run
#: directory's ``config.yaml``) may hold: bytes on disk, and nodes once every alias is expanded. A config is a few
#: hundred nodes; an alias bomb (a 1.7 KB file whose nested aliases expand to 10^8 nodes) is refused before
#: anything walks it (an error message, the run hash, a deep copy written out).
MAX_YAML_BYTES = 256 * 1024
MAX_YAML_NODES = 100_000
_PARSED: dict = {}      # a file's text -> its parsed YAML: a sweep loads the same base files for every grid point


class _TooLarge(Exception):
    pass


def _expanded_nodes(root: yaml.Node, limit: int) -> int:
    """How many nodes the document rooted at ``root`` has with every alias expanded (each distinct node counted
    once per place it appears), computed over the distinct nodes only; :class:`_TooLarge` as soon as the count
    passes ``limit`` or a node contains itself (a recursive alias)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()                       # nodes whose children are being counted: the current path
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if children_done:
            sizes[id(node)] = size = 1 + sum(sizes[id(c)] for c in children)
            open_.discard(id(node))
            if size > limit:
                raise _TooLarge(f"its aliases expand to more than {limit:,} nodes (MAX_YAML_NODES; a config has a "
                                "few hundred): not a file this framework reads")
            continue
        if id(node) in sizes:
            continue
        open_.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_:
                raise _TooLarge("an alias refers to a node that contains it (a recursive alias): its expansion "
                                "has no end")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts each document's nodes with its aliases expanded before constructing it
    (:data:`MAX_YAML_NODES`), and reads numbers as YAML 1.2 does (``2e-3`` is a float; YAML 1.1, PyYAML's
    default, reads it as a string): every file and every command-line mapping or list goes through it."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _expanded_nodes(node, MAX_YAML_NODES)
        return node


_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)"
                                     r"([eE][-+]?[0-9]+)$"), list("-+0123456789."))


def parse_yaml(text: str, src: str):
    """The YAML document ``text`` (from ``src``, for messages) as ``yaml.safe_load`` reads it, within
    :data:`MAX_YAML_NODES`; parsed once per distinct text (a copy each call: callers change it). Invalid YAML,
    too many nodes, a recursive alias or nesting too deep for the parser are a :class:`ConfigError` naming ``src``."""
    if text not in _PARSED:
        try:
            value = yaml.load(text, Loader=_BoundedLoader)
        except _TooLarge as err:
            raise ConfigError("", None, src, str(err)) from None
        except RecursionError:
            raise ConfigError("", None, src, "nested too deeply to be read (not a config)") from None
        except (yaml.YAMLError, ValueError) as err:   # ValueError: e.g. an integer of more than 4300 digits
            raise ConfigError("", None, src, f"not valid YAML: {(str(err).strip().splitlines() or [''])[0]}") \
                from None
        if len(_PARSED) >= 256:
            _PARSED.clear()
        _PARSED[text] = value
    return copy.deepcopy(_PARSED[text])


def read_yaml(path: str | os.PathLike, src: str | None = None):
    """The YAML document in the file ``path`` (:func:`parse_yaml`), read only up to :data:`MAX_YAML_BYTES`; a
    file that cannot be read, is larger, is not UTF-8 text or not YAML within the bounds is a :class:`ConfigError`
    naming it (``src``: how to name it, default the path)."""
    src = str(path) if src is None else src
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError("", None, src, f"cannot be read ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError("", None, src, f"larger than {MAX_YAML_BYTES // 1024} KiB (MAX_YAML_BYTES; a config is a "
                          "few KiB): not a file this framework reads")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("", None, src, f"not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x})") from None
    return parse_yaml(text, src)


def _from_tree(tree: dict, origins: dict, path: str | None) -> Config:
    cfg = Config(path=path, origins=origins)
    for section, values in tree.items():
        if section not in SECTIONS:       # (any YAML key: a number, null, ...)
            src = next((v for k, v in origins.items() if k.startswith(f"{section}.")), path or CLI)
            raise ConfigError(str(section), None, src, f"unknown section; expected one of {', '.join(SECTIONS)}")
        cls = SECTIONS[section]
        hints = _hints(cls)
        obj = getattr(cfg, section)
        for key, value in values.items():
            dotted = f"{section}.{key}"
            src = origins.get(dotted, path or CLI)
            if key not in hints:
                raise ConfigError(dotted, value, src,
                                  f"unknown key; {section} takes {', '.join(f.name for f in dataclasses.fields(cls))}")
            setattr(obj, key, _coerce(hints[key], value, dotted, src))
    return cfg


def _hints(cls) -> dict:
    """A section dataclass's field types (cached)."""
    return _HINTS.get(cls) or _HINTS.setdefault(cls, typing.get_type_hints(cls))


def _coerce(hint, value, key: str, src: str):
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):    # (.nan, .inf: no key of a run means anything with them)
                raise ConfigError(key, value, src, "must be a finite number")
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if t is list and isinstance(value, list):
            return copy.deepcopy(value)
        if t is dict and isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
            if bad:
                raise ConfigError(key, value, src, f"argument names must be identifiers, not {short_repr(bad[0])}")
            return copy.deepcopy(value)
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(key, value, src, f"must be {names}")


# ------------------------------------------------------------------------------------- command-line values
#: How a command-line value (``section.key=value``, ``--slurm key=value``) is written, by the type of the key it
#: sets -- one syntax each, never a YAML document (so ``#`` starts no comment and ``: `` makes no mapping):
#: a string or path: exactly as typed (spaces, ``#``, ``: ``, ``=``, unicode; quote it for the shell only);
#: an integer: ``64``, ``-1``; a number: ``0.002``, ``2e-3``, ``1``; a boolean: ``true`` / ``false``; none (for a
#: key that may be unset): ``null``; a mapping: ``{img_size: 64, patch_size: 8}`` and a list: ``[a, b]``
#: (YAML flow style, where ``2e-3`` is a number too).
VALUE_SYNTAX = types.MappingProxyType({
    str: "a string, as typed", int: "an integer (64)", float: "a number (0.002, 2e-3)", bool: "true or false",
    type(None): "null", dict: "a mapping {key: value, ...}", list: "a list [a, b, ...]",
})
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def parse_value(hint, raw: str, key: str, source: str = CLI):
    """The value of the command-line text ``raw`` for a key of type ``hint`` (a field's annotation, e.g.
    ``str | None``), written as :data:`VALUE_SYNTAX` says; :class:`ConfigError` naming ``key`` otherwise.
    The members of a union are tried in a fixed order: null, boolean, integer, number, mapping/list, string --
    so ``null`` unsets an optional key, ``true`` is the boolean of a ``str | bool`` key, and a string key takes
    anything as typed (``null`` included, for a key that cannot be unset)."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [typing.get_origin(m) or m for m in members]
    if raw == "null" and type(None) in kinds:
        return None
    if bool in kinds and raw in ("true", "false"):
        return raw == "true"
    if int in kinds and _INT.fullmatch(raw):
        return int(raw)
    if float in kinds and _FLOAT.fullmatch(raw):
        return float(raw)       # (nan and inf parse, and are refused as such by the key's check)
    for kind in (dict, list):
        if kind in kinds and raw.lstrip().startswith({dict: "{", list: "["}[kind]):
            try:
                value = yaml.load(raw, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
            except _TooLarge as err:
                raise ConfigError(key, raw, source, str(err)) from None
            except yaml.YAMLError as err:
                raise ConfigError(key, raw, source, f"not a valid {VALUE_SYNTAX[kind]}: "
                                  f"{str(err).splitlines()[0]}") from None
            if isinstance(value, kind):
                return value
    if str in kinds:
        return raw
    raise ConfigError(key, raw, source, "must be " + " or ".join(VALUE_SYNTAX.get(k, k.__name__) for k in kinds))


# ---------------------------------------------------------------------------------------------- checking
def validate(cfg: Config) -> None:
    """Everything that can be known wrong before building: names, ranges and impossible stitches."""
    from stitching.data.transforms import INTERPOLATIONS, NORMALIZATIONS
    from stitching.stitch.plan import ADAPTER_STYLES, PlanError, check_quirks, plan_config
    from stitching.stitch.stitcher import FROZEN_BN_MODES

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
    _one_of(cfg, "model.adapter_style", ADAPTER_STYLES)
    try:
        check_quirks(m.code_quirks, m.adapter_style)        # stitched configs: plan_config checked it
    except PlanError as err:
        raise cfg.error(err.key, str(err)) from None
    _check_random_init(cfg)
    _check_pos_embed(cfg)
    from stitching.stitch.lsinit import check_config as _check_init

    _check_init(cfg, lambda: (model_spec(cfg, "source"), model_spec(cfg, "destination")))
    _one_of(cfg, "data.name", ("synthetic", "imagefolder"))
    from stitching.data.bad_images import BAD_IMAGE_MODES

    _one_of(cfg, "data.bad_images", BAD_IMAGE_MODES)
    _one_of(cfg, "data.normalize", NORMALIZATIONS)
    for key in ("data.train_interpolation", "data.auto_augment_interpolation", "data.eval_interpolation"):
        if getattr(d, key.split(".")[1]) is not None:
            _one_of(cfg, key, INTERPOLATIONS)
    if d.eval_crop_pct is not None and not 0 < d.eval_crop_pct <= 1:
        raise cfg.error("data.eval_crop_pct", "must be in (0, 1] (or null: the model's own)")
    _one_of(cfg, "train.frozen_bn", FROZEN_BN_MODES)
    if t.frozen_bn == "train" and t.fold_bn:
        raise cfg.error("train.frozen_bn", "train mode re-estimates the frozen BatchNorm statistics, which "
                        "folded BatchNorms cannot: set train.fold_bn=false")
    _check_objective(cfg)
    from stitching.train.curves import check as _check_curves

    _check_curves(cfg)
    _one_of(cfg, "train.lr_schedule", ("cosine", "constant"))
    _one_of(cfg, "train.lr_schedule_unit", ("step", "epoch"))
    _one_of(cfg, "train.device", ("auto", "cpu", "cuda"))
    _one_of(cfg, "train.precision", ("auto", "bf16", "fp16", "fp32"))
    if isinstance(t.channels_last, str) and t.channels_last != "auto":
        raise cfg.error("train.channels_last", "must be auto, true or false")
    from stitching.data.pipeline import DECODERS, PIPELINES

    _one_of(cfg, "data.pipeline", PIPELINES)
    _one_of(cfg, "data.decode", DECODERS)
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
    from stitching.train.objective import OBJECTIVES

    t, m = cfg.train, cfg.model
    _one_of(cfg, "train.objective", OBJECTIVES)
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
    import torch

    from stitching.models.formats import is_token
    from stitching.stitch.posembed import POS_EMBED_MODES, learned_pos_embed

    _one_of(cfg, "model.pos_embed", POS_EMBED_MODES)
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
        from stitching.models.trace import list_blocks

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
    """``model.random_init``: which side is built with random weights (:data:`RANDOM_INIT`); a random
    destination needs a stitched config."""
    from stitching.stitch.stitcher import RANDOM_INIT

    _one_of(cfg, "model.random_init", RANDOM_INIT)
    if cfg.is_original and cfg.model.random_init in ("destination", "both"):
        raise cfg.error("model.random_init", "an original (unstitched) model has no destination: use none or "
                        "source")


def model_spec(cfg: Config, role: str):
    """The registry spec of the config's ``source`` or ``destination`` model with its constructor arguments; a
    name no library knows, a model that cannot be cut into four stages or arguments its constructor refuses
    are a :class:`ConfigError` on ``model.<role>`` / ``model.<role>_kwargs``."""
    from stitching.models.derive import ArgumentsError, SplitError
    from stitching.models.registry import available, get_spec

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


def _one_of(cfg: Config, key: str, choices: tuple) -> None:
    section, name = key.split(".")
    if getattr(getattr(cfg, section), name) not in choices:
        raise cfg.error(key, f"must be one of {', '.join(choices)}")


def run_cli(main: typing.Callable[[], int | None]) -> typing.NoReturn:
    """Run a command's ``main``; a :class:`ConfigError` becomes one line on stderr and exit code 2, a Ctrl-C
    that ``main`` does not handle itself one line and ``EXIT_INTERRUPTED`` (no traceback)."""
    try:
        code = main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)
