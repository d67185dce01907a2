"""A sweep's runs grouped into packs (``--pack K``) and what packing saves.

Owns :func:`pack_runs` -- the runs that :func:`stitching.validate.pack_key` puts together (same source, data,
seed, epochs, batch, device, precision), at most ``K`` to a pack, each group split into packs of even sizes
in the order of their source cut, so a pack's runs need prefixes of similar depth; a run that trains alone
(an original model, ``train.compile``) is a pack of its own; ``K = 1`` is one run per job, as before packs --
and :func:`savings`, the dry run's totals separate vs packed (:func:`describe`): jobs, passes over the training
data (a job reads it once per epoch) and the GMACs of the frozen source prefixes per training image (a pack
runs its deepest prefix once; fine-tuning runs have no frozen prefix), counted by :mod:`stitching.stitch.cost`
on the meta device (no weights read).

A pack is one SLURM task or one local job (:mod:`stitching.launch.slurm`, :mod:`stitching.launch.local`): a run
directory, or a pack's list of them (:func:`job_of`, :func:`runs_in`; :func:`check_pack` refuses ``K < 1``), so
``K`` also bounds how far a study spreads: packs of 16 on a study of 1,738 runs make ~120 jobs, as many GPUs as
one may want at once.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from stitching.config import Config, ConfigError
from stitching.kinds import STITCHED
from stitching.validate import pack_key
from stitching.stitch.cost import StitchCost, stitch_cost


def _cut_order(cfg: Config) -> tuple:
    m = cfg.model
    return (0, m.source_stage) if m.source_stage is not None else (1, m.source_block if m.source_block is not None
                                                                   else -1)


def check_pack(k: int) -> None:
    """``--pack K``: at least 1 (a ConfigError naming the option otherwise)."""
    if k < 1:
        raise ConfigError("--pack", k, "command line", "must be >= 1 (runs per job; 1: one run per job)")


def pack_runs(runs: list, k: int) -> list[list]:
    """``runs`` (anything with a ``.config``) as packs of at most ``k``: per pack key, in the order of the source
    cut, split into ``ceil(n / k)`` packs of sizes differing by at most one; packs in the order of their first
    run. ``k < 1`` is an error (ValueError)."""
    if k < 1:
        raise ValueError(f"--pack must be >= 1, not {k}")
    groups: OrderedDict = OrderedDict()
    for i, run in enumerate(runs):
        key = pack_key(run.config.to_dict()) if k > 1 else None
        groups.setdefault(key if key is not None else ("alone", i), []).append(run)
    packs = []
    for members in groups.values():
        members = sorted(members, key=lambda r: _cut_order(r.config))
        n = math.ceil(len(members) / k)
        size, extra = divmod(len(members), n)
        start = 0
        for j in range(n):
            stop = start + size + (j < extra)
            packs.append(members[start:stop])
            start = stop
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(packs, key=lambda p: min(order[id(r)] for r in p))


def job_of(pack: list):
    """A launcher's job of a pack (runs with a ``.config``): one run directory, or a pack's list of them."""
    dirs = [r.config.output.dir for r in pack]
    return dirs[0] if len(dirs) == 1 else dirs


def runs_in(tasks) -> int:
    """How many runs a list of launcher jobs or SLURM tasks holds (a run directory, or a pack's list or tuple)."""
    return sum(len(t) if isinstance(t, (list, tuple)) else 1 for t in tasks)


def shared_prefix_macs(cfg: Config, cost: StitchCost | None = None) -> int:
    """MACs per image of ``cfg``'s frozen source prefix (its stem and the blocks before the cut, as
    :func:`stitching.stitch.cost.stitch_cost` counts them on the meta device; ``cost``: that count, made already),
    the part of its work a pack runs once for all its runs; 0 for a run without one (original, fine-tuning, frozen
    parts in train mode: the source part is trained or recomputed, not shared)."""
    if cfg.train.frozen_bn != "eval":
        return 0
    cost = cost or stitch_cost(cfg.model, cfg.data.img_size, cfg.num_classes)
    return cost.prefix if cost.kind == STITCHED else 0


def prefix_gmacs(cfg: Config) -> float:
    """:func:`shared_prefix_macs` in GMACs."""
    return shared_prefix_macs(cfg) / 1e9


def savings(runs: list, packs: list[list]) -> dict:
    """Totals of ``runs`` trained one per job and as ``packs``: ``{"jobs": (separate, packed), "data_passes":
    ..., "prefix_gmacs": ...}`` (module docstring)."""
    def passes(r) -> int:
        return r.config.train.epochs

    prefix = {id(r): prefix_gmacs(r.config) for r in runs}
    return {
        "jobs": (len(runs), len(packs)),
        "data_passes": (sum(passes(r) for r in runs), sum(max(passes(r) for r in p) for p in packs)),
        "prefix_gmacs": (sum(prefix.values()), sum(max(prefix[id(r)] for r in p) for p in packs)),
    }


def describe(totals: dict, k: int) -> str:
    """The dry run's lines for :func:`savings`."""
    rows = [("jobs (SLURM tasks or local jobs)", "jobs", "{:,.0f}"),
            ("passes over the training data (jobs x epochs)", "data_passes", "{:,.0f}"),
            ("frozen source prefix per training image, GMACs", "prefix_gmacs", "{:,.1f}")]
    lines = [f"packs (--pack {k}): runs that share a source, data, seed and recipe train together, one data pass"]
    lines.append(f"  {'':48}{'separate':>12}{'packed':>12}{'ratio':>8}")
    for label, key, fmt in rows:
        a, b = totals[key]
        ratio = f"{a / b:.1f}x" if b else "-"
        lines.append(f"  {label:48}{fmt.format(a):>12}{fmt.format(b):>12}{ratio:>8}")
    return "\n".join(lines)
