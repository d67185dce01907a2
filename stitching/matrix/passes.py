"""The shared passes of a closed-form matrix group (:mod:`stitching.matrix.closed_form`): every cell's fit, similarity
and evaluation computed from one forward of each frozen network per batch.

Owns: :class:`Cell` (one cell of a group and what the passes find), :class:`SharedForward` (one forward of each
network per batch, the activations at the depths asked for; the receiver's on its own normalisation),
:func:`fit_cells` (the least-squares fit, pass p fitting link p of every chain, with the first pass's activations
kept for the later ones up to :data:`FIT_CACHE_BYTES`), :func:`similarity_cells` and :func:`evaluate_cells`. A
``stop`` argument is any object whose ``check()`` raises to stop at the next batch (the group's signals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from stitching import rundir as R
from stitching.config import Config
from stitching.similarity import LeastSquares, MinibatchCKA, channels_last_samples
from stitching.stitch import lsinit
from stitching.stitch.join import adapted_at_join, destination_at_join, on_destination_grid, source_at_join
from stitching.stitch.shared import outputs_after
from stitching.stitch.stitcher import Networks
from stitching.train.evaluation import add_logits, new_sums, result_of


@dataclass
class Cell:
    """One cell of a group: its run, its stitch on the shared networks, and what the passes found."""

    cfg: Config
    rundir: R.RunDir
    built: object                          # BuiltModel (assembled on the group's Networks)
    chain: list
    points: list                           # lsinit.link_points: (destination depth, cut) per link
    source_depth: int
    minus: torch.Tensor | None
    cost: dict = field(default_factory=dict)
    links: list = field(default_factory=list)
    residual: float = float("nan")
    before: dict | None = None
    after: dict | None = None
    evaluation: dict | None = None

    @property
    def receiving_depth(self) -> int:
        return self.points[-1][0]


def parts_of(nets: Networks) -> tuple:
    """((stem, blocks, head) of the source, the same of the destination): what :class:`SharedForward` runs."""
    return ((nets.source_parts.stem, nets.source_parts.blocks(), nets.source_parts.head),
            (nets.destination_parts.stem, nets.destination_parts.blocks(), nets.destination_parts.head))


def _activations(stem: nn.Module, blocks: list, depths: set[int], x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The network's activation after its stem and its first k blocks, for every k in ``depths`` (one forward,
    up to the deepest: :func:`stitching.stitch.shared.outputs_after` on stem + blocks)."""
    return {n - 1: y for n, y in outputs_after([stem, *blocks], {k + 1 for k in depths}, x).items()}


class SharedForward:
    """One forward of each network per batch: the source's activations at the depths asked for, and the
    destination's (the same tensors when the destination is the source network), computed on its own input
    (``into``: the cells' :func:`~stitching.stitch.stitcher.destination_input`, as their ``target`` s)."""

    def __init__(self, nets: Networks, parts: tuple, into: nn.Module | None = None):
        self.src, self.dst = parts          # each (stem, blocks, head)
        self.same = nets.same
        self.into = into if into is not None else nn.Identity()

    def __call__(self, x, src_depths: set[int], dst_depths: set[int]) -> tuple[dict, dict]:
        if self.same:
            acts = _activations(self.src[0], self.src[1], src_depths | dst_depths, x)
            return acts, acts
        hs = _activations(self.src[0], self.src[1], src_depths, x) if src_depths else {}
        ys = _activations(self.dst[0], self.dst[1], dst_depths, self.into(x)) if dst_depths else {}
        return hs, ys


#: the fit's activations kept between its passes up to this many bytes (the sender's and the receiver's at every
#: depth a pass reads, for every fit batch): each pass after the first then runs no network. Past it, the kept
#: batches are dropped and every pass runs both networks again (memory back to one batch's activations).
FIT_CACHE_BYTES = 2 * 2**30


def _passes(cells: list[Cell]) -> list[tuple[list, list]]:
    """Per pass p: (the cells fitting link p: chains longer than p, the cells measured: chains of exactly p)."""
    longest = max(len(c.chain) for c in cells)
    return [([c for c in cells if len(c.chain) > p], [c for c in cells if len(c.chain) == p]) for p in range(longest + 1)]


def _depths(p: int, fitting: list[Cell], measured: list[Cell]) -> tuple[set[int], set[int]]:
    """(sender depths, receiver depths) pass ``p`` reads."""
    return ({c.source_depth for c in fitting + measured},
            {c.points[p][0] for c in fitting} | {c.receiving_depth for c in measured})


@torch.no_grad()
def fit_cells(cells: list[Cell], shared: SharedForward, images, device, stop=None,
              cache_bytes: int = FIT_CACHE_BYTES) -> int:
    """Fit every cell's chain and measure its residual in shared passes over ``images()``; returns the number
    of passes. Pass p fits link p of every chain longer than p and measures the chains of exactly p links.
    The first pass keeps every activation the later passes read while they fit in ``cache_bytes``
    (:data:`FIT_CACHE_BYTES`); the later passes then read them instead of running the networks again (the same
    tensors: the same numbers)."""
    plan = _passes(cells)
    every = [_depths(p, *fm) for p, fm in enumerate(plan)]
    later_src = set().union(*(d[0] for d in every[1:]))
    later_dst = set().union(*(d[1] for d in every[1:]))
    kept: list | None = [] if cache_bytes > 0 and len(plan) > 1 else None
    size = 0
    passes = 0
    filled = False
    for p, (fitting, measured) in enumerate(plan):
        fits = [(c, lsinit.LinkFit(c.built, c.chain, p, c.points[p][1], c.minus if p == len(c.chain) - 1 else None))
                for c in fitting]
        for c, link in [f for f in fits if f[1].skip]:
            c.links.append(link.finish())
        fits = [f for f in fits if not f[1].skip]
        measures = [(c, lsinit.ChainMeasure(c.built, c.chain)) for c in measured]
        if not fits and not measures:
            continue
        src_depths, dst_depths = every[p]
        from_kept = filled and kept is not None
        passes += 1
        try:
            for x in (kept if from_kept else images()):
                if stop is not None:
                    stop.check()
                if from_kept:
                    hs, ys = x
                elif not filled and kept is not None:      # the first pass: also what the later ones read
                    hs, ys = shared(x.to(device), src_depths | later_src, dst_depths | later_dst)
                    size += sum(t.numel() * t.element_size() for t in {id(t): t for t in (*hs.values(),
                                                                                          *ys.values())}.values())
                    if size <= cache_bytes:
                        kept.append((hs, ys))
                    else:
                        kept = None                        # too large: every pass runs the networks
                else:
                    hs, ys = shared(x.to(device), src_depths, dst_depths)
                for c, link in fits:
                    link.update(hs[c.source_depth], ys[c.points[p][0]])
                for c, m in measures:
                    m.update(hs[c.source_depth], ys[c.receiving_depth])
        finally:
            for _, m in measures:
                m.close()
        filled = True                                       # (the first pass that ran kept what it could)
        for c, link in fits:
            c.links.append(link.finish())
        for c, m in measures:
            c.residual = m.finish()
    return passes


@torch.no_grad()
def similarity_cells(cells: list[Cell], shared: SharedForward, images, device, stop=None) -> None:
    """Every cell's similarity at the join, before (source's features vs the destination's own activation:
    CKA and the least-squares residual) and after the fit (the adapters' output vs it: CKA and MSE), in one
    pass; :func:`stitching.stitch.join.similarity_before` / ``similarity_after`` per cell, sharing the
    networks' forward passes."""
    sums = {id(c): {"cka_b": MinibatchCKA(), "ls": LeastSquares(), "cka_a": MinibatchCKA(), "sq": 0.0, "count": 0,
                    "n": 0} for c in cells}
    src_depths = {c.source_depth for c in cells}
    dst_depths = {c.receiving_depth for c in cells}
    for x in images():
        if stop is not None:
            stop.check()
        x = x.to(device)
        hs, ys = shared(x, src_depths, dst_depths)
        for c in cells:
            s = sums[id(c)]
            h, y = hs[c.source_depth], ys[c.receiving_depth]
            view = SimpleNamespace(plan=c.built.plan, target=lambda _, y=y: y,
                                   model=SimpleNamespace(prefix=lambda _, h=h: h, adapters=c.built.model.adapters))
            fmt = c.built.plan.destination_cut.format
            a, b = source_at_join(view, x).float(), destination_at_join(view, x).float()
            after = on_destination_grid(adapted_at_join(view, x).float(), b)
            if x.shape[0] >= 4:
                s["cka_b"].update(a, b)
                s["cka_a"].update(after, b)
            s["ls"].update(channels_last_samples(a, fmt), channels_last_samples(b, fmt))
            s["sq"] += float(((after.double() - b.double()) ** 2).sum())
            s["count"] += after.numel()
            s["n"] += x.shape[0]
    for c in cells:
        s = sums[id(c)]
        c.before = {"cka": s["cka_b"].value() if s["cka_b"].n else float("nan"), "ls_residual": s["ls"].value(),
                    "n": s["n"]}
        c.after = {"cka": s["cka_a"].value() if s["cka_a"].n else float("nan"),
                   "mse": s["sq"] / s["count"] if s["count"] else float("nan"), "n": s["n"]}


@torch.no_grad()
def evaluate_cells(cells: list[Cell], shared: SharedForward, loader, prepare, device, precision: str,
                   channels_last: bool, stop=None) -> None:
    """Every cell's top-1, top-5 (percent) and mean loss on the validation ``loader``, as the trainer's
    evaluation computes them (:func:`stitching.train.evaluation.evaluate`: autocast, float64 sums), the sender's
    forward shared; ``shared`` holds the evaluation copies of the networks (folded, channels-last)."""
    from stitching.train.step import autocast

    sums = {id(c): new_sums(device) for c in cells}
    src_depths = {c.source_depth for c in cells}
    suffixes = {id(c): nn.Sequential(*shared.dst[1][c.receiving_depth:], shared.dst[2]) for c in cells}
    for x, y in loader:
        if stop is not None:
            stop.check()
        x, y = prepare(x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            hs, _ = shared(x, src_depths, set())
        for c in cells:
            with autocast(precision, device):
                logits = suffixes[id(c)](c.built.model.adapters(hs[c.source_depth])).float()
            add_logits(sums[id(c)], logits, y)
    for c in cells:
        c.evaluation = result_of(*sums[id(c)].tolist())
