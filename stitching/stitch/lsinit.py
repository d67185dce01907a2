"""Least-squares initialisation of the adapters: ``model.init: least_squares`` (``default``, ``pytorch``: as
built, :data:`stitching.stitch.adapters.ADAPTER_INITS`).

Owns the init modes (:data:`INIT_MODES`), how each adapter kind's map is fitted (its record's ``fit``:
:mod:`stitching.kinds`), the config check (:func:`check_config`: exit 2 before anything is built), where each
link of a chain finds its target (:func:`link_targets`, :func:`link_points`), the fit itself -- per-batch
accumulators, :class:`LinkFit` (one link's normal equations, solved and written) and :class:`ChainMeasure` (the
chain's residual), which the one-cell fit :func:`fit` and a stitching matrix's shared pass
(:mod:`stitching.matrix.closed_form`) both feed -- and the trainer's entry (:func:`initialise`).

The fit streams N training images (evaluation transforms, a seeded subset spread over the whole set) through
the frozen source and the destination, batch by batch, accumulating the normal equations
(:class:`stitching.similarity.LeastSquares`, float64); nothing but the sums is kept. Every position / token
of every image is a sample (the adapters' maps are channel-wise). Link by link, in chain order: link i's
input is the source's features in the chain's working format after the links already fitted (the chain as
it will run), resized as the adapter resizes them; its target is the destination's *own* activation where
link i lands, in the working format (prefix tokens dropped into a feature map; the re-injected position
embedding taken off the last target, since it is added after the chain). What is written, per style:

- the core's affine map is fitted on what the core sees: a BatchNorm ``norm_in`` is given the samples'
  channel means and variances as running statistics (weight 1, bias 0) and the map is fitted on the
  standardised inputs (solved on the raw inputs and folded: the same minimiser); a LayerNorm ``norm_in`` is
  applied as it is and the map fitted on its output;
- a BatchNorm ``norm_out`` is made the identity in eval mode (weight = sqrt(running var + eps), bias =
  running mean), its running statistics then set from the statistics of its own input in a last pass, so
  that in training mode (batch statistics) it is the identity up to batch noise too; a LayerNorm
  ``norm_out`` cannot be an identity: the core is fitted to the target's per-token normalisation and the
  LayerNorm's weight and bias to the per-channel regression of the target on it;
- ``linear`` / ``linear_relu``: the whole 1x1 convolution / per-token Linear (weight and bias);
  ``conv3x3``: the centre tap (the other taps zero: the best channel-wise map, read at the positions a
  stride-s 3x3 convolution with padding 1 centres on); ``bottleneck``: the projection shortcut (1x1
  convolution and its BatchNorm, whose bias carries the intercept), the residual branch staying at zero
  (its last BatchNorm weight is zero-initialised); an identity shortcut has nothing to fit.

Activations (LeakyReLU / ReLU after or inside the map) and a LayerNorm ``norm_out`` make the chain's output
differ from the fitted map: :func:`fit` therefore measures, in a last pass over the same images, the
relative residual ``||out - Y||^2 / ||Y - mean Y||^2`` of the initialised chain's real output (eval mode)
against the destination's own activation at the receiving point, every position / token a sample: that
number goes to ``result.csv`` (``init_residual``) and the log. Method: ``docs/method.md``, "Least-squares
initialisation".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from stitching.kinds import FINETUNE, FIT_SHORTCUT, STITCHED, adapter_kind, kinds_with
from stitching.models.formats import Convert, convert, is_token, prefix_tokens
from stitching.similarity import LeastSquares, channels_last_samples
from stitching.stitch.adapters import ADAPTER_INITS, Adapter
from stitching.stitch.plan import (PlanError, Shape, StitchPlan, first_block_shapes, nominal_shape, plan_config,
                                   plan_stitch)
from stitching.stitch.posembed import PosReinject

LEAST_SQUARES = "least_squares"
INIT_MODES = (ADAPTER_INITS[0], LEAST_SQUARES, *ADAPTER_INITS[1:])   # default | least_squares | pytorch

log = logging.getLogger("stitching.train")


# ------------------------------------------------------------------------------------------ checks
def link_targets(plan: StitchPlan, destination_cut: Callable[[int, str], Shape]) -> list[tuple[int, str] | None]:
    """Where each link of ``plan``'s chain finds its target: ``(stage, "first")`` -- the destination after the
    first block of that stage -- for an intermediate link, ``None`` (the receiving point) for the last.
    ``destination_cut(stage, where)`` gives the destination's shape there. A link whose output is not the
    destination's own shape has no target: :class:`PlanError` naming the key to change."""
    k = plan.num_adapters
    if any(s.pad for s in plan.steps) or (plan.resize == "none" and plan.quirks_change_none):
        raise PlanError("model.code_quirks", True, "the paper code's padded 1x1 convolutions and 'no downsample' "
                        "maps change the shapes the least-squares fit targets: use model.code_quirks=false or "
                        "model.init=default")
    points = [(stage, "first") for stage in plan.link_stages] + [None]
    assert len(points) == k, f"{plan.link_stages} for a chain of {k}"
    for n, (step, point) in enumerate(zip(plan.steps, points), 1):
        want = plan.destination_cut if point is None else destination_cut(*point)
        where = ("the receiving point" if point is None else f"after the first block of stage {point[0]}")
        fits_format = not is_token(plan.working_format) or want.format == plan.working_format
        if fits_format and want.channels == step.c_out and (want.height, want.width) == tuple(step.size_out):
            continue
        got = f"{step.c_out}@{step.size_out[0]}x{step.size_out[1]}"
        message = (f"least-squares init fits adapter {n} to the destination's own activation {where} "
                   f"({want}), but it outputs {got}")
        if (want.height, want.width) != tuple(step.size_out) and plan.resize == "none":
            raise PlanError("model.resize", plan.resize, message + ": the sizes differ without resizing")
        if plan.schedule == "paper":
            raise PlanError("model.schedule", plan.schedule, message + ": use model.schedule=destination")
        raise PlanError("model.init", "least_squares", message)
    return points


def check_config(cfg, specs) -> None:
    """``model.init`` / ``model.init_images`` of ``cfg`` (a :class:`stitching.config.Config`): a known mode;
    least squares needs adapters with a map to fit and a target for every link (checked on the declared
    shapes at ``data.img_size``; the trainer checks the traced ones again before computing). ``specs()``
    gives the source's and the destination's model specs (asked for only where needed)."""
    m = cfg.model
    if m.init not in INIT_MODES:
        raise cfg.error("model.init", f"must be one of {', '.join(INIT_MODES)}")
    if m.init_images < 1:
        raise cfg.error("model.init_images", "must be >= 1")
    if m.init != LEAST_SQUARES:
        return
    blocks = getattr(m, "source_block", None) is not None
    if (m.source_stage is None and not blocks) or m.adapter == FINETUNE:
        raise cfg.error("model.init", "fits adapters: it needs a stitched config with adapters "
                        "(model.source_stage, not finetune)")
    if not getattr(adapter_kind(m.adapter), "fit", ""):
        raise cfg.error("model.init", f"{m.adapter} adapters have no linear map to fit in closed form (fitted: "
                        f"{', '.join(kinds_with('fit'))}); use model.init=default")
    if blocks:                          # declared block shapes at data.img_size (the trainer checks the traced)
        from stitching.models.trace import list_blocks

        try:
            plan = plan_config(m, cfg.data.img_size)
            firsts = first_block_shapes(list_blocks(m.destination or m.source, m.destination_args(),
                                                    cfg.data.img_size))
            link_targets(plan, lambda st, w: firsts[st])
        except PlanError as err:
            raise cfg.error(err.key, str(err)) from None
        return
    src, dst = specs()
    try:
        plan = plan_stitch(src, dst, m.source_stage, m.destination_stage, m.adapter, m.resize, m.schedule,
                           img_size=cfg.data.img_size, style=m.adapter_style, quirks=m.code_quirks)
        link_targets(plan, lambda st, w: nominal_shape(dst, st, w, cfg.data.img_size))
    except PlanError as err:
        raise cfg.error(err.key, str(err)) from None


def check_built(built) -> list:
    """:func:`link_targets` on the traced shapes of a built stitched model (``BuiltModel``)."""
    return link_targets(built.plan, lambda st, w: built.destination_cuts[(st, w)])


def check_run(cfg, built) -> None:
    """The trainer's check after building, before any compute: with ``model.init: least_squares``, a target
    for every link on the traced shapes (a :class:`~stitching.config.ConfigError` otherwise)."""
    if cfg.model.init != LEAST_SQUARES or built.kind != STITCHED:
        return
    try:
        check_built(built)
    except PlanError as err:
        raise cfg.error(err.key, str(err)) from None


# ------------------------------------------------------------------------------------------ the fit
@dataclass
class _Sums:
    """Per-channel sums of one tensor's samples (and, with ``y``, of its products with another)."""

    n: int = 0
    s: torch.Tensor | None = None
    ss: torch.Tensor | None = None
    sy: torch.Tensor | None = None
    sxy: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        x = x.double()
        if self.s is None:
            self.s, self.ss = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])
            if y is not None:
                self.sy, self.sxy = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])
        self.s += x.sum(0)
        self.ss += (x * x).sum(0)
        if y is not None:
            y = y.double()
            self.sy += y.sum(0)
            self.sxy += (x * y).sum(0)
        self.n += x.shape[0]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean * mean).clamp_min(0)


def _samples(t: torch.Tensor) -> torch.Tensor:
    """(samples, channels) of a feature map (B, C, H, W) or a token sequence (B, N, C)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if t.ndim == 4 else t.reshape(-1, t.shape[-1])


def adapter_chain(built) -> tuple[list[Adapter], PosReinject | None]:
    layers = list(built.model.adapters)
    chain = [m for m in layers if isinstance(m, Adapter)]
    if not isinstance(layers[0], Convert) or layers[1:1 + len(chain)] != chain:
        raise ValueError("least-squares init expects the adapters as Convert -> adapters -> Convert")
    return chain, next((m for m in layers if isinstance(m, PosReinject)), None)


def _to_working(y: torch.Tensor, fmt: str, work: str, size: tuple[int, int]) -> torch.Tensor:
    """A destination activation of format ``fmt`` in the chain's working format with the channels the
    destination has (prefix tokens dropped into a feature map, not concatenated onto it)."""
    if fmt == work:
        return y
    if is_token(fmt) and not is_token(work):
        y, fmt = y[:, prefix_tokens(fmt):], "tokens"
    return convert(y, fmt, work, size)


def link_points(built, points: list | None = None) -> list[tuple[int, Shape]]:
    """Per link of ``built``'s chain, where its target is: (how many of the destination's blocks run before it
    -- the target is the output of its stem and those blocks --, the destination's traced shape there).
    ``points``: :func:`check_built`'s (computed when not given)."""
    plan, parts = built.plan, built.destination_parts
    out = []
    for point in check_built(built) if points is None else points:
        if point is None:
            # the receiving point: every destination block the suffix does not run (suffix = blocks + head)
            out.append((len(parts.blocks()) - (len(built.model.suffix) - 1), plan.destination_cut))
        else:
            out.append((parts.index_after_first(point[0]), built.destination_cuts[point]))
    return out


def source_depth(built) -> int:
    """How many of the source's blocks run before the join: its features there are the output of its stem and
    those blocks (``built.model.prefix``)."""
    return len(built.model.prefix) - 1


class _Destination:
    """The destination's own activations at the links' targets (its modules in eval mode)."""

    def __init__(self, built, points):
        parts = built.destination_parts
        self.runs = [(built.target if point is None else
                      nn.Sequential(built.destination_input, parts.stem, *parts.blocks()[:depth]), cut)
                     for point, (depth, cut) in zip(points, link_points(built, points))]


class LinkFit:
    """The least-squares fit of link ``i`` of ``built``'s chain (``chain``: its adapters, in order), fed batch by
    batch: :meth:`update` with the source's features at its cut (the prefix's output) and the destination's
    own activation where the link lands (its own format; ``cut`` its traced shape), :meth:`finish` solves and
    writes the adapter. ``minus``: subtracted from the target first (the last link under ``pos_embed:
    reinject``). ``skip``: nothing to fit (a bottleneck with an identity shortcut); it needs no batches. The
    one-cell fit (:func:`fit`) and a stitching matrix's shared pass feed the same objects."""

    def __init__(self, built, chain: list[Adapter], i: int, cut: Shape, minus: torch.Tensor | None = None):
        self.built, self.chain, self.i, self.cut, self.minus = built, chain, i, cut, minus
        a = self.a = chain[i]
        self.skip = _fits_shortcut(a) and isinstance(a.core.shortcut, nn.Identity)
        self.bn_in = isinstance(a.norm_in, nn.BatchNorm2d)
        self.ln_out = isinstance(a.norm_out, nn.LayerNorm)
        self.ls, self.out = LeastSquares(), _Sums()

    @torch.no_grad()
    def update(self, h: torch.Tensor, y: torch.Tensor) -> None:
        if self.skip:
            return
        a, stride = self.a, self.a.step.stride
        u = self.built.model.adapters[0](h)                 # into the working format, then the links before it
        for link in self.chain[: self.i]:
            u = link(u)
        u = a.resize(u)
        if stride > 1:
            u = u[:, :, ::stride, ::stride]     # the positions a stride-s 1x1 / centred 3x3 conv reads
        xin = _samples(u if self.bn_in else a.norm_in(u))
        if self.minus is not None:
            y = y - self.minus.to(y.dtype)
        cut = self.cut
        y = _samples(_to_working(y, cut.format, self.built.plan.working_format, (cut.height, cut.width)))
        if self.ln_out:
            yn = F.layer_norm(y, (y.shape[1],), eps=a.norm_out.eps)
            self.out.add(yn, y)
            y = yn
        self.ls.update(xin, y)

    @torch.no_grad()
    def finish(self) -> dict:
        """Solve and write the fitted map into the adapter: ``{link, fitted, residual, samples}``."""
        a, ls, out, i = self.a, self.ls, self.out, self.i
        if self.skip:
            return {"link": i + 1, "fitted": "nothing (identity shortcut)", "residual": float("nan")}
        residual = ls.value()
        A, b = ls.solve()                                   # y ~ x A + b on what the core's input norm receives
        mean, var = ls.sx / ls.n, (ls.xtx.diagonal() / ls.n - (ls.sx / ls.n) ** 2).clamp_min(0)
        cov = ls.xtx / ls.n - torch.outer(mean, mean)
        var_out = ((A * (cov @ A)).sum(0)).clamp_min(0)   # each output channel's variance over the samples
        if self.bn_in:                                      # the core sees (x - mean) / s: fold
            _set_bn(a.norm_in, mean, var, torch.ones_like(mean), torch.zeros_like(mean))
            b = b + mean @ A
            A = A * (var + a.norm_in.eps).sqrt()[:, None]
            mean_core_in = torch.zeros_like(mean)
        else:
            mean_core_in = mean
        _write_core(a, A, b, mean_core_in @ A, var_out)
        if isinstance(a.norm_out, nn.BatchNorm2d):
            _identity_bn(a.norm_out)
        elif self.ln_out:                                   # y_c ~ gamma_c * layernorm(y)_c + beta_c
            mn, vn = out.mean_var()
            my = out.sy / out.n
            cov_ny = out.sxy / out.n - mn * my
            gamma = torch.where(vn > 0, cov_ny / vn.clamp_min(1e-30), torch.ones_like(vn))
            a.norm_out.weight.copy_(gamma)
            a.norm_out.bias.copy_(my - gamma * mn)
        return {"link": i + 1, "fitted": _what(a), "residual": residual, "samples": ls.n}


def _fits_shortcut(a: Adapter) -> bool:
    return adapter_kind(a.kind).fit == FIT_SHORTCUT


def _layer(a: Adapter) -> nn.Module:
    """The layer a :data:`~stitching.kinds.FIT_LAYER` kind fits: its core's first."""
    return a.core[0] if isinstance(a.core, nn.Sequential) else a.core


def _what(a: Adapter) -> str:
    if _fits_shortcut(a):
        return "projection shortcut"
    layer = _layer(a)
    return "centre tap" if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) else "1x1 map"


def _write_core(a: Adapter, A: torch.Tensor, b: torch.Tensor, mean_z: torch.Tensor, var_z: torch.Tensor) -> None:
    """The fitted affine map ``x A + b`` (A: in x out) into the adapter's core; for the shortcut, whose
    convolution has no bias, the BatchNorm after it carries the intercept (identity on its input's statistics
    ``mean_z`` / ``var_z``, which it is given as running statistics)."""
    if _fits_shortcut(a):
        conv, bn = a.core.shortcut
        conv.weight.copy_(A.T.reshape(conv.weight.shape).to(conv.weight.dtype))
        _set_bn(bn, mean_z, var_z, (var_z + bn.eps).sqrt(), mean_z + b)
        return
    layer = _layer(a)
    w = A.T.to(layer.weight.dtype)
    if isinstance(layer, nn.Linear):
        layer.weight.copy_(w)
    elif layer.kernel_size == (1, 1):
        layer.weight.copy_(w[:, :, None, None])
    else:
        layer.weight.zero_()
        layer.weight[:, :, layer.kernel_size[0] // 2, layer.kernel_size[1] // 2] = w
    layer.bias.copy_(b.to(layer.bias.dtype))


def _set_bn(bn: nn.BatchNorm2d, mean, var, weight, bias) -> None:
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_(weight)
    bn.bias.copy_(bias)


def _identity_bn(bn: nn.BatchNorm2d) -> None:
    """Eval-mode identity whatever its running statistics: weight sqrt(var + eps), bias = mean."""
    bn.weight.copy_((bn.running_var + bn.eps).sqrt())
    bn.bias.copy_(bn.running_mean)


class ChainMeasure:
    """The relative residual of ``built``'s initialised chain against the destination's own activation at the
    receiving point, fed batch by batch (:meth:`update`: the source's features at its cut, the destination's
    activation there); meanwhile each BatchNorm ``norm_out`` learns its input's statistics, set by
    :meth:`finish` (kept an identity in eval mode, so the output measured does not change). :meth:`close`
    removes the statistics' hooks without setting anything (an interrupted pass)."""

    def __init__(self, built, chain: list[Adapter]):
        self.built = built
        self.sums: dict = {}
        self.hooks = []
        for a in chain:
            if isinstance(a.norm_out, nn.BatchNorm2d):
                self.sums[a.norm_out] = _Sums()
                self.hooks.append(a.norm_out.register_forward_pre_hook(
                    lambda m, inp: self.sums[m].add(_samples(inp[0]))))
        self.fmt = built.plan.destination_cut.format
        self.sse = 0.0
        self.total = _Sums()

    @torch.no_grad()
    def update(self, h: torch.Tensor, y: torch.Tensor) -> None:
        out = self.built.model.adapters(h)
        o, t = channels_last_samples(out.float(), self.fmt), channels_last_samples(y.float(), self.fmt)
        self.sse += float(((o.double() - t.double()) ** 2).sum())
        self.total.add(t)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    @torch.no_grad()
    def finish(self) -> float:
        self.close()
        for bn, s in self.sums.items():
            mean, var = s.mean_var()
            _set_bn(bn, mean, var, (var + bn.eps).sqrt(), mean)
        mean, _ = self.total.mean_var()
        spread = float(self.total.ss.sum()) - self.total.n * float(mean @ mean)
        return self.sse / spread if spread > 0 else float("nan")


@torch.no_grad()
def fit(built, images: Callable[[], Iterable[torch.Tensor]], device: torch.device | str = "cpu") -> dict:
    """Fit ``built``'s adapters in place (see the module docstring). ``images()`` yields the same batches of
    images each time it is called (one pass per link, then one to measure). Returns ``{residual, links}``:
    the chain's relative residual at the receiving point and, per link, what was fitted and the fit's own
    relative residual (on the core's target: the LayerNorm-normalised target where a LayerNorm follows)."""
    points = check_built(built)
    chain, reinject = adapter_chain(built)
    model, target = built.model, built.target
    was = model.training
    model.eval()
    target.eval()
    dst = _Destination(built, points)
    for run, _ in dst.runs:
        run.eval()
    try:
        minus = reinject.embedding if reinject is not None else None
        links = []
        for i, (run, cut) in enumerate(dst.runs):
            link = LinkFit(built, chain, i, cut, minus if i == len(chain) - 1 else None)
            for x in () if link.skip else images():
                x = x.to(device)
                link.update(model.prefix(x), run(x))
            links.append(link.finish())
        measure = ChainMeasure(built, chain)
        try:
            for x in images():
                x = x.to(device)
                measure.update(model.prefix(x), target(x))
        finally:
            measure.close()
        residual = measure.finish()
    finally:
        model.train(was)
    return {"residual": residual, "links": links}


# ------------------------------------------------------------------------------------------ the trainer's
def fit_images(cfg, built, batch_size: int):
    """(a callable giving the fit's image batches, how many images): ``model.init_images`` training images, evaluation
    transforms, a subset spread over the training set drawn with ``train.seed`` (identical on every rank)."""
    import dataclasses

    from stitching.data.datasets import build_datasets
    from stitching.data.loaders import build_loader
    from stitching.data.transforms import build_transforms

    _, eval_tf = build_transforms(built.data_config, cfg.data)
    train_set, _ = build_datasets(dataclasses.replace(cfg.data, num_classes=cfg.num_classes), eval_tf, eval_tf)
    n = min(cfg.model.init_images, len(train_set))
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.train.seed))[:n]
    subset = torch.utils.data.Subset(train_set, sorted(pick.tolist()))
    loader = build_loader(subset, max(1, min(batch_size, n)), False, cfg.train.seed, cfg.data.workers)
    return (lambda: (x for x, _ in loader)), n


def initialise(cfg, built, device, batch_size: int, say: Callable[[str], None] = log.info) -> float | None:
    """The trainer's entry, on a fresh start: fit ``built``'s adapters when ``model.init`` asks for it and
    return the chain's relative residual (None for ``default``)."""
    if cfg.model.init != LEAST_SQUARES or built.kind != STITCHED:
        return None
    t0 = time.time()
    images, n = fit_images(cfg, built, batch_size)
    out = fit(built, images, device)
    links = "; ".join(f"adapter {x['link']}: {x['fitted']}" + (f", fit residual {x['residual']:.4f}"
                                                               if x["residual"] == x["residual"] else "")
                      for x in out["links"])
    say(f"least-squares init on {n} training images (eval transforms) in "
        f"{time.time() - t0:.1f} s: {links}; relative residual at the receiving point {out['residual']:.4f}")
    return out["residual"]
