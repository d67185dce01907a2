"""The kinds of runs and of adapters: each declared once, here, and read everywhere else (torch-free, imports nothing
of the package, so every layer may import it).

Run kinds (``result.csv``'s ``kind`` column): :data:`STITCHED` (prefix -> adapters -> suffix), :data:`FINETUNE`
(the fine-tuning baseline, config ``model.adapter: finetune``) and :data:`ORIGINAL` (an unstitched model), in
legend order in :data:`RUN_KINDS`. They are plain strings, so CSV values, YAML and JSON files, pickled
checkpoints and comparisons stay as they were.

Adapter kinds (config ``model.adapter``): one frozen :class:`AdapterKind` record each, in the registry
:data:`ADAPTER_KINDS` (timm's ``OptimInfo`` records are the model). A record holds the kind's name, its figure
label and colour, its traits (the planner, the adapter builder, the least-squares fit and the plots branch on
these, never on a name) and its *core*: the ``"module:function"`` that builds the trainable module between the
adapter's norms, resolved when an adapter is built (:func:`stitching.stitch.adapters.make_core`). Naming the core
by a string keeps this table torch-free and the declaration in one place: a new kind is one :func:`register`
call (its record) plus its core function, wherever that lives (``docs/architecture.md``).

``finetune`` is a run kind, not an adapter kind: it has no core, no traits and no adapter label; it is the one
extra value ``model.adapter`` accepts (:func:`adapter_choices`), and the planner turns it into the fine-tuning
baseline's plan.

Resize modes (:data:`RESIZES`, config ``model.resize``) are declared here too, torch-free, so that collection and the
figures list them without importing the planner.
"""

from __future__ import annotations

from dataclasses import dataclass

#: run kinds, the values of ``result.csv``'s ``kind`` column
STITCHED = "stitched"
FINETUNE = "finetune"
ORIGINAL = "original"
RUN_KINDS = (STITCHED, FINETUNE, ORIGINAL)

#: resize modes (config ``model.resize``; ``result.csv``'s ``resize``, and the ``|``-joined ``resize_modes``), in
#: this order wherever several are listed: the planner (:mod:`stitching.stitch.plan`) gives them their meaning
RESIZES = ("none", "bilinear", "strided")
TRAINED_KINDS = (STITCHED, FINETUNE)       # the run kinds that train (an original only evaluates)

#: :attr:`AdapterKind.fit`: what least squares fits (``""``: nothing, the kind refuses ``model.init: least_squares``)
FIT_LAYER = "layer"            # the core's first layer (a 1x1 map, or a k x k conv's centre tap), its bias
FIT_SHORTCUT = "shortcut"      # the projection shortcut (1x1 conv + BatchNorm); an identity shortcut: nothing


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind. ``core``: ``"module:function"``, called as ``function(c_in, c_out, stride=, tokens=,
    pad=, init=)`` to build the core (``stride``: the strided-resize factor, 1 unless :attr:`strided`;
    ``tokens``: it works on a token sequence; ``pad``: the 1x1 convolution's padding under
    ``model.code_quirks``; ``init``: ``model.init``'s construction, ``default`` or ``pytorch``)."""

    name: str
    label: str                  # the figures' name ("Bottleneck")
    color: str                  # its colour in every figure (matplotlib)
    core: str                   # "module:function" building the core
    strided: bool = False       # may do a strided resize (model.resize: strided puts the factor into its conv)
    feature_map: bool = False   # needs a feature map: refused between two token formats
    per_token: bool = False     # between two token formats: a map applied to every token
    sequence: bool = False      # works on the destination's class-token sequence (needs a ViT-like destination)
    outer_norms: bool = False   # norm -> core -> norm in the code style too (the text style: every kind)
    activated: bool = False     # an activation after the core (code style: LeakyReLU after the norm; text: ReLU)
    fit: str = ""               # FIT_LAYER | FIT_SHORTCUT | "" (nothing to fit by least squares)
    padded: bool = False        # model.code_quirks: its 1x1 convolution has padding 1


_CORES = "stitching.stitch.adapters"
#: the registry: name -> record, in legend order
ADAPTER_KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    """Add ``kind`` to :data:`ADAPTER_KINDS` (a name already taken, or the run kind ``finetune``: ValueError)."""
    if kind.name in ADAPTER_KINDS or kind.name in RUN_KINDS:
        raise ValueError(f"adapter kind {kind.name!r} is already declared")
    if kind.fit not in ("", FIT_LAYER, FIT_SHORTCUT):
        raise ValueError(f"adapter kind {kind.name!r}: fit must be {FIT_LAYER!r}, {FIT_SHORTCUT!r} or ''")
    ADAPTER_KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Drop a kind :func:`register` added (a test's own kind)."""
    del ADAPTER_KINDS[name]


LINEAR = register(AdapterKind("linear", "Linear", "tab:blue", f"{_CORES}:linear_core", per_token=True,
                              outer_norms=True, fit=FIT_LAYER, padded=True))
LINEAR_RELU = register(AdapterKind("linear_relu", "Linear + ReLU", "tab:purple", f"{_CORES}:linear_core",
                                   per_token=True, outer_norms=True, activated=True, fit=FIT_LAYER, padded=True))
CONV3X3 = register(AdapterKind("conv3x3", "Conv3x3", "tab:green", f"{_CORES}:conv3x3_core", strided=True,
                               feature_map=True, outer_norms=True, activated=True, fit=FIT_LAYER))
BOTTLENECK = register(AdapterKind("bottleneck", "Bottleneck", "tab:orange", f"{_CORES}:bottleneck_core",
                                  strided=True, feature_map=True, fit=FIT_SHORTCUT))
VIT_BLOCK = register(AdapterKind("vit_block", "ViT Block", "tab:red", f"{_CORES}:vit_block_core", sequence=True))


def adapter_kind(name) -> AdapterKind | None:
    """The record of adapter kind ``name`` (None: not an adapter kind, e.g. ``finetune`` or a typo)."""
    return ADAPTER_KINDS.get(name) if isinstance(name, str) else None


def adapter_choices() -> tuple[str, ...]:
    """The values config ``model.adapter`` accepts: every adapter kind, then the fine-tuning baseline."""
    return (*ADAPTER_KINDS, FINETUNE)


def kinds_with(trait: str) -> tuple[str, ...]:
    """The adapter kinds whose ``trait`` is set (e.g. ``kinds_with("strided")``), in legend order."""
    return tuple(name for name, k in ADAPTER_KINDS.items() if getattr(k, trait))
