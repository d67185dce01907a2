"""Sweep files and their expansion into runs.

A sweep file is one block, or a list of ``blocks:``, each with

``base``     a run config (path relative to the sweep file) the runs build on;
``grid``     dotted config keys mapped to lists of values -- the runs are their product (a one-element
             list fixes a value);
``exclude``  optional rules: a mapping of dotted keys to a value (or list of values); a run matching every
             key of a rule is left out;
``slurm``    optional resources for ``--launcher slurm`` (see :class:`stitching.launch.slurm.SlurmResources`);
``extension`` optional: one line saying why the block goes past the reproduced study (e.g. "the paper's code
             has no conv3x3 without resizing"). Blocks without it are the *paper part*.

Top-level ``base``/``exclude``/``slurm`` are defaults for every block; top-level ``extensions: false``
switches every extension block off (``python -m stitching.sweep --paper-only`` / ``--extensions`` override
it). The paper part is expanded first, so an extension run that builds the same module as a paper run is
the duplicate, never the other way round, and the paper part's runs are the same with extensions on or off.
Expansion validates each run like ``stitching.train`` would (an impossible combination -- stage 3 -> 2, strided
linear adapters, fine-tuning across architectures, a gap whose blocks do not join -- is dropped and counted with its
reason) and drops duplicates: runs that build the same module (equal stitch-plan signatures, e.g. the
three resize modes where sizes already match) with the same recipe. Each run gets a stable directory name
(:func:`stitching.rundir.run_dir_name`: a readable prefix + the hash of its identity), so expanding the same
sweep again finds the same directories: finished runs are skipped, unfinished ones resume. A directory written
by a version whose key differed (the key of every run changed once when identities started to leave out keys at their
baseline; see :mod:`stitching.rundir`) is found by its name without the key and its ``config.yaml``
(:func:`stitching.rundir.same_run`), and reused under its old name (:attr:`Expansion.reused`; the sweep says
so).
"""

from __future__ import annotations

import itertools
import json
import math
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from stitching.config import IDENTITY, SECTIONS, Config, ConfigError
from stitching.launch.slurm import resources
from stitching.yamlio import parse_value, read_yaml
from stitching.kinds import FINETUNE, ORIGINAL
from stitching.validate import load_config, validate
from stitching.rundir import RUN_KEY_CHARS, identity, run_dir_name

SWEEP_KEYS = {"name", "base", "grid", "exclude", "slurm", "blocks", "extensions"}
BLOCK_KEYS = {"name", "base", "grid", "exclude", "slurm", "extension"}
PAPER, EXTENSION = "paper", "extension"        # the two parts of a sweep


class SweepError(ConfigError):
    pass


@dataclass
class Block:
    name: str
    base: Path
    grid: dict
    exclude: list
    slurm: dict
    extension: str | None = None    # why this block goes past the paper (None: the paper part)

    @property
    def part(self) -> str:
        return EXTENSION if self.extension else PAPER


@dataclass
class Run:
    name: str
    block: str
    config: Config
    key: tuple = field(repr=False)
    part: str = PAPER
    #: grid points this run stands for: its own first, then every duplicate that builds the same module
    #: with the same recipe (their rows are this run's row, shared under their resize mode)
    points: list[dict] = field(default_factory=list, repr=False)

    @property
    def pair(self) -> str:
        return _describe(self.config)["pair"]

    @property
    def method(self) -> str:
        return method_of(self.config)

    @property
    def shared(self) -> list[dict]:
        """The duplicates' grid points, each with the ``part`` it came from and its ``method``."""
        return self.points[1:]


def method_of(cfg: Config) -> str:
    """The sweep table's column: ``adapter/resize``, ``finetune`` or ``original``."""
    m = cfg.model
    if cfg.is_original:
        return ORIGINAL
    if m.adapter == FINETUNE:
        return FINETUNE
    return f"{m.adapter}/{m.resize}"


@dataclass
class Expansion:
    runs: list[Run]
    excluded: Counter          # (block, rule) -> count
    impossible: Counter        # (block, reason) -> count
    duplicates: Counter        # (block, "same as <run>") -> count
    total: int                 # grid points before dropping (of the blocks expanded)
    extensions: bool = True    # whether the extension blocks were expanded
    skipped: Counter = field(default_factory=Counter)   # extension block -> grid points not expanded
    #: (this version's name, the existing directory reused): the same run, named by an older version's key
    reused: list = field(default_factory=list)

    def part(self, part: str) -> list[Run]:
        return [r for r in self.runs if r.part == part]


def read_spec_file(path: Path, what: str, keys, error: type) -> dict:
    """The mapping a ``what`` file (sweep, matrix) holds, its top-level keys among ``keys``; otherwise
    ``error(key, value, file, message)`` (a :class:`stitching.config.ConfigError`): the file is missing, not
    YAML, not a mapping, or has an unknown key."""
    src = str(path)
    if not path.is_file():
        raise error(what, src, "command line", "file not found")
    try:
        data = read_yaml(path) or {}
    except ConfigError as err:      # unreadable, too large, not YAML (within stitching.config's bounds)
        raise error(err.key, err.value, err.source, err.message) from None
    if not isinstance(data, dict):
        raise error("", None, src, f"a {what} file must be a mapping")
    for key in data:
        if key not in keys:
            raise error(key, data[key], src, f"unknown key; a {what} takes {', '.join(keys)}")
    return data


def load_sweep(path: str | Path) -> tuple[str, list[Block], bool]:
    """(name, blocks, whether the extension blocks are on) of the sweep file at ``path``."""
    path = Path(path)
    src = str(path)
    data = read_spec_file(path, "sweep", sorted(SWEEP_KEYS), SweepError)
    defaults = {k: data[k] for k in ("base", "exclude", "slurm") if k in data}
    extensions = data.get("extensions", True)
    if not isinstance(extensions, bool):
        raise SweepError("extensions", extensions, src, "must be true or false (switches the extension blocks)")
    raw_blocks = data.get("blocks")
    if raw_blocks is None:
        raw_blocks = [{k: v for k, v in data.items() if k in BLOCK_KEYS}]
    if not isinstance(raw_blocks, list) or not raw_blocks:
        raise SweepError("blocks", raw_blocks, src, "must be a non-empty list of blocks")
    blocks = []
    for i, raw in enumerate(raw_blocks):
        if not isinstance(raw, dict):
            raise SweepError(f"blocks[{i}]", raw, src, "must be a mapping")
        for key in raw:
            if key not in BLOCK_KEYS:
                raise SweepError(f"blocks[{i}].{key}", raw[key], src,
                                 f"unknown key; a block takes {', '.join(sorted(BLOCK_KEYS))}")
        name = str(raw.get("name", f"block{i}"))
        base = raw.get("base", defaults.get("base"))
        if not isinstance(base, str):
            raise SweepError(f"{name}.base", base, src, "every block needs a base run config (a relative path)")
        if not (path.parent / base).is_file():
            raise SweepError(f"{name}.base", base, src, f"file not found ({path.parent / base})")
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict):
            raise SweepError(f"{name}.grid", grid, src, "must map dotted config keys to lists of values")
        for key, values in grid.items():
            section, _, field_ = str(key).partition(".")
            if section not in SECTIONS or field_ not in {f for f in SECTIONS[section].__dataclass_fields__}:
                raise SweepError(f"{name}.grid.{key}", values, src, "not a config key (section.key)")
            if not isinstance(values, list) or not values:
                raise SweepError(f"{name}.grid.{key}", values, src, "must be a non-empty list of values")
        exclude = list(defaults.get("exclude") or []) + list(raw.get("exclude") or [])
        for rule in exclude:
            if not isinstance(rule, dict) or not rule:
                raise SweepError(f"{name}.exclude", rule, src, "each rule maps dotted keys to values")
        slurm = {**(defaults.get("slurm") or {}), **(raw.get("slurm") or {})}
        extension = raw.get("extension")
        if extension is not None and (not isinstance(extension, str) or not extension.strip()):
            raise SweepError(f"{name}.extension", extension, src,
                             "must be one line saying why the block goes past the paper")
        blocks.append(Block(name, path.parent / base, grid, exclude, slurm, extension))
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise SweepError("blocks", names, src, "block names must be unique")
    return str(data.get("name", path.stem)), blocks, extensions


def expand(path: str | Path, runs_dir: str | Path, extensions: bool | None = None
           ) -> tuple[str, list[Block], Expansion]:
    """Every run of the sweep at ``path``, validated, with impossible and duplicate runs dropped.

    ``extensions``: expand the extension blocks (None: as the sweep file's ``extensions`` switch says).
    The paper part comes first (see the module docstring)."""
    name, blocks, switch = load_sweep(path)
    return name, blocks, expand_blocks(blocks, runs_dir, switch if extensions is None else extensions, str(path))


def expand_blocks(blocks: list[Block], runs_dir: str | Path, extensions: bool = True, src: str = "sweep"
                  ) -> Expansion:
    """:func:`expand` of blocks already read (a sweep file's, or blocks another command generates, e.g. a
    stitching matrix's); ``src`` names where they come from in error messages."""
    from stitching.stitch.plan import plan_config

    runs, seen = [], {}
    excluded, impossible, duplicates, skipped = Counter(), Counter(), Counter(), Counter()
    older, read, reused = _named_by_key(runs_dir), {}, []
    total = 0
    for block in sorted(blocks, key=lambda b: b.part != PAPER):      # stable: file order within a part
        if block.extension and not extensions:
            skipped[block.name] = math.prod(len(v) for v in block.grid.values())
            continue
        keys = list(block.grid)
        for values in itertools.product(*(block.grid[k] for k in keys)):
            total += 1
            point = dict(zip(keys, values))
            rule = _matching_rule(block, point)
            if rule is not None:
                excluded[(block.name, rule)] += 1
                continue
            # unknown keys and wrong types are mistakes in the files: they stop the sweep (ConfigError)
            cfg = load_config(block.base, updates=point, updates_source=src, check=False)
            try:
                validate(cfg)       # an impossible combination is dropped and counted
            except ConfigError as err:
                impossible[(block.name, f"{err.key}: {err.message.split(';')[0]}")] += 1
                continue
            m = cfg.model
            if cfg.is_original:
                structure = (ORIGINAL, m.source)
            else:
                structure = plan_config(m, cfg.data.img_size).signature()
            # the recipe: the run's identity (keys it never reads left out) without what the structure says
            recipe = {k: v for k, v in identity(cfg.to_dict(), IDENTITY).items() if k not in _STRUCTURE_KEYS}
            key = (structure, json.dumps(recipe, sort_keys=True, default=str))
            run_name = run_dir_name(cfg, IDENTITY)
            here = {**_describe(cfg), "part": block.part, "block": block.name}
            if key in seen:
                kept = seen[key]
                first = kept.points[0]["grid"]
                differ = sorted(k for k in set(point) | set(first) if point.get(k) != first.get(k))
                duplicates[(block.name, f"differs from a kept run only in {', '.join(differ) or 'nothing'}, "
                                        "which changes nothing in the built model or recipe")] += 1
                kept.points.append({**here, "grid": point})
                continue
            path = Path(runs_dir) / run_name
            if not path.exists():
                found = _same_run_dir(cfg, older.get(_without_key(run_name), []), read)
                if found is not None:
                    older[_without_key(run_name)].remove(found)
                    reused.append((run_name, found))
                    path = found
            cfg.output.dir = str(path)
            seen[key] = run = Run(path.name, block.name, cfg, key, block.part, [{**here, "grid": point}])
            runs.append(run)
    return Expansion(runs, excluded, impossible, duplicates, total, extensions, skipped, reused)


#: the keys a stitch plan's signature (or an original's ``(ORIGINAL, source)``) already stands for
_STRUCTURE_KEYS = frozenset(f"model.{k}" for k in ("source", "destination", "source_stage", "destination_stage",
                                                   "source_block", "destination_block", "adapter", "resize",
                                                   "schedule"))


def _without_key(name: str) -> str:
    """A run directory's name without its run-key suffix (``<head>.<key>``, :func:`stitching.rundir.run_key`),
    or ``""`` if it has none."""
    head, dot, key = name.rpartition(".")
    return head if dot and len(key) == RUN_KEY_CHARS and all(c in "0123456789abcdef" for c in key) else ""


def _named_by_key(runs_dir: str | Path) -> dict[str, list[Path]]:
    """The run directories already in ``runs_dir`` (holding a ``config.yaml``), by name without the key."""
    from stitching.rundir import CONFIG

    found: dict[str, list[Path]] = {}
    root = Path(runs_dir)
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if _without_key(d.name) and (d / CONFIG).is_file():
            found.setdefault(_without_key(d.name), []).append(d)
    return found


def _same_run_dir(cfg: Config, candidates: list[Path], read: dict) -> Path | None:
    """The directory among ``candidates`` (same name but the key) whose ``config.yaml`` holds the same run as
    ``cfg``: a directory written by a version whose run key differed (a key added since, or the one-time change
    to keys at their baseline), reused instead of training the run again under the new name. A finished one
    first, then one with a checkpoint, then by name. ``read``: the configs read so far, by directory."""
    from stitching import rundir as R

    same = []
    for d in candidates:
        if d not in read:
            try:
                read[d] = read_yaml(d / R.CONFIG)
            except ConfigError:          # unreadable, too large, not YAML: not the same run
                read[d] = None
        if isinstance(read[d], dict) and R.same_run(read[d], cfg.to_dict(), IDENTITY):
            same.append(d)
    rank = {R.FINISHED: 0, R.PREEMPTED: 1, R.INTERRUPTED: 1, R.STARTED: 1, R.FAILED: 2, R.NEW: 3}
    return min(same, key=lambda d: (rank[R.status(d)], d.name), default=None)


def _describe(cfg: Config) -> dict:
    """What a grid point is, for tables: pair, method, gap, lr, seed."""
    m = cfg.model
    pair = m.source if cfg.is_original else f"{m.source} -> {m.destination or m.source}"
    from stitching.stitch.plan import cut_label

    gap = "" if cfg.is_original else cut_label(m)
    return {"pair": pair, "method": method_of(cfg), "gap": gap, "lr": cfg.train.lr, "seed": cfg.train.seed}


def _matching_rule(block: Block, point: dict) -> str | None:
    for i, rule in enumerate(block.exclude):
        def matches(key, want):
            have = point.get(key, _UNSET)
            if have is _UNSET:
                return False
            return have in want if isinstance(want, list) else have == want
        if all(matches(k, v) for k, v in rule.items()):
            return f"exclude rule {i + 1} ({', '.join(f'{k}={v}' for k, v in rule.items())})"
    return None


_UNSET = object()


def slurm_groups(runs: list[Run], blocks, overrides: list[str]) -> dict[str, tuple]:
    """The runs by job array: ``{key: (SlurmResources, runs)}``, one per distinct set of resources (a block's
    ``slurm:`` with the ``--slurm key=value`` overrides, each typed by the resource it sets, as section.key=value
    is); one submission (one or more job arrays) per group; ConfigError for a malformed override or resource."""
    extra = {}
    fields = typing.get_type_hints(resources.SlurmResources)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--slurm", item, "command line", "write --slurm key=value")
        # typed by the resource it sets, as section.key=value is (an unknown key is named by from_dict)
        extra[key] = parse_value(fields[key], value, f"--slurm {key}") if key in fields else value
    groups: dict[str, tuple[resources.SlurmResources, list[Run]]] = {}
    by_block = {b.name: b for b in blocks}
    for run in runs:
        spec = {**by_block[run.block].slurm, **extra}
        try:
            res = resources.SlurmResources.from_dict(spec, source=f"slurm resources of block {run.block}")
        except ValueError as err:
            raise ConfigError("slurm", spec, "sweep", str(err)) from None
        groups.setdefault(repr(res), (res, []))[1].append(run)
    return groups
