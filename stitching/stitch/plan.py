"""The shape plan of a stitch: which tensors meet at each join, before any weight is loaded.

:func:`plan_stitch` turns (source cut, destination cut, gap, adapter, resize, schedule) into the list
of adapter steps with their input/output channels and spatial sizes, or raises :class:`PlanError`
naming the offending config key. It works on shapes only, so configs are validated from the registry's
declared cuts (at a nominal 224 px) before anything is built, and the stitcher calls it again with the
shapes traced from the real models at the run's resolution.

Schedules for a gap crossing k = t - s scale changes (k adapters, one when k = 0):
``paper``: channels double from the width the chain starts at, capped at the destination's (halve, floored
at it, when the destination is narrower); the spatial size halves per adapter, floored at the destination's
(a larger destination is reached at once, by the first adapter); the last adapter lands on the
destination's shape. A class-token source entering an image-like chain starts at its *doubled* width (the
class token is concatenated onto every token first), as the paper's code builds it.
``destination``: adapter i lands on the destination's own shape after the first block of stage s + i.

Block cuts (config ``model.source_block`` / ``destination_block``, :func:`plan_blocks`): the source cut is
the output of source block i, the destination cut the output of destination block j (the destination resumes
at block j + 1), indices into the flat block lists of :func:`~stitching.models.trace.list_blocks`. The
chain is planned as for stages: one adapter per stage boundary between the two blocks' stages (at least
one; a receiver in an earlier stage than the sender counts the boundaries back), with the same schedules
(``destination``: the intermediate adapters land on the destination's first blocks of the stages between).
A stage gap s -> t is the block cut (first block of stage s) -> (first block of stage t; for t = s the last
block of stage s), and plans the same chain. The fine-tuning baseline takes stage cuts only.

Working format: a chain between two token formats stays a token sequence (per-token linear maps on every
token, the class token included); any other chain works on feature maps (``image``), and ``vit_block``
works on the destination's prefixed sequence (class token, any number of prefix tokens). Convolutional
adapters between two token formats are refused. Where a
``strided`` step would have to upsample, it is bilinear upsampling then a stride-1 adapter: the same
module as ``bilinear``, recorded as such so that sweeps see the duplicate. Method: ``docs/method.md``.

``quirks`` (config ``model.code_quirks``, the ``code`` style only: :data:`CODE_STYLE`) plans the network the
paper's published code built where it differs from the corrected one above, on chains that work on feature maps:

- the 1x1 convolutions of the padded adapter kinds (:attr:`~stitching.kinds.AdapterKind.padded`) have padding
  1 (:attr:`Step.pad`): each adapter's output is 2 px larger than the size it computes at, its border bias-only
  pixels. The next adapter resizes that map
  (bilinear) to its own size; under a resizing mode the destination gets the last map resized back to its own
  size (:attr:`StitchPlan.end_resize`), under ``none`` the grown map flows on into the destination;
- ``none`` from a token source (a ViT) into an image-like destination: the N grid tokens become an N x N map
  (the token count used as a side, bilinear upsampling after the class token is concatenated), on which every
  adapter and then the destination run.

Then ``none`` differs from the resizing modes even where the sizes match (:attr:`StitchPlan.effective_resize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stitching.kinds import FINETUNE, RESIZES, STITCHED, adapter_choices, adapter_kind, kinds_with
from stitching.messages import short_repr
from stitching.models.formats import channels_after, is_token, prefix_tokens
from stitching.models.spec import ModelSpec

SCHEDULES = ("paper", "destination")
ADAPTER_STYLES = ("code", "text")                  # construction: the paper's code, or its text (adapters.py)
CODE_STYLE = ADAPTER_STYLES[0]                     # the only style model.code_quirks applies to


class PlanError(ValueError):
    """An impossible stitch; ``key``/``value`` name the config entry responsible."""

    def __init__(self, key: str, value, message: str):
        super().__init__(message)
        self.key, self.value = key, value


@dataclass(frozen=True)
class Shape:
    format: str
    channels: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.channels}@{self.height}x{self.width} ({self.format})"


@dataclass(frozen=True)
class Step:
    """One adapter: input -> output channels and sizes, and how it resizes (``stride`` when strided).

    ``size_in`` is the size the adapter receives, ``size_out`` the size it computes at: a stride-1 adapter whose
    two sizes differ resizes its input (bilinear) first. ``pad`` (``model.code_quirks``: 1 for the paper code's
    padded 1x1 convolutions) grows its output by ``2 * pad`` px: :attr:`size_after`."""

    c_in: int
    c_out: int
    size_in: tuple[int, int]
    size_out: tuple[int, int]
    resize: str
    stride: int = 1
    pad: int = 0

    @property
    def size_after(self) -> tuple[int, int]:
        """The size of the adapter's output."""
        return (self.size_out[0] + 2 * self.pad, self.size_out[1] + 2 * self.pad)


@dataclass
class StitchPlan:
    source: str
    destination: str
    source_stage: int
    destination_stage: int
    adapter: str
    resize: str
    schedule: str
    style: str
    source_cut: Shape
    destination_cut: Shape
    working_format: str
    steps: list[Step] = field(default_factory=list)
    kept_blocks: list[int] = field(default_factory=list)  # finetune: destination stages whose first block stays
    source_block: int | None = None         # block cuts (plan_blocks): the block indices; the stages are None
    destination_block: int | None = None
    quirks: bool = False                    # model.code_quirks: the paper code's padding and "no downsample" maps
    end_resize: tuple[int, int] | None = None   # quirks: the last output resized to this size before the destination
    #: the destination stages whose first block's output the intermediate adapters (all but the last) stand for:
    #: adapter n of a chain from stage s lands there (``destination`` schedule) -- the least-squares fit's targets
    link_stages: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return FINETUNE if self.adapter == FINETUNE else STITCHED

    @property
    def num_adapters(self) -> int:
        return len(self.steps)

    @property
    def output_size(self) -> tuple[int, int]:
        """The spatial size the chain hands to the destination."""
        return self.end_resize or self.steps[-1].size_after

    @property
    def quirks_change_none(self) -> bool:
        """Whether, under ``model.code_quirks``, this chain's ``none`` variant is another module than its resizing
        variants even where no size changes: padded 1x1 convolutions (``none`` hands the grown map on), or a
        token source into a feature-map chain (``none`` runs on the N x N map)."""
        return self.quirks and self.working_format == "image" and (
            _has(self.adapter, "padded") or is_token(self.source_cut.format))

    @property
    def effective_resize(self) -> str:
        """The resizing the built module does: ``none`` where no adapter changes the spatial size (the three
        modes build the same module), ``bilinear`` where every resizing step is bilinear (also a strided
        config whose steps must upsample), else the configured mode. With ``model.code_quirks``, a resizing
        mode whose ``none`` variant differs (:attr:`quirks_change_none`) is ``bilinear`` even where no size
        changes, and ``none`` stays ``none`` (the paper code's "no downsample") whatever its quirks resize."""
        modes = {s.resize for s in self.steps if s.size_in != s.size_out}
        if self.end_resize is not None:
            modes.add("bilinear")
        if not modes:
            return "bilinear" if self.resize != "none" and self.quirks_change_none else "none"
        return modes.pop() if len(modes) == 1 else self.resize

    def signature(self) -> tuple:
        """Equal signatures build identical modules (used to drop duplicate runs from sweeps)."""
        return (self.source, self.destination, self.source_stage, self.destination_stage, self.adapter,
                self.style if self.kind == STITCHED else "", self.working_format, tuple(self.steps),
                tuple(self.kept_blocks), self.end_resize) + ((self.source_block, self.destination_block)
                                                             if self.source_block is not None else ())

    @property
    def cut_label(self) -> str:
        """:func:`cut_label` of this plan (result.csv's ``gap``)."""
        return cut_label(self)

    def joins(self) -> list[dict]:
        """Every tensor handed from one part to the next, for summaries and logs. The destination's entry is its
        cut's own shape, with ``receives`` (channels @ grid) where the chain hands it another size."""
        blocks = self.source_block is not None
        out = [{"at": f"{self.source} block {self.source_block} (its output)" if blocks else
                f"{self.source} stage {self.source_stage} (after first block)", **_d(self.source_cut)}]
        for i, s in enumerate(self.steps, 1):
            out.append({"at": f"adapter {i} ({self.adapter}, {s.resize}, stride {s.stride}"
                              + (f", 1x1 padding {s.pad}" if s.pad else "") + ")",
                        "in": f"{s.c_in}@{s.size_in[0]}x{s.size_in[1]}",
                        "out": f"{s.c_out}@{s.size_after[0]}x{s.size_after[1]}"})
            if self.quirks and s.stride == 1 and s.size_in != s.size_out:   # where the quirks hide a resize
                out[-1]["resized_to"] = f"{s.c_in}@{s.size_out[0]}x{s.size_out[1]}"
        if self.end_resize is not None:
            last, (h, w) = self.steps[-1], self.end_resize
            out.append({"at": "resized back to the destination's size (model.code_quirks)",
                        "in": f"{last.c_out}@{last.size_after[0]}x{last.size_after[1]}",
                        "out": f"{last.c_out}@{h}x{w}"})
        for st in self.kept_blocks:
            out.append({"at": f"{self.destination} stage {st} first block (kept, fine-tuned)"})
        where = (f"after block {self.destination_block}" if blocks else
                 f"after first block of stage {self.destination_stage}" if self.destination_stage > self.source_stage
                 else f"end of stage {self.source_stage}")
        out.append({"at": f"{self.destination} ({where})", **_d(self.destination_cut)})
        if self.steps and self.output_size != (self.destination_cut.height, self.destination_cut.width):
            h, w = self.output_size          # resize none, the quirks' grown maps: not the cut's own size (grid)
            out[-1]["receives"] = f"{self.steps[-1].c_out}@{h}x{w}"
        return out


def cut_label(m) -> str:
    """The label of the cut of a plan or a config's ``model`` section: ``s->t`` for stage cuts (``1->3``),
    ``b<i>->b<j>`` for block cuts (``b2->b7``)."""
    if getattr(m, "source_block", None) is not None:
        return f"b{m.source_block}->b{m.destination_block}"
    return f"{m.source_stage}->{m.destination_stage}"


def _d(s: Shape) -> dict:
    return {"format": s.format, "shape": [s.channels, s.height, s.width]}


def nominal_shape(spec: ModelSpec, stage: int, where: str, img_size: int = 224) -> Shape:
    cut = spec.cut(stage, where)
    side = max(1, img_size // cut.stride)
    return Shape(cut.format, cut.channels, side, side)


def destination_target(spec: ModelSpec, s: int, t: int) -> tuple[int, str]:
    """The destination cut a gap s -> t lands on: after stage t's first block, or the end of stage s."""
    return (t, "first") if t > s else (s, "end")


def check_stages(source_stage: int, destination_stage: int) -> None:
    if source_stage not in (1, 2, 3, 4):
        raise PlanError("model.source_stage", source_stage, "must be 1, 2, 3 or 4")
    if destination_stage not in (1, 2, 3, 4):
        raise PlanError("model.destination_stage", destination_stage, "must be 1, 2, 3 or 4")
    if destination_stage < source_stage:
        raise PlanError("model.destination_stage", destination_stage,
                        f"must be >= source_stage ({source_stage}): stitching goes from lower to higher stages")


def plan_stitch(src: ModelSpec, dst: ModelSpec, s: int, t: int, adapter: str, resize: str, schedule: str,
                shapes_src: dict | None = None, shapes_dst: dict | None = None, img_size: int = 224,
                style: str = "code", quirks: bool = False) -> StitchPlan:
    """Plan the stitch. ``shapes_*`` map (stage, 'first'|'end') to (C, H, W) traced from the real models;
    without them the declared cuts at a nominal ``img_size`` are used (config validation, sweeps).
    ``style`` is the adapters' construction (:data:`ADAPTER_STYLES`): it changes modules, not shapes;
    ``quirks`` (``model.code_quirks``) plans the paper code's own shapes (module docstring)."""
    check_stages(s, t)
    _check_choices(adapter, resize, schedule, style, quirks)

    def shape(spec, shapes, stage, where):
        if shapes is None:
            return nominal_shape(spec, stage, where, img_size)
        c, h, w = shapes[(stage, where)]
        return Shape(spec.cut(stage, where).format, c, h, w)

    source_cut = shape(src, shapes_src, s, "first")
    destination_cut = shape(dst, shapes_dst, *destination_target(dst, s, t))
    plan = StitchPlan(src.name, dst.name, s, t, adapter, resize, schedule, style, source_cut, destination_cut,
                      working_format=source_cut.format, quirks=quirks)

    if adapter == FINETUNE:
        return _plan_finetune(plan, src, dst, lambda st, w: shape(dst, shapes_dst, st, w))
    k = max(t - s, 1)
    plan.link_stages = tuple(range(s + 1, s + k))
    inter = [shape(dst, shapes_dst, st, "first") for st in plan.link_stages] if schedule == "destination" else []
    return _plan_chain(plan, src, dst, k, inter, f"{src.name} {s} -> {dst.name} {t}")


def plan_config(m, img_size: int = 224, resize: str | None = None) -> StitchPlan:
    """The plan of a config's ``model`` section (:class:`~stitching.config.ModelConfig`) before anything is
    built: stage cuts from the declared cuts at a nominal ``img_size``, block cuts from the blocks listed at
    ``img_size`` (:func:`~stitching.models.trace.list_blocks`, traced on the meta device). ``resize``
    replaces the config's (e.g. to compare the modes). :class:`PlanError` for an impossible stitch."""
    from stitching.models.registry import get_spec
    from stitching.models.trace import list_blocks

    src_args, dst_args = m.source_args(), m.destination_args()
    dst_name = m.destination or m.source
    src, dst = get_spec(m.source, src_args), get_spec(dst_name, dst_args)
    resize = resize or m.resize
    if getattr(m, "source_block", None) is not None:
        return plan_blocks(src, dst, m.source_block, m.destination_block, m.adapter, resize, m.schedule,
                           list_blocks(m.source, src_args, img_size), list_blocks(dst_name, dst_args, img_size),
                           style=m.adapter_style, quirks=m.code_quirks)
    return plan_stitch(src, dst, m.source_stage, m.destination_stage, m.adapter, resize, m.schedule,
                       img_size=img_size, style=m.adapter_style, quirks=m.code_quirks)


def check_blocks(i, j, n_src: int, n_dst: int, src: str = "the source", dst: str = "the destination") -> None:
    """Block indices in range (``model.source_block`` in 0..n_src-1, ``destination_block`` in 0..n_dst-1)."""
    for key, v, n, name in (("model.source_block", i, n_src, src), ("model.destination_block", j, n_dst, dst)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
            raise PlanError(key, v, f"must be a block index 0..{n - 1} ({name} has {n} blocks)")


def plan_blocks(src: ModelSpec, dst: ModelSpec, i: int, j: int, adapter: str, resize: str, schedule: str,
                blocks_src: list, blocks_dst: list, style: str = "code", quirks: bool = False) -> StitchPlan:
    """Plan a block cut: source block ``i``'s output into the destination after its block ``j``.
    ``blocks_*`` are the models' :func:`~stitching.models.trace.list_blocks` (or
    :func:`~stitching.models.trace.trace_blocks` of the real models) at the run's resolution. The receiver
    may sit at any depth, also before the sender's (every pair of a stitching matrix)."""
    check_blocks(i, j, len(blocks_src), len(blocks_dst), src.name, dst.name)
    _check_choices(adapter, resize, schedule, style, quirks)
    if adapter == FINETUNE:
        raise PlanError("model.adapter", adapter, "the fine-tuning baseline takes stage cuts "
                        "(model.source_stage / destination_stage), not block cuts")
    a, b = blocks_src[i], blocks_dst[j]
    plan = StitchPlan(src.name, dst.name, None, None, adapter, resize, schedule, style, block_shape(a),
                      block_shape(b), working_format=a.format, source_block=i, destination_block=j, quirks=quirks)
    k = max(abs(b.stage - a.stage), 1)
    way = 1 if b.stage >= a.stage else -1
    plan.link_stages = tuple(a.stage + way * n for n in range(1, k))
    firsts = first_block_shapes(blocks_dst)
    inter = [firsts[st] for st in plan.link_stages] if schedule == "destination" else []
    return _plan_chain(plan, src, dst, k, inter, f"{src.name} block {i} -> {dst.name} block {j}")


def block_shape(blk) -> Shape:
    """The output of a block of :func:`~stitching.models.trace.list_blocks` / ``trace_blocks`` as a :class:`Shape`."""
    return Shape(blk.format, blk.channels, blk.height, blk.width)


def first_block_shapes(blocks: list) -> dict[int, Shape]:
    """Stage -> the output of its first block, from a block list (:func:`~stitching.models.trace.list_blocks`)."""
    return {blk.stage: block_shape(blk) for blk in blocks if blk.first}


def _check_choices(adapter: str, resize: str, schedule: str, style: str, quirks: bool = False) -> None:
    if adapter not in adapter_choices():
        raise PlanError("model.adapter", adapter, f"must be one of {', '.join(adapter_choices())}")
    if resize not in RESIZES:
        raise PlanError("model.resize", resize, f"must be one of {', '.join(RESIZES)}")
    if schedule not in SCHEDULES:
        raise PlanError("model.schedule", schedule, f"must be one of {', '.join(SCHEDULES)}")
    if style not in ADAPTER_STYLES:
        raise PlanError("model.adapter_style", style, f"must be one of {', '.join(ADAPTER_STYLES)}")
    check_quirks(quirks, style)


def _has(adapter: str, trait: str) -> bool:
    """Whether adapter kind ``adapter`` has ``trait`` (:class:`~stitching.kinds.AdapterKind`; finetune: none)."""
    record = adapter_kind(adapter)
    return record is not None and bool(getattr(record, trait))


def style_label(style: str, quirks: bool) -> str:
    """The adapter style as ``result.csv`` writes it: ``code+quirks`` for the code style with
    ``model.code_quirks`` (another network: never averaged with ``code``), else the style."""
    return f"{style}+quirks" if quirks else style


def check_quirks(quirks: bool, style: str) -> None:
    """``model.code_quirks`` belongs to the ``code`` style (:data:`CODE_STYLE`): :class:`PlanError` otherwise."""
    if quirks and style != CODE_STYLE:
        raise PlanError("model.code_quirks", quirks, f"the paper code's padding and 'no downsample' maps are part "
                        f"of its construction: they need model.adapter_style={CODE_STYLE}, not {style} (with {style}: "
                        f"model.code_quirks=false)")


def _plan_chain(plan: StitchPlan, src: ModelSpec, dst: ModelSpec, k: int, inter: list[Shape],
                where: str) -> StitchPlan:
    """The adapter chain of ``plan`` (its cuts set): ``k`` adapters; ``inter`` the intermediate shapes of the
    ``destination`` schedule."""
    adapter, resize, schedule = plan.adapter, plan.resize, plan.schedule
    source_cut, destination_cut = plan.source_cut, plan.destination_cut
    if resize == "strided" and not _has(adapter, "strided"):
        raise PlanError("model.resize", resize, f"strided resizing needs a 3x3 conv inside the adapter "
                        f"({' or '.join(kinds_with('strided'))}), not {short_repr(adapter)}")
    if _has(adapter, "sequence"):
        if prefix_tokens(destination_cut.format) == 0:
            raise PlanError("model.adapter", adapter, f"{adapter} works on class-token sequences and needs a "
                            f"ViT-like destination; {dst.name} takes {destination_cut.format!r}")
        plan.working_format = destination_cut.format
    elif is_token(source_cut.format) and is_token(destination_cut.format):
        if _has(adapter, "feature_map"):
            raise PlanError("model.adapter", adapter, f"convolutional adapters need a feature map at one end; "
                            f"{src.name} gives {source_cut.format!r} and {dst.name} takes "
                            f"{destination_cut.format!r}: use {', '.join(kinds_with('per_token'))} or "
                            f"{' or '.join(kinds_with('sequence'))}")
        plan.working_format = destination_cut.format
    else:
        plan.working_format = "image"

    c_first_in = channels_after(source_cut.format, plan.working_format, source_cut.channels)
    if schedule == "paper":
        chans = _channel_schedule(c_first_in, destination_cut.channels, k)
        sizes = [_size_schedule(source_cut.height, destination_cut.height, k),
                 _size_schedule(source_cut.width, destination_cut.width, k)]
        sizes = list(zip(*sizes))
    else:
        chans = [x.channels for x in inter] + [destination_cut.channels]
        sizes = [(x.height, x.width) for x in inter] + [(destination_cut.height, destination_cut.width)]

    quirks = plan.quirks and plan.working_format == "image"
    pad = 1 if quirks and _has(adapter, "padded") else 0
    c_in = c_first_in
    size_in = planned = (source_cut.height, source_cut.width)    # received / the previous adapter's own size
    if quirks and resize == "none" and is_token(source_cut.format):
        n = source_cut.height * source_cut.width
        planned = (n, n)            # the paper code's "no downsample" from tokens: the token count as a side
    for i, (c_out, size_out) in enumerate(zip(chans, sizes)):
        if resize == "none":
            size_out = planned
        stride, how = 1, resize
        if size_out == planned:
            how = "none"            # the three modes build the same adapter: record it as "none"
        elif resize == "strided" and _upsamples(planned, size_out):
            how = "bilinear"        # "integrated" upsampling: bilinear then stride 1, the bilinear module
        elif resize == "strided":
            stride = _integer_stride(planned, size_out, where, i + 1)
        if size_in != planned and resize != "none":
            how = "bilinear"        # quirks: the grown map resized to this adapter's size (the code's input size)
        plan.steps.append(Step(c_in, c_out, size_in, size_out, how, stride, pad))
        c_in, planned = c_out, size_out
        size_in = plan.steps[-1].size_after
    if pad and resize != "none":
        plan.end_resize = planned   # the code resizes to the destination's input size (under none: not)
    return plan


def _plan_finetune(plan: StitchPlan, src: ModelSpec, dst: ModelSpec, dst_shape) -> StitchPlan:
    if src.name != dst.name:
        raise PlanError("model.adapter", FINETUNE, f"the fine-tuning baseline keeps the destination's own "
                        f"blocks and only joins a model to itself, not {src.name} to {dst.name}")
    s, t = plan.source_stage, plan.destination_stage
    prev, prev_at = plan.source_cut, f"stage {s}'s first block"
    for st in range(s, t + 1):
        expected = dst_shape(st, "end")   # what stage st + 1's first block (or the head) takes
        if st < t or t == s:
            if prev.channels != expected.channels:
                nxt = f"stage {st + 1}'s first block" if st < 4 else "the head"
                raise PlanError("model.adapter", FINETUNE,
                                f"{dst.name}: {prev_at} gives {prev.channels} channels but {nxt} expects "
                                f"{expected.channels} (the blocks dropped in gap {s}->{t} change the width); "
                                f"use an adapter instead")
        if st < t:
            plan.kept_blocks.append(st + 1)
            prev, prev_at = dst_shape(st + 1, "first"), f"stage {st + 1}'s first block"
    plan.working_format = plan.source_cut.format
    return plan


def _channel_schedule(c_src: int, c_dst: int, k: int) -> list[int]:
    out, c = [], c_src
    for _ in range(k):
        c = min(2 * c, c_dst) if c_dst >= c_src else max(c // 2, c_dst)
        out.append(c)
    out[-1] = c_dst
    return out


def _size_schedule(h_src: int, h_dst: int, k: int) -> list[int]:
    out, h = [], h_src
    for _ in range(k):
        h = max(-(-h // 2), h_dst)      # halve, floored at the destination (a larger one at once)
        out.append(h)
    out[-1] = h_dst
    return out


def _upsamples(size_in: tuple[int, int], size_out: tuple[int, int]) -> bool:
    return any(o > n for n, o in zip(size_in, size_out))


def _integer_stride(size_in, size_out, where, i) -> int:
    r = size_in[0] // size_out[0]
    ok = all(o <= n for n, o in zip(size_in, size_out)) and r >= 1 and all(
        -(-n // r) == o for n, o in zip(size_in, size_out))
    if not ok:
        raise PlanError("model.resize", "strided",
                        f"adapter {i} of {where} maps {size_in[0]}x{size_in[1]} to "
                        f"{size_out[0]}x{size_out[1]}, which no strided convolution does (not an integer "
                        f"factor); use resize=bilinear")
    return r
