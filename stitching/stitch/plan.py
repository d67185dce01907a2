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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stitching.messages import short_repr
from stitching.models.formats import channels_after, is_token, prefix_tokens
from stitching.models.spec import ModelSpec

ADAPTERS = ("linear", "linear_relu", "conv3x3", "bottleneck", "vit_block", "finetune")
RESIZES = ("none", "bilinear", "strided")
SCHEDULES = ("paper", "destination")
STRIDED_ADAPTERS = ("conv3x3", "bottleneck")
CONV_ADAPTERS = ("conv3x3", "bottleneck")          # need a feature map: refused between two token formats
TOKEN_ADAPTERS = ("linear", "linear_relu")         # per-token linear maps when both ends are token formats
ADAPTER_STYLES = ("code", "text")                  # construction: the paper's code, or its text (adapters.py)


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
    """One adapter: input -> output channels and sizes, and how it resizes (``stride`` when strided)."""

    c_in: int
    c_out: int
    size_in: tuple[int, int]
    size_out: tuple[int, int]
    resize: str
    stride: int = 1


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

    @property
    def kind(self) -> str:
        return "finetune" if self.adapter == "finetune" else "stitched"

    @property
    def num_adapters(self) -> int:
        return len(self.steps)

    @property
    def effective_resize(self) -> str:
        """The resizing the built module does: ``none`` where no adapter changes the spatial size (the three
        modes build the same module), ``bilinear`` where every resizing step is bilinear (also a strided
        config whose steps must upsample), else the configured mode."""
        modes = {s.resize for s in self.steps if s.size_in != s.size_out}
        if not modes:
            return "none"
        return modes.pop() if len(modes) == 1 else self.resize

    def signature(self) -> tuple:
        """Equal signatures build identical modules (used to drop duplicate runs from sweeps)."""
        return (self.source, self.destination, self.source_stage, self.destination_stage, self.adapter,
                self.style if self.kind == "stitched" else "", self.working_format, tuple(self.steps),
                tuple(self.kept_blocks)) + ((self.source_block, self.destination_block)
                                            if self.source_block is not None else ())

    @property
    def cut_label(self) -> str:
        """:func:`cut_label` of this plan (result.csv's ``gap``)."""
        return cut_label(self)

    def joins(self) -> list[dict]:
        """Every tensor handed from one part to the next, for summaries and logs."""
        blocks = self.source_block is not None
        out = [{"at": f"{self.source} block {self.source_block} (its output)" if blocks else
                f"{self.source} stage {self.source_stage} (after first block)", **_d(self.source_cut)}]
        for i, s in enumerate(self.steps, 1):
            out.append({"at": f"adapter {i} ({self.adapter}, {s.resize}, stride {s.stride})",
                        "in": f"{s.c_in}@{s.size_in[0]}x{s.size_in[1]}",
                        "out": f"{s.c_out}@{s.size_out[0]}x{s.size_out[1]}"})
        for st in self.kept_blocks:
            out.append({"at": f"{self.destination} stage {st} first block (kept, fine-tuned)"})
        where = (f"after block {self.destination_block}" if blocks else
                 f"after first block of stage {self.destination_stage}" if self.destination_stage > self.source_stage
                 else f"end of stage {self.source_stage}")
        out.append({"at": f"{self.destination} ({where})", **_d(self.destination_cut)})
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
                style: str = "code") -> StitchPlan:
    """Plan the stitch. ``shapes_*`` map (stage, 'first'|'end') to (C, H, W) traced from the real models;
    without them the declared cuts at a nominal ``img_size`` are used (config validation, sweeps).
    ``style`` is the adapters' construction (:data:`ADAPTER_STYLES`): it changes modules, not shapes."""
    check_stages(s, t)
    _check_choices(adapter, resize, schedule, style)

    def shape(spec, shapes, stage, where):
        if shapes is None:
            return nominal_shape(spec, stage, where, img_size)
        c, h, w = shapes[(stage, where)]
        return Shape(spec.cut(stage, where).format, c, h, w)

    source_cut = shape(src, shapes_src, s, "first")
    destination_cut = shape(dst, shapes_dst, *destination_target(dst, s, t))
    plan = StitchPlan(src.name, dst.name, s, t, adapter, resize, schedule, style, source_cut, destination_cut,
                      working_format=source_cut.format)

    if adapter == "finetune":
        return _plan_finetune(plan, src, dst, lambda st, w: shape(dst, shapes_dst, st, w))
    k = max(t - s, 1)
    inter = [shape(dst, shapes_dst, st, "first") for st in range(s + 1, s + k)] if schedule == "destination" else []
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
                           style=m.adapter_style)
    return plan_stitch(src, dst, m.source_stage, m.destination_stage, m.adapter, resize, m.schedule,
                       img_size=img_size, style=m.adapter_style)


def check_blocks(i, j, n_src: int, n_dst: int, src: str = "the source", dst: str = "the destination") -> None:
    """Block indices in range (``model.source_block`` in 0..n_src-1, ``destination_block`` in 0..n_dst-1)."""
    for key, v, n, name in (("model.source_block", i, n_src, src), ("model.destination_block", j, n_dst, dst)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
            raise PlanError(key, v, f"must be a block index 0..{n - 1} ({name} has {n} blocks)")


def plan_blocks(src: ModelSpec, dst: ModelSpec, i: int, j: int, adapter: str, resize: str, schedule: str,
                blocks_src: list, blocks_dst: list, style: str = "code") -> StitchPlan:
    """Plan a block cut: source block ``i``'s output into the destination after its block ``j``.
    ``blocks_*`` are the models' :func:`~stitching.models.trace.list_blocks` (or
    :func:`~stitching.models.trace.trace_blocks` of the real models) at the run's resolution. The receiver
    may sit at any depth, also before the sender's (every pair of a stitching matrix)."""
    check_blocks(i, j, len(blocks_src), len(blocks_dst), src.name, dst.name)
    _check_choices(adapter, resize, schedule, style)
    if adapter == "finetune":
        raise PlanError("model.adapter", adapter, "the fine-tuning baseline takes stage cuts "
                        "(model.source_stage / destination_stage), not block cuts")
    a, b = blocks_src[i], blocks_dst[j]
    shape = lambda blk: Shape(blk.format, blk.channels, blk.height, blk.width)  # noqa: E731
    plan = StitchPlan(src.name, dst.name, None, None, adapter, resize, schedule, style, shape(a), shape(b),
                      working_format=a.format, source_block=i, destination_block=j)
    k = max(abs(b.stage - a.stage), 1)
    way = 1 if b.stage >= a.stage else -1
    inter = []
    if schedule == "destination":
        firsts = {blk.stage: blk for blk in blocks_dst if blk.first}
        inter = [shape(firsts[a.stage + way * n]) for n in range(1, k)]
    return _plan_chain(plan, src, dst, k, inter, f"{src.name} block {i} -> {dst.name} block {j}")


def _check_choices(adapter: str, resize: str, schedule: str, style: str) -> None:
    if adapter not in ADAPTERS:
        raise PlanError("model.adapter", adapter, f"must be one of {', '.join(ADAPTERS)}")
    if resize not in RESIZES:
        raise PlanError("model.resize", resize, f"must be one of {', '.join(RESIZES)}")
    if schedule not in SCHEDULES:
        raise PlanError("model.schedule", schedule, f"must be one of {', '.join(SCHEDULES)}")
    if style not in ADAPTER_STYLES:
        raise PlanError("model.adapter_style", style, f"must be one of {', '.join(ADAPTER_STYLES)}")


def _plan_chain(plan: StitchPlan, src: ModelSpec, dst: ModelSpec, k: int, inter: list[Shape],
                where: str) -> StitchPlan:
    """The adapter chain of ``plan`` (its cuts set): ``k`` adapters; ``inter`` the intermediate shapes of the
    ``destination`` schedule."""
    adapter, resize, schedule = plan.adapter, plan.resize, plan.schedule
    source_cut, destination_cut = plan.source_cut, plan.destination_cut
    if resize == "strided" and adapter not in STRIDED_ADAPTERS:
        raise PlanError("model.resize", resize, f"strided resizing needs a 3x3 conv inside the adapter "
                        f"({' or '.join(STRIDED_ADAPTERS)}), not {short_repr(adapter)}")
    if adapter == "vit_block":
        if prefix_tokens(destination_cut.format) == 0:
            raise PlanError("model.adapter", adapter, f"vit_block works on class-token sequences and needs a "
                            f"ViT-like destination; {dst.name} takes {destination_cut.format!r}")
        plan.working_format = destination_cut.format
    elif is_token(source_cut.format) and is_token(destination_cut.format):
        if adapter in CONV_ADAPTERS:
            raise PlanError("model.adapter", adapter, f"convolutional adapters need a feature map at one end; "
                            f"{src.name} gives {source_cut.format!r} and {dst.name} takes "
                            f"{destination_cut.format!r}: use {', '.join(TOKEN_ADAPTERS)} or vit_block")
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

    c_in, size_in = c_first_in, (source_cut.height, source_cut.width)
    for i, (c_out, size_out) in enumerate(zip(chans, sizes)):
        if resize == "none":
            size_out = size_in
        stride, how = 1, resize
        if size_out == size_in:
            how = "none"            # the three modes build the same adapter: record it as "none"
        elif resize == "strided" and _upsamples(size_in, size_out):
            how = "bilinear"        # "integrated" upsampling: bilinear then stride 1, the bilinear module
        elif resize == "strided":
            stride = _integer_stride(size_in, size_out, where, i + 1)
        plan.steps.append(Step(c_in, c_out, size_in, size_out, how, stride))
        c_in, size_in = c_out, size_out
    return plan


def _plan_finetune(plan: StitchPlan, src: ModelSpec, dst: ModelSpec, dst_shape) -> StitchPlan:
    if src.name != dst.name:
        raise PlanError("model.adapter", "finetune", f"the fine-tuning baseline keeps the destination's own "
                        f"blocks and only joins a model to itself, not {src.name} to {dst.name}")
    s, t = plan.source_stage, plan.destination_stage
    prev, prev_at = plan.source_cut, f"stage {s}'s first block"
    for st in range(s, t + 1):
        expected = dst_shape(st, "end")   # what stage st + 1's first block (or the head) takes
        if st < t or t == s:
            if prev.channels != expected.channels:
                nxt = f"stage {st + 1}'s first block" if st < 4 else "the head"
                raise PlanError("model.adapter", "finetune",
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
