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
impossible combination (checked against the registry's declared shapes, before anything is built:
:mod:`stitching.validate`, above the subsystems whose choices it checks) or a missing file raises
:class:`ConfigError`, which the command-line tools print as one line and exit with code 2. This module loads
(:func:`read_config`) without validating and imports no subsystem.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stitching.keyspec import Choices, RecipeColumn, declare
# ConfigError and CLI (its source name for the command line) are re-exported: the config's error, raised by every
# config check (stitching.messages owns it)
from stitching.messages import CLI, ConfigError  # noqa: F401
from stitching.rundir import IdentityRules
from stitching.yamlio import coerce, parse_value, read_yaml


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
    adapter_style: str = declare("code", choices=Choices("stitch.plan.ADAPTER_STYLES"),
                                 recipe=RecipeColumn("adapter_style", 16, 11, "adapters: {}"))
                                            # code | text: adapters as the paper's code or its text builds them
    code_quirks: bool = False               # code style: the paper code's padded 1x1 convs, "no downsample" maps
    pos_embed: str = declare("none", choices=Choices("stitch.posembed.POS_EMBED_MODES"),
                             recipe=RecipeColumn("pos_embed", 17, 12, "pos. embed: {}"))
                                            # none | reinject: the destination's position embedding re-added
                                            # to the adapters' output tokens (ViT-like destinations)
    init: str = declare("default", recipe=RecipeColumn("init", 18, 13, "init: {}"))
                                            # default (the paper code's) | pytorch (PyTorch's own) | least_squares:
                                            # adapters fitted to the destination's activations first (stitch/lsinit.py)
    init_images: int = declare(2048, read_when=("model.init", ("least_squares",)),
                               recipe=RecipeColumn("init_images", 19, 14, ("{} init image", "{} init images"), True))
                                            # least_squares: training images (eval transforms) the fit streams
    pretrained: bool = declare(True, recipe=RecipeColumn("pretrained", 2, 27, "pretrained: {}", True))   # false: random init
    source_weights: str | None = None       # local weights file (safetensors / torch state dict)
    destination_weights: str | None = None
    random_init: str = declare("none", choices=Choices("stitch.stitcher.RANDOM_INIT"),
                               recipe=RecipeColumn("random_init", 3, 28, "random init: {}"))
                                            # none | source | destination | both: that side built with random
                                            # weights whatever pretrained / *_weights say (matrix controls)
    source_kwargs: dict | None = declare(None, recipe=RecipeColumn("model_kwargs", 4, resolved=True))
                                            # constructor arguments (timm / torchvision), e.g. {img_size: 64}
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
    name: str = declare("synthetic", choices=Choices("data.datasets.DATASET_NAMES"),
                        recipe=RecipeColumn("dataset", 0, 0, "{}", True))     # synthetic | imagefolder
    root: str | None = None                 # imagefolder: root/train/<class>/..., root/val/<class>/...
    label: str | None = declare(None, operational=True)
                                            # the dataset's name in figures and tables (null: data.name for
                                            # synthetic, the root folder's name for imagefolder); not identity
    img_size: int = declare(224, recipe=RecipeColumn("img_size", 5, 9, "{} px"))
    num_classes: int | None = declare(None, recipe=RecipeColumn("num_classes", 1, 29, ("{} class", "{} classes"), True))
                                            # synthetic: 10; imagefolder: 1000 (checked against the folders)
    train_size: int = 2000                  # synthetic only
    val_size: int = 500                     # synthetic only
    workers: int | None = declare(None, operational=True)   # loader workers per process; null = job's CPUs/process - 1
    pipeline: str = declare("fast", choices=Choices("data.pipeline.PIPELINES"))
                                            # fast (crop box first, reduced-size JPEG decode, uint8 to the device,
                                            # normalised there) | torchvision (PIL, float on the CPU); same distribution
    decode: str = declare("cpu", choices=Choices("data.pipeline.DECODERS"))
                                            # fast pipeline: cpu | gpu (nvJPEG on the training GPU; the CPU where none)
    auto_augment: bool = declare(True, recipe=RecipeColumn("auto_augment", 25, 20, "AutoAugment: {}"))
    min_crop_scale: float = declare(0.08, recipe=RecipeColumn("min_crop_scale", 26, 21, "crop scale >= {}"))
                                            # RandomResizedCrop's smallest area (paper: torchvision's 0.08)
    hflip: float = declare(0.5, recipe=RecipeColumn("hflip", 27, 22, "flip p = {}"))
                                            # RandomHorizontalFlip's probability (paper: 0.5; 0 for digits, text)
    normalize: str = declare("model", choices=Choices("data.transforms.NORMALIZATIONS"),
                             recipe=RecipeColumn("normalize", 24, 19, "mean/std: {}"))
                                            # model (the source's own mean/std) | imagenet (ImageNet's, any model)
    train_interpolation: str | None = declare(None, choices=Choices("data.transforms.INTERPOLATIONS"),
                                              recipe=RecipeColumn("train_interpolation", 28, 23, "train interp.: {}"))
                                            # crop resizing: null = the source model's | nearest | bilinear | bicubic
    auto_augment_interpolation: str | None = declare(None, choices=Choices("data.transforms.INTERPOLATIONS"),
                                                     recipe=RecipeColumn("auto_augment_interpolation", 29, 24,
                                                                   "AA interp.: {}"))
                                            # null = train_interpolation (the paper's code: nearest)
    eval_crop_pct: float | None = declare(None, recipe=RecipeColumn("eval_crop_pct", 30, 25, "eval crop {}"))
                                            # null = the source model's own (0.875 = resize 256, crop 224)
    eval_interpolation: str | None = declare(None, choices=Choices("data.transforms.INTERPOLATIONS"),
                                             recipe=RecipeColumn("eval_interpolation", 31, 26, "eval interp.: {}"))
                                            # null = the source model's own
    seed: int = 0                           # synthetic data seed
    bad_images: str = declare("error", choices=Choices("data.bad_images.BAD_IMAGE_MODES"))
                                            # imagefolder: an unreadable file stops the run naming it (error)
                                            # or is left out of its batch and counted in train.log (skip)


@dataclass
class TrainConfig:
    epochs: int = declare(10, recipe=RecipeColumn("epochs", 6, 1, ("{} epoch", "{} epochs")))
    batch_size: int = declare(512, recipe=RecipeColumn("batch_size", 7, 2, "batch {}"))
                                            # effective batch = per-device x world size x accumulation
    per_device_batch_size: int | None = declare(None, recipe=RecipeColumn("per_device_batch_size", 8, 3, "{}/device", True))
                                            # None: batch_size / world size (no accumulation)
    lr: float = declare(0.002, recipe=RecipeColumn("lr", 9))
    weight_decay: float = declare(0.05, recipe=RecipeColumn("weight_decay", 10, 4, "wd {}"))
    lr_schedule: str = declare("cosine", choices=("cosine", "constant"),
                               recipe=RecipeColumn("lr_schedule", 11, 5, "{}"))   # cosine (to 0) | constant
    lr_schedule_unit: str = declare("step", choices=("step", "epoch"),
                                    recipe=RecipeColumn("lr_schedule_unit", 12, 6, "per {}"))
    label_smoothing: float = declare(0.0, recipe=RecipeColumn("label_smoothing", 13, 7, "label smoothing {}"))
    seed: int = 0
    device: str = declare("auto", choices=("auto", "cpu", "cuda"))
    precision: str = declare("auto", choices=Choices("train.perf.PRECISIONS", first=("auto",)),
                             recipe=RecipeColumn("precision", 15, 10, "{}", True))
                                            # auto (bf16 on CUDA >= 8.0, fp16 below, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: str | bool = "auto"      # auto (on CUDA for conv parts) | true | false
    fold_bn: bool = True                    # fold frozen BatchNorm into convs (stitched runs only)
    compile: bool = False                   # torch.compile the trainable part
    frozen_bn: str = declare("eval", choices=Choices("stitch.stitcher.FROZEN_BN_MODES"),
                             recipe=RecipeColumn("frozen_bn", 20, 15, "frozen BN: {}"))
                                            # eval | train (the paper's code: frozen parts in train mode, BatchNorm
                                            # statistics re-estimated, stochastic depth on; weights stay frozen)
    max_steps_per_epoch: int | None = declare(None, recipe=RecipeColumn("max_steps_per_epoch", 14, 8,
                                                                  ("max {} step/epoch", "max {} steps/epoch")))
                                            # cap for quick runs; None = the whole epoch
    log_every: int = declare(10, operational=True)
    objective: str = declare("task", choices=Choices("train.objective.OBJECTIVES"),
                             recipe=RecipeColumn("objective", 21, 16, "objective: {}"))
                                            # task (cross-entropy) | match (MSE to the destination's activation at
                                            # the join) | distill (KL to the destination's logits) | match_then_task
    distill_temperature: float = declare(4.0, read_when=("train.objective", ("distill",)),
                                         recipe=RecipeColumn("distill_temperature", 22, 17, "T = {}", True))
                                            # distill: softmax temperature T (the loss is scaled by T^2)
    match_epochs: int | None = declare(None, read_when=("train.objective", ("match_then_task",)),
                                       recipe=RecipeColumn("match_epochs", 23, 18, ("{} match epoch", "{} match epochs"),
                                                     True))
                                            # match_then_task: epochs of match before task; null = half the epochs
    similarity_images: int = 1024           # validation images for the similarity at the join written to
                                            # result.csv (before and after training); 0 = not measured
    preempt_check_every: int = declare(10, operational=True)
                                            # under DDP the ranks agree on a SIGTERM/SIGUSR1 every N optimizer
                                            # steps (one host sync; one process looks every step), train/perf.py

    def resolved_match_epochs(self) -> int:
        """The epochs of ``match`` before ``task`` in ``match_then_task`` (``match_epochs``; null: half)."""
        return self.match_epochs if self.match_epochs is not None else max(1, self.epochs // 2)


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


def declared(name: str) -> dict[str, typing.Any]:
    """Dotted key -> its ``name`` metadata (:func:`stitching.keyspec.declare`: ``choices``, ``operational``,
    ``read_when``, ``recipe``), for every key that declares it, in field order: the one source of the tables
    derived from the fields."""
    return {f"{s}.{f.name}": f.metadata[name] for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if name in f.metadata}


#: Keys that change how a run is carried out or named, never what it computes, so never part of its identity
#: (another value on a re-run or a resume is the same run): loader processes (every sample is seeded by its index,
#: so any number of workers gives the same batches, tests/test_pipeline.py), how often the trainer logs, how often
#: DDP ranks agree on a preemption signal (a preempted run resumes exactly), and the dataset's display name.
#: Derived: the keys declared ``operational``.
OPERATIONAL_KEYS = tuple(declared("operational"))

#: Keys a run reads only when another key has one of some values: key -> (that key, those values). Otherwise
#: the key is not part of the identity (``model.init_images`` means nothing under ``model.init: default``), and
#: results write it as '' (:mod:`stitching.results.recipe`). The values are :data:`stitching.stitch.lsinit.
#: INIT_MODES` and :data:`stitching.train.objective.OBJECTIVES` members (tests/test_rundir.py checks).
#: Derived: the keys' ``read_when``.
READ_ONLY_WHEN: typing.Mapping[str, tuple[str, tuple]] = types.MappingProxyType(declared("read_when"))


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


# ------------------------------------------------------------------------------------------------- loading
def read_config(path: str | os.PathLike | typing.Mapping | None, overrides: typing.Sequence[str] = (),
                updates: typing.Mapping[str, typing.Any] | None = None, updates_source: str = CLI,
                run_dir: bool = False) -> Config:
    """Load ``path`` (its ``base:`` chain first; or a mapping of sections, as a file would hold them, whose
    keys are attributed to ``updates_source``), apply ``updates`` (dotted key -> value, e.g. one point
    of a sweep grid, attributed to ``updates_source``), then the ``overrides`` (``section.key=value``
    strings from the command line); not validated (:func:`stitching.validate.load_config` validates).
    ``run_dir``: ``path`` is a run directory's resolved ``config.yaml``, where a key the file lacks (written
    before the key existed) takes its :data:`IDENTITY_BASELINE` value, the value that run had, not today's default."""
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
    return _from_tree(tree, origins, str(path) if path is not None else None)


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
            setattr(obj, key, coerce(hints[key], value, dotted, src))
    return cfg


def _hints(cls) -> dict:
    """A section dataclass's field types (cached)."""
    return _HINTS.get(cls) or _HINTS.setdefault(cls, typing.get_type_hints(cls))
