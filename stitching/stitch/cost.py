"""Cost of a model: MACs (the paper's "FLOPs"), FLOPs (= 2 x MACs), parameters, trainable parameters, and what
one training image costs.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of a single image (it counts
convolutions and matrix products, like torchtnt did for the paper; norms, activations and resizes are
free). Fused scaled-dot-product attention on the CPU is invisible to the counter, so timm's fused
attention is switched off while counting (torchvision's Swin computes attention with explicit matmuls).

Training (:func:`count_pass`, :func:`network_cost`, :func:`stitch_cost`): the same counter on the backward
pass as autograd runs it, for each way a part takes part in a training step (:class:`PassCost`): a frozen
prefix only runs forward (under ``no_grad``); adapters compute their weight gradients and the gradients
inside them, not the gradient of their input (the prefix needs none); a frozen suffix computes the gradient of
its input, to pass it back to the adapters, and no weight gradient; a trained network (fine-tuning, a trained
original) computes both, except its stem's input gradient. Counted on the meta device (shapes only: nothing is
allocated or computed, no weights are read), once per network, input size and class count. PyTorch's
counter charges the weight gradient of a grouped convolution ``groups`` times over (it counts it as a dense
one); :func:`conv_backward_flops` counts it as the forward pass it mirrors, so depthwise networks
(MobileNetV3, EfficientNet, ConvNeXt) are not overcounted. The convention: ``docs/method.md``, "MACs".
:func:`human` writes a count for people (``1.67 G``), :func:`share` one cost as a part of another (``41%``).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from stitching.kinds import FINETUNE, ORIGINAL, STITCHED
from stitching.models.formats import prefix_tokens
from stitching.models.registry import get_spec
from stitching.models.trace import CachedKwargs, trace_blocks, trace_cuts
from stitching.stitch.stitcher import adapter_layers, layout


@contextmanager
def _unfused_attention(model: nn.Module):
    toggled = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in toggled:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in toggled:
            m.fused_attn = True


def count_params(model: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params, trainable


@torch.no_grad()
def count_cost(model: nn.Module, img_size: int = 224) -> dict[str, int]:
    """MACs/FLOPs of one ``img_size`` forward pass and parameter counts, with the model left as it was."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with _unfused_attention(model), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    params, trainable = count_params(model)
    return {"macs": flops // 2, "flops": flops, "params": params, "trainable_params": trainable}


# ------------------------------------------------------------------------------------------- training
def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: each gradient it computes (``output_mask``: input, weight) costs
    what the forward convolution costs -- the input gradient is the transposed convolution with the same
    weights, the weight gradient correlates the input with the output gradient over the same positions and
    taps. PyTorch's own formula counts the weight gradient of a grouped convolution as a dense one (``groups``
    times too many); this one reads the per-group width from the weight's shape, as the forward formula does."""
    out = x_shape if transposed else grad_out_shape
    forward = conv_flop_count(list(x_shape), list(w_shape), list(out), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


@dataclass(frozen=True)
class PassCost:
    """MACs per image of one part of a network in a training step: its forward pass, and its backward pass in
    each of the three ways a part takes part (as autograd runs it: only the gradients something needs). A
    backward pass that was not counted (:func:`count_pass`'s ``backward``) is None."""

    forward: int = 0
    backward_input: int | None = 0      # frozen weights, the input's gradient (a frozen suffix, back to the adapters)
    backward_weights: int | None = 0    # trainable weights, an input that needs no gradient (adapters after a frozen
                                        # prefix; a trained network's stem, whose input is the image)
    backward_all: int | None = 0        # trainable weights and the input's gradient (a trained network after its stem)

    def __add__(self, other: "PassCost") -> "PassCost":
        return PassCost(*(None if a is None or b is None else a + b
                          for a, b in ((getattr(self, f.name), getattr(other, f.name)) for f in fields(self))))


def total(costs) -> PassCost:
    return sum(costs, PassCost())


#: the backward passes :func:`count_pass` can count: what needs a gradient in each
BACKWARDS = ("input", "weights", "all")
#: modules that are free by the counting convention (they compute no matrix product) and keep their input's shape:
#: :func:`count_pass` runs them as a stand-in that adds nothing but keeps their output's dependency on their
#: weights (so that autograd computes the same gradients around them): the same count, and on the meta device
#: most of the time saved (a norm's backward runs there as a chain of Python decompositions)
FREE_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@contextmanager
def _free_norms(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, FREE_NORMS)]
    for m in norms:
        m.forward = functools.partial(_stand_in, list(m.parameters(recurse=False)))
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def _stand_in(params: list, x: torch.Tensor) -> torch.Tensor:
    """``x``, depending on ``params`` (a zero-weighted sum of them) where the norm has any."""
    return x + sum(p.sum() for p in params) * 0 if params else x


def count_pass(module: nn.Module, x: torch.Tensor, backward: tuple = BACKWARDS) -> tuple[PassCost, torch.Tensor]:
    """The :class:`PassCost` of ``module`` on the batch ``x`` (of one image; the meta device counts shapes only)
    and its output (detached). One forward pass with every weight and the input requiring gradients, then the
    backward passes named in ``backward`` (:data:`BACKWARDS`; the others are None) on that graph, each computing
    only the gradients it asks for. Norms run as the identity (:data:`FREE_NORMS`). The module's weights keep
    their ``requires_grad``; it is counted in eval mode and left in the mode it was in."""
    params = list(module.parameters())
    before = [p.requires_grad for p in params]
    was_training = module.training
    module.eval()
    x = x.detach().requires_grad_(x.is_floating_point())
    try:
        for p in params:
            p.requires_grad_(True)
        with _unfused_attention(module), _free_norms(module), torch.enable_grad():
            with _counter() as counter:
                y = module(x)

            def grads(inputs: list) -> int:
                inputs = [t for t in inputs if t.requires_grad]
                if not inputs or not y.requires_grad:
                    return 0
                with _counter() as c:
                    torch.autograd.grad(y.float().sum(), inputs, retain_graph=True, allow_unused=True)
                return c.get_total_flops() // 2

            wanted = {"input": [x], "weights": params, "all": [x, *params]}
            cost = PassCost(counter.get_total_flops() // 2,
                            *(grads(wanted[k]) if k in backward else None for k in BACKWARDS))
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
        module.train(was_training)
    return cost, y.detach()


@dataclass(frozen=True)
class NetworkCost:
    """The :class:`PassCost` of every part of a registry network at one input size: its stem, each block of its
    flat block list (``Parts.blocks()``, :func:`~stitching.models.trace.list_blocks`' order) and its head;
    ``inputs[i]`` the shape (of one image) the network hands its block ``i`` (``inputs[-1]``: its head)."""

    name: str
    stem: PassCost
    blocks: tuple[PassCost, ...]
    head: PassCost
    inputs: tuple[tuple[int, ...], ...] = ()

    def prefix(self, end: int) -> PassCost:
        """The stem and ``blocks[:end]``."""
        return self.stem + total(self.blocks[:end])

    def suffix(self, start: int) -> PassCost:
        """``blocks[start:]`` and the head."""
        return total(self.blocks[start:]) + self.head

    def trained(self, block_indices) -> int:
        """MACs of one training image of this network trained whole (every weight), keeping only the blocks
        ``block_indices``: forward, the stem's weight gradients, every later part's weight and input
        gradients."""
        parts = [self.blocks[i] for i in block_indices] + [self.head]
        return self.stem.forward + self.stem.backward_weights + sum(p.forward + p.backward_all for p in parts)


@dataclass
class _Network:
    """A registry network built on the meta device, its split, traced cuts, and its :class:`NetworkCost`."""

    spec: object
    model: nn.Module
    parts: object
    shapes: dict
    img_size: int
    _blocks: list | None = None
    _cost: NetworkCost | None = None
    _suffixes: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(iter(p.device for p in self.model.parameters()), torch.device("cpu"))

    @property
    def blocks(self) -> list:
        if self._blocks is None:
            self._blocks = trace_blocks(self.spec, self.parts, self.img_size, self.model)
        return self._blocks

    @property
    def cost(self) -> NetworkCost:
        if self._cost is None:
            x = torch.zeros(1, 3, self.img_size, self.img_size, device=self.device)
            stem, x = count_pass(self.parts.stem, x)
            blocks, inputs = [], []
            for block in self.parts.blocks():
                inputs.append(tuple(x.shape))
                cost, x = count_pass(block, x)
                blocks.append(cost)
            head, _ = count_pass(self.parts.head, x)
            self._cost = NetworkCost(self.spec.name, stem, tuple(blocks), head, (*inputs, tuple(x.shape)))
        return self._cost

    def suffix_at(self, start: int, shape: tuple[int, ...]) -> PassCost:
        """``blocks[start:]`` and the head on an input of ``shape`` (one image) that is not the one the network
        hands itself there: the larger map a chain gives it under ``model.resize: none`` across a reduction
        or the paper code's quirks (``model.code_quirks``). Counted once per start and shape."""
        if (start, shape) not in self._suffixes:
            suffix = nn.Sequential(*self.parts.blocks()[start:], self.parts.head)
            self._suffixes[start, shape] = count_pass(suffix, torch.zeros(shape, device=self.device))[0]
        return self._suffixes[start, shape]


@functools.lru_cache(maxsize=64)
def _network(name: str, key: str, img_size: int, num_classes: int, kwargs) -> _Network:
    spec = get_spec(name, kwargs.kwargs)
    try:
        with torch.device("meta"):
            model = spec.build(False, num_classes)
        parts = spec.split(model)
        return _Network(spec, model, parts, trace_cuts(spec, parts, img_size), img_size)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built or run on meta: build it for real
        model = spec.build(False, num_classes)
        parts = spec.split(model)
        return _Network(spec, model, parts, trace_cuts(spec, parts, img_size), img_size)


def _net(name: str, kwargs: dict | None, img_size: int, num_classes: int) -> _Network:
    return _network(name, repr(sorted((kwargs or {}).items())), img_size, num_classes, CachedKwargs(kwargs))


def network_cost(name: str, kwargs: dict | None = None, img_size: int = 224, num_classes: int = 1000) -> NetworkCost:
    """The :class:`NetworkCost` of registry network ``name`` (constructor ``kwargs``) at ``img_size`` with a
    ``num_classes`` head: built on the meta device (no weights), counted once and cached."""
    return _net(name, kwargs, img_size, num_classes).cost


@dataclass(frozen=True)
class StitchCost:
    """MACs per image of a config's model by part, for what a run computes (:mod:`stitching.train.objective`
    turns it into a training step's cost). ``kind``: original | stitched | finetune.

    ``forward``: the whole model's forward pass (evaluation). ``trained``: one training image of a model trained
    whole (finetune; an original with ``train.epochs > 0``). Stitched models: ``prefix`` (forward only: frozen,
    under ``no_grad``), ``adapters`` and ``suffix`` (:class:`PassCost`), ``target`` (the destination's own
    network up to the join, forward: the extra pass of the ``match`` and ``distill`` objectives and of the
    similarity at the join) and the number of adapters."""

    kind: str
    forward: int
    trained: int = 0
    prefix: int = 0
    adapters: PassCost = PassCost()
    suffix: PassCost = PassCost()
    target: int = 0
    num_adapters: int = 0


_ADAPTERS: dict[str, tuple[PassCost, tuple]] = {}     # adapter chain (its modules' shapes) -> cost, output shape


def _adapters_cost(mcfg, plan, dst: _Network) -> tuple[PassCost, tuple[int, ...]]:
    """The adapter chain's forward pass and weight gradients (all a stitched training step asks of it), counted
    once per distinct chain (the same modules on the same shapes, whichever networks it joins), and the shape
    (of one image) it hands the destination."""
    reinject = getattr(mcfg, "pos_embed", "none") == "reinject"
    key = repr((plan.adapter, plan.style, plan.working_format, tuple(plan.steps), plan.end_resize, plan.source_cut,
                plan.destination_cut.format, (dst.spec.name, dst.spec.kwargs) if reinject else None))
    if key not in _ADAPTERS:
        device = dst.device
        with torch.device(device):
            chain = nn.Sequential(*adapter_layers(mcfg, plan, dst.model))
        cut = plan.source_cut
        shape = ((1, cut.channels, cut.height, cut.width) if cut.format == "image" else
                 (1, cut.height, cut.width, cut.channels) if cut.format == "bhwc" else
                 (1, prefix_tokens(cut.format) + cut.height * cut.width, cut.channels))   # a token format
        cost, out = count_pass(chain, torch.zeros(shape, device=device), backward=("weights",))
        _ADAPTERS[key] = cost, tuple(out.shape)
    return _ADAPTERS[key]


def stitch_cost(mcfg, img_size: int = 224, num_classes: int = 1000) -> StitchCost:
    """The :class:`StitchCost` of a config's ``model`` section (:class:`stitching.config.ModelConfig`) at
    ``img_size``: built from shapes on the meta device, the networks counted once per (name, constructor
    arguments, input size, classes) and each distinct adapter chain once, so that costing every run of a sweep
    builds each network once. The suffix is counted on the map the chain hands it (``model.resize: none`` across
    a reduction, the paper code's quirks: larger than the destination's own)."""
    src = _net(mcfg.source, mcfg.source_args(), img_size, num_classes)
    if mcfg.is_original:
        cost = src.cost
        return StitchCost(ORIGINAL, cost.prefix(len(cost.blocks)).forward + cost.head.forward,
                          trained=cost.trained(range(len(cost.blocks))))
    dst_name = mcfg.destination or mcfg.source
    dst = _net(dst_name, mcfg.destination_args(), img_size, num_classes)
    traced = (src.blocks, dst.blocks) if mcfg.source_block is not None else None
    cut = layout(mcfg, src.spec, dst.spec, src.parts, dst.parts, src.shapes, dst.shapes, traced)
    s, d = src.cost, dst.cost
    prefix, suffix = s.prefix(cut.prefix_end), d.suffix(cut.suffix_start)
    if cut.plan.kind == FINETUNE:
        kept = [*range(cut.prefix_end), *cut.kept, *range(cut.suffix_start, len(d.blocks))]
        return StitchCost(FINETUNE, prefix.forward + sum(d.blocks[i].forward for i in cut.kept) + suffix.forward,
                          trained=d.trained(kept), num_adapters=0)
    adapters, handed = _adapters_cost(mcfg, cut.plan, dst)
    if handed != d.inputs[cut.suffix_start]:    # a larger map than the destination's own (resize none, the quirks)
        suffix = dst.suffix_at(cut.suffix_start, handed)
    return StitchCost(STITCHED, prefix.forward + adapters.forward + suffix.forward, prefix=prefix.forward,
                      adapters=adapters, suffix=suffix, target=d.prefix(cut.suffix_start).forward,
                      num_adapters=cut.plan.num_adapters)


def human(n: float, unit: str = "") -> str:
    """A count for people, three significant digits and an SI prefix: ``human(1674e6, "MACs")`` is
    ``"1.67 GMACs"``, ``human(119680)`` is ``"120 K"``."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale * 0.9995:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def share(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole``: whole percent from 10 % on, one decimal below (``"41%"``,
    ``"3.2%"``, ``"120%"``)."""
    pct = 100 * part / whole if whole else float("nan")
    return f"{pct:.0f}%" if pct >= 9.95 else f"{pct:.1f}%"
