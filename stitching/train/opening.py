"""The start of a run, before its first step: the device, the batch split, the run directory (named, checked,
locked, its config written, the log opened), the model and the data -- every check before any compute or write
(a :class:`stitching.config.ConfigError`: one line, exit 2).

A pack (:mod:`stitching.train.pack`) starts each of its branches with the same functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from stitching import rundir as R, rundir_lock, rundir_paths
from stitching.config import IDENTITY, Config, ConfigError
from stitching.yamlio import read_yaml
from stitching.data.datasets import build_datasets
from stitching.data.loaders import build_loader
from stitching.data.pipeline import batch_to_device
from stitching.data.transforms import build_transforms
from stitching.kinds import ORIGINAL
from stitching.stitch.lsinit import check_run
from stitching.stitch.stitcher import build_model as build_stitched
from stitching.train import curves
from stitching.train import distributed as D
from stitching.train import ending as E
from stitching.train.trainer import Trainer, log


def resolve_device(cfg: Config) -> torch.device:
    """``train.device``: ``auto`` is CUDA where there is a device, else the CPU; ``cuda`` without one is a
    ConfigError (one line, exit 2), before anything is written."""
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise cfg.error("train.device", "no CUDA device is available here (train.device=auto takes one where "
                                        "there is, else the CPU)")
    return torch.device(name)


def batch_split(cfg: Config, world: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) for the effective ``train.batch_size``; ConfigError if impossible."""
    total, per = cfg.train.batch_size, cfg.train.per_device_batch_size
    if per is None:
        if total % world:
            raise cfg.error("train.batch_size", f"effective batch {total} is not divisible by world size {world}")
        return total // world, 1
    if total % (per * world):
        raise cfg.error("train.batch_size", f"effective batch {total} is not divisible by per_device_batch_size "
                        f"{per} x world size {world} (gradient accumulation must be a whole number)")
    return per, total // (per * world)


def run_dir_path(cfg: Config, run_dir: str | Path | None = None) -> tuple[Path, str]:
    """The run directory, canonical (:func:`stitching.rundir_paths.canonical`: absolute, symlinks followed, ``..``
    applied), and how it was chosen (``""``: given). ``run_dir`` or ``output.dir`` when given; else the run names
    its own: ``runs/<config name>/<run name>`` (:func:`stitching.rundir.run_dir_name`, as a sweep names its
    runs), so another key on the command line is another directory and the same command finds the same one
    again -- unless ``runs/<config name>``, an earlier version's default, holds this very run (reused). A path
    that cannot be a directory is a ConfigError on ``output.dir``."""
    given = run_dir or cfg.output.dir
    how = ""
    if not given:
        stem = Path(cfg.path).stem if cfg.path else None
        older = Path(R.RUNS) / stem if stem else None
        if older is not None and _holds_run(older, cfg):
            given, how = older, "an earlier version's default for this config, holding this run: reused"
        else:
            given = Path(R.RUNS, *([stem] if stem else []), R.run_dir_name(cfg, IDENTITY))
            how = "named by the run's identity, as a sweep names its runs; output.dir=DIR chooses another"
    try:
        return rundir_paths.canonical(given), how
    except R.PathError as err:
        raise ConfigError("output.dir", str(given), cfg.source_of("output.dir"), str(err)) from None


def _holds_run(path: Path, cfg: Config) -> bool:
    """Whether ``path`` is a run directory whose ``config.yaml`` is the run of ``cfg``."""
    try:
        old = read_yaml(path / R.CONFIG)
    except ConfigError:
        return False
    return isinstance(old, dict) and R.same_run(old, cfg.to_dict(), IDENTITY)


def loaders(r: Trainer, train_ds, val_ds) -> tuple:
    """(train loader or None without training, this rank's validation loader)."""
    cfg, info = r.cfg, r.info
    pin = r.device.type == "cuda"
    train = build_loader(train_ds, r.per_device, True, cfg.train.seed, cfg.data.workers, info.rank,
                         info.world_size, pin_memory=pin) if r.epochs > 0 else None
    val = build_loader(torch.utils.data.Subset(val_ds, range(info.rank, len(val_ds), info.world_size)),
                       r.per_device, False, cfg.train.seed, cfg.data.workers, pin_memory=pin)
    return train, val


def already_finished(r: Trainer, force: bool) -> bool:
    """The run directory's state, decided before anything is written (and again once its lock is held,
    :func:`open_rundir`): a different run's directory, finished or not (ConfigError), or this run finished
    (skip)."""
    cfg, path = r.cfg, r.rundir.path
    if r.rundir.config.is_file() and not force:     # first: a finished *other* run is no reason to exit 0
        try:
            old = read_yaml(r.rundir.config) or {}  # (bounded: an alias bomb there is one line, exit 2)
            diff = R.differing_keys(old, cfg.to_dict(), IDENTITY) if isinstance(old, dict) else None
        except ConfigError as err:                  # unreadable, not UTF-8, not YAML, too large
            diff, why = None, err.message
        else:
            why = "not a mapping"
        if diff != []:                                      # []: the same run
            what = f"differs in {', '.join(diff)}" if diff else f"its {R.CONFIG} is not a readable run config: {why}"
            raise ConfigError("output.dir", str(path), cfg.source_of("output.dir"),
                              f"holds a different run ({what}); "
                              "choose another output.dir or pass --force (the old files are kept in previous/)")
    if r.rundir.finished and not force:
        if r.info.is_main:
            print(f"run already finished: results in {r.rundir.result} (pass --force to redo it)")
        return True
    return False


def build(r: Trainer) -> tuple:
    """The model and the datasets, every check before any compute or write (ConfigError); (train, val)."""
    return build_data(r, *build_model(r))


def build_model(r: Trainer) -> tuple:
    """The model (``torch.manual_seed(train.seed)`` first: the adapters' initial weights, random networks) and the
    transforms, ``r.to_device``; (train transform, eval transform)."""
    cfg = r.cfg
    torch.manual_seed(cfg.train.seed)
    try:
        r.built = build_stitched(cfg.model, cfg.data.img_size, cfg.num_classes, frozen_bn=cfg.train.frozen_bn,
                                  normalize=cfg.data.normalize)
    except (ValueError, FileNotFoundError) as err:
        key = getattr(err, "key", None) or ("model.destination_weights" if "destination" in str(err)
                                            else "model.source_weights")
        raise cfg.error(key, str(err).splitlines()[0]) from None
    check_run(cfg, r.built)             # model.init=least_squares: a target for every link (traced shapes)
    train_tf, eval_tf = build_transforms(r.built.data_config, cfg.data, r.device)   # uint8 out, finished on the device
    r.to_device = (batch_to_device(train_tf, r.device), batch_to_device(eval_tf, r.device))
    return train_tf, eval_tf


def build_data(r: Trainer, train_tf, eval_tf) -> tuple:
    """The datasets and the run's steps (checked: ConfigError); (train, val)."""
    cfg = r.cfg
    try:
        train_ds, val_ds = build_datasets(dataclasses.replace(cfg.data, num_classes=cfg.num_classes), train_tf,
                                          eval_tf)
    except (FileNotFoundError, ValueError) as err:
        raise cfg.error("data.root" if cfg.data.name == "imagefolder" else "data.name", str(err)) from None
    classes = getattr(train_ds, "classes", None)
    if classes is not None and len(classes) != cfg.num_classes:
        raise cfg.error("data.num_classes", f"{len(classes)} class folders found in {cfg.data.root}/train")
    r.steps_per_epoch = len(train_ds) // cfg.train.batch_size
    if cfg.train.max_steps_per_epoch:
        r.steps_per_epoch = min(r.steps_per_epoch, cfg.train.max_steps_per_epoch)
    if r.epochs > 0 and r.steps_per_epoch < 1:
        raise cfg.error("train.batch_size", f"larger than the {len(train_ds)} training images")
    if r.epochs > 0 and r.built.kind == ORIGINAL and not any(p.requires_grad for p in r.model.parameters()):
        raise cfg.error("train.epochs", "nothing to train")
    r.total_steps = max(1, r.epochs * r.steps_per_epoch)
    return train_ds, val_ds


def open_rundir(r: Trainer, force: bool) -> bool:
    """Now the run directory may be touched: one trainer at a time (its lock); then, the lock held, what it
    holds is decided again (another trainer may have written it since the first look, while this one built its
    model and data: a different run is refused, this run finished is skipped -- True); earlier files moved aside
    on ``--force``, the resolved config written, the log opened."""
    verdict = None          # None: go on; "finished"; or a different run's ConfigError, as its fields
    if r.info.is_main:
        try:
            r.rundir.path.mkdir(parents=True, exist_ok=True)
            r.lock = rundir_lock.run_lock(r.rundir.path)
            r.lock.acquire()
        except OSError as err:
            raise R.WriteError(f"cannot write {r.rundir.path}: {err.strerror or err} (errno {err.errno}); "
                               "nothing was written") from err
        try:
            verdict = "finished" if already_finished(r, force) else None
        except ConfigError as err:
            verdict = (err.key, err.value, err.source, err.message)
    verdict = D.broadcast_object(verdict, r.info)
    if verdict is not None:
        if r.lock is not None:
            r.lock.release()        # before anything is written (no state.json: the directory is not ours)
        if verdict == "finished":
            return True
        raise ConfigError(*verdict)
    if r.info.is_main:
        if force:
            moved = r.rundir.archive()
            if moved:
                print(f"--force: earlier files moved to {moved}")
        r.rundir.write_text(R.CONFIG, r.cfg.to_yaml())
        r.logging_was = E.setup_logging(r.rundir.file(R.LOG))
        if r.lock.took_over:
            log.info("took over the stale lock of pid %s on host %s (that process is gone)",
                     r.lock.took_over.get("pid"), r.lock.took_over.get("host"))
        r.previous = r.rundir.read_state()       # how the last trainer ended (said when resuming)
        r.rundir.write_state(R.STARTED)
        r.trackers = curves.Curves(r.cfg, r.rundir.path) if r.cfg.output.log_to else None
    D.barrier(r.info)
    return False
