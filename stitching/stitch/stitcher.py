"""The stitched network and its assembly from the registry.

:class:`StitchedModel` is ``prefix -> adapters -> suffix``, each a visible ``nn.Sequential``:

- ``prefix``: the source's stem and blocks up to and including the first block of the source stage (block
  cuts, ``model.source_block: i``: up to and including block i);
- ``adapters``: format conversion into the adapters' working format, the chained adapters (with
  ``model.code_quirks`` under a resizing mode, a resize of the last padded map back to the destination's size),
  conversion into the destination's format, with ``model.pos_embed: reinject`` the destination's position embedding
  (:mod:`stitching.stitch.posembed`) (for the fine-tuning baseline: the destination's kept first blocks);
- ``suffix``: the destination's remaining blocks and head (block cuts, ``model.destination_block: j``: its
  blocks j + 1.. and head).

For stitched models the prefix and suffix are frozen: ``requires_grad=False``, kept in eval mode when
``.train()`` is called on the whole (no BatchNorm statistic updates, no dropout or stochastic depth), and
the prefix runs under ``torch.no_grad()`` (no autograd graph, no stored activations). The paper's code
instead ran its frozen parts in train mode; ``frozen_bn="train"`` (config ``train.frozen_bn``) reproduces
that on request: the frozen parts follow ``.train()``/``.eval()`` (BatchNorm statistics re-estimated on
stitched features, stochastic depth on) while their weights stay frozen. The fine-tuning baseline trains
every weight in train mode.

:func:`build_model` is the single entry point from a config's ``model`` section: it loads each network
once (source and destination share one instance when they are the same weights), traces the real shapes
at the cut points, plans the stitch (:mod:`stitching.stitch.plan`) and assembles the parts -- two steps that
are public too: :func:`load_networks` (the two networks loaded, split and traced once) and :func:`assemble`
(one stitch on them; a stitching matrix assembles all its cells on one :class:`Networks`). ``model.random_init``
(:data:`RANDOM_INIT`) builds the named side(s) with random weights, whatever ``pretrained`` and the weights
files say: the controls of a stitching matrix. With ``both`` on a model stitched to itself the two sides stay
one (random) network, as the real cells are one network.

The stitched model receives images preprocessed for the *source* (``data.normalize: model``: its mean/std).
``BuiltModel.target`` -- the destination's own network up to the join, whose activation the least-squares fit,
the similarity at the join and the matching / distillation objectives compare with -- first maps them to the
destination's own normalisation (:class:`Renormalize`; the identity where the two agree or with ``data.normalize:
imagenet``), so that it computes the activation the destination computes on its own input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stitching.kinds import FINETUNE, ORIGINAL, STITCHED
from stitching.messages import short_repr
from stitching.models.formats import Convert, prefix_tokens
from stitching.models.registry import get_spec
from stitching.models.spec import Parts
from stitching.models.trace import trace_blocks, trace_cuts
from stitching.models.weights import WeightsError, load_model
from stitching.stitch.adapters import Adapter, Resize
from stitching.stitch.plan import Shape, StitchPlan, destination_target, plan_blocks, plan_stitch
from stitching.stitch.posembed import PosReinject, learned_pos_embed

FROZEN_BN_MODES = ("eval", "train")   # frozen parts in eval mode (default) or, as the paper's code, train mode
#: config ``model.random_init``: the side(s) built with random weights whatever ``pretrained`` and the weights
#: files say (the random-init controls of a stitching matrix; the random weights follow ``train.seed``)
RANDOM_INIT = ("none", "source", "destination", "both")


class StitchedModel(nn.Module):
    def __init__(self, prefix: nn.Sequential, adapters: nn.Sequential, suffix: nn.Sequential,
                 frozen: bool = True, plan: StitchPlan | None = None, frozen_bn: str = "eval"):
        super().__init__()
        if frozen_bn not in FROZEN_BN_MODES:
            raise ValueError(f"frozen_bn must be one of {', '.join(FROZEN_BN_MODES)}, not {short_repr(frozen_bn)}")
        self.prefix, self.adapters, self.suffix = prefix, adapters, suffix
        self.frozen = frozen
        self.frozen_bn = frozen_bn
        self.plan = plan
        if frozen:
            self.prefix.requires_grad_(False)
            self.suffix.requires_grad_(False)
            self.prefix.eval()
            self.suffix.eval()

    def frozen_parts(self) -> list[nn.Module]:
        return [self.prefix, self.suffix] if self.frozen else []

    def train(self, mode: bool = True) -> "StitchedModel":
        super().train(mode)
        if self.frozen_bn == "eval":
            for part in self.frozen_parts():
                part.eval()
        return self

    def forward(self, x: torch.Tensor, join: bool = False):
        """The logits; with ``join`` (a stitched model), ``(logits, the adapters' output)`` where the logits come
        from the detached output without autograd (for a loss on the join alone: ``train.objective: match``)."""
        if self.frozen:
            with torch.no_grad():
                x = self.prefix(x)
        else:
            x = self.prefix(x)
        if join:
            joined = self.adapters(x)
            with torch.no_grad():
                return self.suffix(joined.detach()), joined
        return self.suffix(self.adapters(x))


def _load(key: str, *args) -> nn.Module:
    """:func:`load_model`; a :class:`WeightsError` learns the config ``key`` that named the file."""
    try:
        return load_model(*args)
    except WeightsError as err:
        err.key = key
        raise


class Renormalize(nn.Module):
    """Per-channel ``x * scale + shift``: an image normalised with one mean/std re-normalised with another
    (``(x * std_in + mean_in - mean_out) / std_out``); the constants follow the input's device and dtype."""

    def __init__(self, mean_in, std_in, mean_out, std_out):
        super().__init__()
        m_in, s_in, m_out, s_out = (torch.tensor(v, dtype=torch.float64) for v in (mean_in, std_in, mean_out, std_out))
        self.register_buffer("scale", (s_in / s_out).float().view(1, -1, 1, 1))
        self.register_buffer("shift", ((m_in - m_out) / s_out).float().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x) + self.shift.to(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale.flatten().tolist()}, shift={self.shift.flatten().tolist()}"


def destination_input(source_config: dict, destination_config: dict, normalize: str = "model") -> nn.Module:
    """The map from the stitched model's input (preprocessed with the source's mean/std: ``data.normalize:
    model``) to the destination's own (its data config's): :class:`Renormalize`, or ``nn.Identity`` where they
    agree or every model takes ImageNet's (``data.normalize: imagenet``)."""
    stats = lambda c: tuple(tuple(float(v) for v in c[k]) for k in ("mean", "std"))  # noqa: E731
    if normalize != "model" or stats(source_config) == stats(destination_config):
        return nn.Identity()
    return Renormalize(*stats(source_config), *stats(destination_config))


@dataclass
class BuiltModel:
    """What :func:`build_model` returns: the module, its kind, the source's eval preprocessing, the plan."""

    model: nn.Module
    kind: str               # original | stitched | finetune
    data_config: dict       # the source model's own preprocessing (timm data config)
    plan: StitchPlan | None
    target: nn.Module | None = None   # stitched: the destination's own network up to the receiving point
                                      # (destination_input, its stem and blocks before the suffix; modules
                                      # shared, not copied)
    destination_parts: object = None  # stitched: the destination split (registry.Parts; modules shared)
    destination_cuts: dict | None = None  # stitched: (stage, "first"|"end") -> its traced Shape (plan.Shape)
    source_parts: object = None       # stitched / finetune: the source split (registry.Parts; modules shared)
    destination_input: nn.Module | None = None  # stitched: the model's input -> the destination's own
                                                # (:func:`destination_input`), the first module of ``target``


@dataclass
class Networks:
    """The two networks of a config's ``model`` section, loaded once (:func:`load_networks`), from which any
    number of stitches between their cuts are assembled (:func:`assemble`; a stitching matrix's cells share
    them). ``same``: the destination is the source network itself (one instance, one split); ``blocks_*``:
    the traced block lists (:func:`~stitching.models.trace.trace_blocks`), traced on first use."""

    source: nn.Module
    destination: nn.Module | None
    source_spec: object
    destination_spec: object
    source_parts: object
    destination_parts: object
    source_shapes: dict
    destination_shapes: dict
    data_config: dict
    same: bool
    img_size: int
    blocks_source: list | None = None
    blocks_destination: list | None = None
    destination_data_config: dict | None = None     # the destination's own preprocessing (timm data config)

    def blocks(self) -> tuple[list, list]:
        """(source, destination) traced block lists (block cuts)."""
        if self.blocks_source is None:
            self.blocks_source = trace_blocks(self.source_spec, self.source_parts, self.img_size, self.source)
            self.blocks_destination = self.blocks_source if self.same else trace_blocks(
                self.destination_spec, self.destination_parts, self.img_size, self.destination)
        return self.blocks_source, self.blocks_destination


def build_model(mcfg, img_size: int = 224, num_classes: int = 1000, frozen_bn: str = "eval",
                normalize: str = "model") -> BuiltModel:
    """Build the network a config's ``model`` section describes (see :mod:`stitching.config`);
    ``frozen_bn`` is the config's ``train.frozen_bn`` (:data:`FROZEN_BN_MODES`), ``normalize`` its
    ``data.normalize`` (the target's :func:`destination_input`)."""
    nets = load_networks(mcfg, img_size, num_classes)
    if nets.destination is None:
        return BuiltModel(nets.source, ORIGINAL, nets.data_config, None)
    return assemble(nets, mcfg, frozen_bn, normalize)


def load_networks(mcfg, img_size: int = 224, num_classes: int = 1000) -> Networks:
    """The source and (for a stitched config) the destination network of ``mcfg``, with
    ``model.random_init``, split and traced at ``img_size``: what every stitch between their cuts shares.
    An original config (no cut) loads the source only (``destination`` None)."""
    src_args, dst_args = mcfg.source_args(), mcfg.destination_args()
    src_spec = get_spec(mcfg.source, src_args)
    random = getattr(mcfg, "random_init", "none")
    src_random, dst_random = random in ("source", "both"), random in ("destination", "both")
    dst_name = mcfg.destination or mcfg.source
    own = dst_name == mcfg.source and dst_args == src_args      # the destination is the source network
    src_weights = None if src_random else mcfg.source_weights
    dst_weights = None if dst_random else mcfg.destination_weights or (mcfg.source_weights if own else None)
    src_model = _load("model.source_weights", mcfg.source, mcfg.pretrained and not src_random, src_weights,
                      num_classes, src_args)
    data_config = src_spec.data_config(src_model)
    if mcfg.source_stage is None and getattr(mcfg, "source_block", None) is None:
        return Networks(src_model, None, src_spec, None, None, None, {}, {}, data_config, False, img_size)

    same = own and src_random == dst_random and (dst_random or mcfg.destination_weights in (None,
                                                                                      mcfg.source_weights))
    dst_spec = get_spec(dst_name, dst_args)
    dst_model = src_model if same else _load("model.destination_weights", dst_name,
                                             mcfg.pretrained and not dst_random, dst_weights, num_classes, dst_args)
    src_parts = src_spec.split(src_model)
    dst_parts = src_parts if same else dst_spec.split(dst_model)
    src_shapes = trace_cuts(src_spec, src_parts, img_size)
    dst_shapes = src_shapes if same else trace_cuts(dst_spec, dst_parts, img_size)
    return Networks(src_model, dst_model, src_spec, dst_spec, src_parts, dst_parts, src_shapes, dst_shapes,
                    data_config, same, img_size,
                    destination_data_config=data_config if same else dst_spec.data_config(dst_model))


def assemble(nets: Networks, mcfg, frozen_bn: str = "eval", normalize: str = "model") -> BuiltModel:
    """The stitched model of ``mcfg``'s cut, adapter, resize, schedule, style and position embedding on the
    loaded ``nets`` (their modules shared, not copied; only the adapters are new, drawn from the global
    random generator as :func:`build_model` draws them); ``normalize``: the config's ``data.normalize``."""
    src_parts, dst_parts = nets.source_parts, nets.destination_parts
    traced = nets.blocks() if getattr(mcfg, "source_block", None) is not None else None   # block cuts
    cut = layout(mcfg, nets.source_spec, nets.destination_spec, src_parts, dst_parts, nets.source_shapes,
                 nets.destination_shapes, traced)
    plan = cut.plan
    src_blocks, dst_blocks = src_parts.blocks(), dst_parts.blocks()
    prefix = nn.Sequential(src_parts.stem, *src_blocks[: cut.prefix_end])
    suffix = nn.Sequential(*dst_blocks[cut.suffix_start:], dst_parts.head)
    into = destination_input(nets.data_config, nets.destination_data_config, normalize)
    target = nn.Sequential(into, dst_parts.stem, *dst_blocks[: cut.suffix_start])

    if plan.kind == FINETUNE:
        middle = nn.Sequential(*[dst_blocks[i] for i in cut.kept])
        model = StitchedModel(prefix, middle, suffix, frozen=False, plan=plan)
        return BuiltModel(model, FINETUNE, nets.data_config, plan, source_parts=nets.source_parts)

    model = StitchedModel(prefix, nn.Sequential(*adapter_layers(mcfg, plan, nets.destination)), suffix,
                          frozen=True, plan=plan, frozen_bn=frozen_bn)
    cuts = {k: Shape(nets.destination_spec.cut(*k).format, *v) for k, v in nets.destination_shapes.items()}
    return BuiltModel(model, STITCHED, nets.data_config, plan, target, dst_parts, cuts, nets.source_parts, into)


@dataclass(frozen=True)
class Layout:
    """Where a stitched (or fine-tuned) model cuts its two networks' flat block lists (``Parts.blocks()``):
    the prefix is the source's stem and ``blocks[:prefix_end]``, the suffix the destination's
    ``blocks[suffix_start:]`` and head, the destination's own network up to the join (``BuiltModel.target``)
    its stem and ``blocks[:suffix_start]``; a fine-tuned model keeps the destination blocks ``kept`` between
    them (the first blocks of the stages its gap crosses)."""

    plan: StitchPlan
    prefix_end: int
    suffix_start: int
    kept: tuple[int, ...] = ()


def layout(mcfg, src_spec, dst_spec, src_parts: Parts, dst_parts: Parts, src_shapes: dict, dst_shapes: dict,
           traced: tuple | None = None) -> Layout:
    """The plan and the cuts of a config's ``model`` section (stage or block cuts) on the split networks:
    ``*_shapes`` are :func:`~stitching.models.trace.trace_cuts`' traced cut shapes, ``traced`` the
    :func:`~stitching.models.trace.trace_blocks` lists of both networks (needed for block cuts only).
    :func:`assemble` builds the modules from it; :mod:`stitching.stitch.cost` counts them."""
    if getattr(mcfg, "source_block", None) is not None:     # block cuts: after block i, into after block j
        i, j = mcfg.source_block, mcfg.destination_block
        plan = plan_blocks(src_spec, dst_spec, i, j, mcfg.adapter, mcfg.resize, mcfg.schedule, traced[0],
                           traced[1], style=mcfg.adapter_style, quirks=mcfg.code_quirks)
        return Layout(plan, i + 1, j + 1)
    s, t = mcfg.source_stage, mcfg.destination_stage
    plan = plan_stitch(src_spec, dst_spec, s, t, mcfg.adapter, mcfg.resize, mcfg.schedule, src_shapes, dst_shapes,
                       style=mcfg.adapter_style, quirks=mcfg.code_quirks)
    stage, where = destination_target(dst_spec, s, t)
    start = dst_parts.index_after_first(stage) if where == "first" else dst_parts.index_end(stage)
    kept = tuple(dst_parts.index_after_first(st) - 1 for st in plan.kept_blocks)
    return Layout(plan, src_parts.index_after_first(s), start, kept)


def adapter_layers(mcfg, plan: StitchPlan, dst_model: nn.Module) -> list[nn.Module]:
    """The modules between prefix and suffix of a stitched model: conversion into the chain's working format,
    the planned adapters, conversion into the destination's format and, with ``model.pos_embed: reinject``,
    the destination's position embedding (read from ``dst_model``)."""
    grid = (plan.source_cut.height, plan.source_cut.width)
    layers = [Convert(plan.source_cut.format, plan.working_format, grid)]
    layers += [Adapter(mcfg.adapter, step, plan.working_format, plan.style, mcfg.init) for step in plan.steps]
    if plan.end_resize is not None:     # model.code_quirks: the padded map back to the destination's size
        layers.append(Resize(plan.steps[-1].size_after, plan.end_resize))
    layers.append(Convert(plan.working_format, plan.destination_cut.format, plan.output_size))
    if getattr(mcfg, "pos_embed", "none") == "reinject":
        found = learned_pos_embed(dst_model)
        if found is None:    # the config check refuses this first (model.pos_embed)
            raise ValueError(f"model.pos_embed=reinject: {plan.destination} has no learned position embedding")
        layers.append(PosReinject(*found, prefix_tokens(plan.destination_cut.format), plan.output_size))
    return layers
