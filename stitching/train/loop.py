"""The training run: the paper's recipe from a config to a finished run directory.

AdamW (lr 0.002, weight decay 0.05 by default) over the *trainable* parameters only, cosine annealing to 0
stepped per optimizer step (or per epoch), effective batch = per-device batch x world size x gradient
accumulation, the precision ``auto`` resolves to and the CUDA settings (:mod:`stitching.train.perf`: bf16
autocast from compute capability 8.0, fp16 with a gradient scaler below, fp32 on CPU; cuDNN autotuning, TF32,
fused AdamW), channels_last and BatchNorm folding of frozen parts (:mod:`stitching.stitch.fast`) and optional
``torch.compile``. The step itself is
:func:`stitching.train.step.train_step`. Evaluation after every epoch (top-1, top-5, loss), reduced exactly
over ranks. The run directory is :mod:`stitching.rundir`'s: one trainer holds it (its ``lock``), a
checkpoint is written atomically after every epoch and when a stop signal arrives (:mod:`stitching.train.stop`:
at the next optimizer step, or after the current evaluation batch; SIGTERM/SIGUSR1 exit with
``EXIT_PREEMPTED``, rank 0 having created ``$STITCHING_REQUEUE_FILE`` if set, Ctrl-C with
``EXIT_INTERRUPTED``, a second Ctrl-C at once); running the same command again resumes from it, mid-epoch
included, and reproduces an uninterrupted run's numbers. A NaN/Inf loss stops the run (``EXIT_NONFINITE``)
without a result and without overwriting the last good checkpoint; a file that cannot be written (disk full,
a directory that became unwritable) stops it with ``EXIT_IO``, earlier files intact, ``state.json`` and the
lock updated as far as the directory allows.

Reading order: :func:`run` (outcome -> exit code) -> :func:`_start` (:func:`_already_finished`,
:func:`_build`, :func:`_open_rundir`, :func:`build_step`, :func:`_resume`) -> :func:`_train` (epochs) ->
:func:`_train_epoch` -> :func:`_end_epoch` / :func:`_stop` -> :func:`_finish`; :func:`_close`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stitching import rundir as R
from stitching.config import IDENTITY, Config, ConfigError, read_yaml
from stitching.validate import check_files, load_config
from stitching.results.recipe import recipe_columns, resize_modes
from stitching.results.schema import METRICS_COLUMNS, RESULT_COLUMNS
from stitching.train import checkpoint as C
from stitching.train import curves
from stitching.train import distributed as D
from stitching.train import perf as P
from stitching.train import measure
from stitching.train import stop as S
from stitching.train.objective import Objective, train_macs
from stitching.train.step import StepState, autocast, train_step

log = logging.getLogger("stitching.train")


class NonFiniteLoss(R.RunDirError):
    exit_code = R.EXIT_NONFINITE


# ------------------------------------------------------------------------------------------- set-up
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
    """The run directory, canonical (:func:`stitching.rundir.canonical`: absolute, symlinks followed, ``..``
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
        return R.canonical(given), how
    except R.PathError as err:
        raise ConfigError("output.dir", str(given), cfg.source_of("output.dir"), str(err)) from None


def _holds_run(path: Path, cfg: Config) -> bool:
    """Whether ``path`` is a run directory whose ``config.yaml`` is the run of ``cfg``."""
    try:
        old = read_yaml(path / R.CONFIG)
    except ConfigError:
        return False
    return isinstance(old, dict) and R.same_run(old, cfg.to_dict(), IDENTITY)


def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclasses.dataclass
class Run:
    """Everything a run holds between its start and its end (built by :func:`_start`)."""

    cfg: Config
    rundir: R.RunDir
    info: D.DistInfo
    device: torch.device
    lock: R.Lock | None = None
    built: object = None                    # stitching.stitch.stitcher.BuiltModel
    cost: dict = dataclasses.field(default_factory=dict)
    steps_per_epoch: int = 0
    total_steps: int = 0
    per_device: int = 1
    accum: int = 1
    precision: str = "fp32"
    train_loader: object = None
    val_loader: object = None
    st: StepState | None = None
    pos: dict = dataclasses.field(default_factory=lambda: {"epoch": 0, "batch": 0, "step": 0, "wall": 0.0,
                                                           "train_time": 0.0, "train_images": 0,
                                                           "sums": [0.0, 0.0, 0.0]})
    metrics: list = dataclasses.field(default_factory=list)
    started: float = 0.0                    # wall clock of the last time accounting
    val_set: object = None                  # the whole validation set (the similarity at the join reads it)
    objective: object = None                # stitching.train.objective.Objective
    stop: S.StopSignals | None = None       # installed while training (stitching.train.stop)
    previous: dict = dataclasses.field(default_factory=dict)    # state.json as the last trainer left it
    saved: str = ""                         # where the last checkpoint written or loaded stands (words)
    ending: str = ""                        # how this trainer stopped, for state.json (a stop signal)
    to_device: tuple = (None, None)         # (train, eval) batch -> device (stitching.data.pipeline.batch_to_device)
    pack: str = ""                          # the pack it trains in (stitching.train.pack; result.csv's pack column)
    trackers: curves.Curves | None = None   # output.log_to: where the curves also go (the main process only)
    logging_was: tuple | None = None        # the trainer's log as it was before this run (_setup_logging)

    @property
    def model(self) -> nn.Module:
        return self.built.model

    @property
    def epochs(self) -> int:
        return self.cfg.train.epochs

    def checkpointed(self) -> nn.Module:
        return C.checkpointed_module(self.model, self.built.kind, getattr(self.cfg.train, "frozen_bn", "eval"))

    def say(self, msg: str, *args) -> None:
        if self.info.is_main:
            log.info(msg, *args)


# ------------------------------------------------------------------------------------------ the run
def run(cfg: Config, run_dir: Path | None = None, force: bool = False, exiting: bool = False) -> int:
    """Train/evaluate ``cfg`` into ``run_dir``; returns the process exit code (:mod:`stitching.rundir`).
    ``exiting``: the caller exits with that code next (the command line: after a stop, the stop signals'
    handlers stay until then, :meth:`stitching.train.stop.StopSignals.restore`)."""
    from stitching.data.images import BadImageError

    check_files(cfg)
    curves.check_installed(cfg)
    device = resolve_device(cfg)
    path, how = run_dir_path(cfg, run_dir)
    info = D.init(device.type)
    if how and info.is_main:
        print(f"run directory: {path} ({how})", flush=True)
    r = Run(cfg, R.RunDir(path), info, device)
    code, message, error, aborted = R.EXIT_FAILED, R.UNEXPECTED, None, False
    try:
        code = _start(r, force)
        if code is None:
            code = _train(r)
        message = r.ending or R.describe_exit(code)
        return code
    except BadImageError as err:  # met while loading (also when re-raised from a DataLoader worker)
        hint = " (data.bad_images=skip leaves such files out)" if cfg.data.bad_images == "error" else ""
        code, message = R.EXIT_CONFIG, err.message + hint
        raise cfg.error("data.root", err.message + hint) from None
    except ConfigError as err:
        code, message = R.EXIT_CONFIG, str(err)
        raise
    except R.RunDirError as err:
        code, message = err.exit_code, str(err)
        error = message
        return code
    except KeyboardInterrupt as err:    # Ctrl-C while starting up, or a second one (stitching.train.stop)
        aborted = isinstance(err, S.Aborted)
        code, message = R.EXIT_INTERRUPTED, _interrupted(r, aborted)
        return code
    finally:
        if r.stop is not None:
            r.stop.restore(exiting)
        note = _close(r, code, message)
        if info.is_main and (error or note):
            print(f"error: {error}{note}" if error else f"warning: {note[2:]}", file=sys.stderr)
        if r.logging_was is not None:
            _restore_logging(r.logging_was)
        if not (aborted and info.enabled):  # (other ranks may be gone mid-collective: no goodbye with them)
            D.shutdown()


def _close(r: Run, code: int, message: str) -> str:
    """Close the run's curves (``output.log_to``), say in ``state.json`` how this trainer ended and give the lock
    back, as far as the run directory still allows (it may have become unwritable); what could not be done, as
    words for the error line ("" if all went well)."""
    if r.trackers is not None:
        r.trackers.close()
        r.trackers = None
    if r.lock is None or not r.lock.held:
        return ""
    wrote = r.rundir.write_state(R.status_of_exit(code), code, message)
    released = r.lock.release()
    if wrote and released:
        return ""
    said = r.rundir.read_state().get("status")
    notes = [] if wrote else [f"{R.STATE} could not be updated (it still says {said!r})"]
    if not released:
        marked = "marked released" if r.lock.read().get("released") else "left as it was"
        notes.append(f"the lock could not be removed ({marked}; the next trainer takes it over, this process "
                     "being gone)")
    return f"; {r.rundir.path} takes no new files: " + ", ".join(notes)


def _interrupted(r: Run, aborted: bool) -> str:
    """Ctrl-C without the orderly stop (while starting up, or a second one): say what is kept; the words for
    ``state.json``."""
    if aborted:
        kept = f"the last complete checkpoint ({r.saved}) is kept" if r.saved else "no checkpoint was written yet"
        what = f"aborted by a second Ctrl-C: {kept}"
    else:
        what = "interrupted (Ctrl-C) while starting, before any training step" + (
            f"; the checkpoint ({r.saved}) is kept" if r.saved else "")
    if r.info.is_main:
        _tell(f"{what}; to {'resume' if r.saved else 'start it'}, run the same command again ({_rerun(r)})")
    return what


def _rerun(r: Run) -> str:
    return f"or: python -m stitching.train --run-dir {shlex.quote(str(r.rundir.path))}"


def _tell(line: str) -> None:
    """One line for the user: on the log once it is set up (stderr and train.log), else on stderr."""
    if log.handlers:
        log.info(line)
    else:
        print(line, file=sys.stderr)


def _start(r: Run, force: bool) -> int | None:
    """Checks, model, data, then the run directory (locked, config written) and the step; None to train
    on, or an exit code (an already finished run)."""
    from stitching.data.pipeline import CpuFloat
    from stitching.stitch.cost import count_cost

    cfg, info = r.cfg, r.info
    r.per_device, r.accum = batch_split(cfg, info.world_size)
    cfg.output.dir = str(r.rundir.path)
    if _already_finished(r, force):
        return R.EXIT_OK
    R.check_writable(r.rundir.path)     # (a place this process cannot write: said before any compute)
    train_ds, val_ds = _build(r)
    r.val_set = CpuFloat(val_ds, val_ds.transform) if hasattr(val_ds, "transform") else val_ds   # normalised floats
    if _open_rundir(r, force):
        return R.EXIT_OK

    r.cost = count_cost(r.model, cfg.data.img_size)
    r.model.to(r.device)
    r.precision = P.resolve_precision(cfg.train.precision, r.device)
    r.st = build_step(r.model, cfg, r.built.kind, r.device, r.precision, r.accum, r.steps_per_epoch, info)
    r.objective = Objective(cfg, r.built, r.device, r.st.channels_last)
    r.train_loader, r.val_loader = _loaders(r, train_ds, val_ds)
    _resume(r, force)
    return None


def _loaders(r: Run, train_ds, val_ds) -> tuple:
    """(train loader or None without training, this rank's validation loader)."""
    from stitching.data.loaders import build_loader

    cfg, info = r.cfg, r.info
    pin = r.device.type == "cuda"
    train = build_loader(train_ds, r.per_device, True, cfg.train.seed, cfg.data.workers, info.rank,
                         info.world_size, pin_memory=pin) if r.epochs > 0 else None
    val = build_loader(torch.utils.data.Subset(val_ds, range(info.rank, len(val_ds), info.world_size)),
                       r.per_device, False, cfg.train.seed, cfg.data.workers, pin_memory=pin)
    return train, val


def _already_finished(r: Run, force: bool) -> bool:
    """The run directory's state, decided before anything is written (and again once its lock is held,
    :func:`_open_rundir`): a different run's directory, finished or not (ConfigError), or this run finished
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


def _build(r: Run) -> tuple:
    """The model and the datasets, every check before any compute or write (ConfigError); (train, val)."""
    return _build_data(r, *_build_model(r))


def _build_model(r: Run) -> tuple:
    """The model (``torch.manual_seed(train.seed)`` first: the adapters' initial weights, random networks) and the
    transforms, ``r.to_device``; (train transform, eval transform)."""
    from stitching.data.pipeline import batch_to_device
    from stitching.data.transforms import build_transforms
    from stitching.stitch.stitcher import build_model

    cfg = r.cfg
    torch.manual_seed(cfg.train.seed)
    try:
        r.built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes, frozen_bn=cfg.train.frozen_bn)
    except (ValueError, FileNotFoundError) as err:
        key = getattr(err, "key", None) or ("model.destination_weights" if "destination" in str(err)
                                            else "model.source_weights")
        raise cfg.error(key, str(err).splitlines()[0]) from None
    from stitching.stitch.lsinit import check_run

    check_run(cfg, r.built)             # model.init=least_squares: a target for every link (traced shapes)
    train_tf, eval_tf = build_transforms(r.built.data_config, cfg.data, r.device)   # uint8 out, finished on the device
    r.to_device = (batch_to_device(train_tf, r.device), batch_to_device(eval_tf, r.device))
    return train_tf, eval_tf


def _build_data(r: Run, train_tf, eval_tf) -> tuple:
    """The datasets and the run's steps (checked: ConfigError); (train, val)."""
    from stitching.data.loaders import build_datasets

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
    if r.epochs > 0 and r.built.kind == "original" and not any(p.requires_grad for p in r.model.parameters()):
        raise cfg.error("train.epochs", "nothing to train")
    r.total_steps = max(1, r.epochs * r.steps_per_epoch)
    return train_ds, val_ds


def _open_rundir(r: Run, force: bool) -> bool:
    """Now the run directory may be touched: one trainer at a time (its lock); then, the lock held, what it
    holds is decided again (another trainer may have written it since the first look, while this one built its
    model and data: a different run is refused, this run finished is skipped -- True); earlier files moved aside
    on ``--force``, the resolved config written, the log opened."""
    verdict = None          # None: go on; "finished"; or a different run's ConfigError, as its fields
    if r.info.is_main:
        try:
            r.rundir.path.mkdir(parents=True, exist_ok=True)
            r.lock = r.rundir.lock()
            r.lock.acquire()
        except OSError as err:
            raise R.WriteError(f"cannot write {r.rundir.path}: {err.strerror or err} (errno {err.errno}); "
                               "nothing was written") from err
        try:
            verdict = "finished" if _already_finished(r, force) else None
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
        r.logging_was = _setup_logging(r.rundir.file(R.LOG))
        if r.lock.took_over:
            log.info("took over the stale lock of pid %s on host %s (that process is gone)",
                     r.lock.took_over.get("pid"), r.lock.took_over.get("host"))
        r.previous = r.rundir.read_state()       # how the last trainer ended (said when resuming)
        r.rundir.write_state(R.STARTED)
        r.trackers = curves.Curves(r.cfg, r.rundir.path) if r.cfg.output.log_to else None
    D.barrier(r.info)
    return False


def build_step(model: nn.Module, cfg: Config, kind: str, device: torch.device, precision: str, accum: int,
               steps_per_epoch: int, info: D.DistInfo = D.DistInfo()) -> StepState:
    """The step of a run: the fast runner (folded frozen BatchNorms, channels-last, compile; DDP over ranks),
    AdamW over the trainable parameters, the learning-rate schedule and the fp16 scaler. ``model`` is on
    ``device`` already."""
    from stitching.stitch import fast

    channels_last = backends(cfg, device)
    runner = fast.prepare_for_training(model, fold_bn=cfg.train.fold_bn and kind == "stitched",
                                       channels_last=channels_last, compile=cfg.train.compile)
    return step_state(runner, model, cfg, device, precision, accum, steps_per_epoch, info, channels_last)


def backends(cfg: Config, device: torch.device) -> bool:
    """Set the device's backends (:func:`stitching.train.perf.configure_backends`); whether the run is
    channels-last (``train.channels_last``; ``auto``: :func:`stitching.stitch.fast.default_channels_last`)."""
    from stitching.stitch import fast

    P.configure_backends(device)            # cuDNN autotuning, TF32 (CUDA only)
    want = cfg.train.channels_last
    return fast.default_channels_last(device) if want == "auto" else bool(want)


def step_state(runner: nn.Module, model: nn.Module, cfg: Config, device: torch.device, precision: str, accum: int,
               steps_per_epoch: int, info: D.DistInfo, channels_last: bool) -> StepState:
    """The step around ``runner`` (the module that runs ``model``'s training step, on ``device``): DDP over ranks,
    AdamW over ``model``'s trainable parameters, the learning-rate schedule and the fp16 scaler."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if info.enabled and cfg.train.epochs > 0:
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[info.local_rank]
                                                     if device.type == "cuda" else None)
    optimizer = P.make_adamw(trainable, cfg.train.lr, cfg.train.weight_decay) if trainable else None
    total_steps = max(1, cfg.train.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, steps_per_epoch, total_steps)) \
        if optimizer else None
    return StepState(runner, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                     device, precision=precision, accum=accum, channels_last=channels_last,
                     label_smoothing=cfg.train.label_smoothing, distributed=isinstance(
                         runner, nn.parallel.DistributedDataParallel))


def _resume(r: Run, force: bool) -> None:
    """Load the newest good checkpoint (rank 0 sets damaged ones aside first), else log the start."""
    info = r.info
    ckpt = C.load_latest(r.rundir, set_aside=True) if info.is_main else None
    D.barrier(info)
    if not info.is_main:
        ckpt = C.load_latest(r.rundir, set_aside=False)
    if ckpt is None:
        from stitching.stitch.lsinit import initialise

        residual = initialise(r.cfg, r.built, r.device, r.per_device, r.say)   # model.init (a fresh start only)
        if residual is not None:        # every rank fitted the same images; rank 0's weights, bit for bit
            D.broadcast_module(r.model.adapters, info)
            r.pos["init_residual"] = residual                                     # (the checkpoint carries it)
        r.metrics = []
        r.pos["world_size"] = info.world_size
        last = r.previous.get("status")
        if last in (R.STARTED, *R.ENDED):     # said, so that starting afresh is never silent
            r.say(f"no checkpoint in {r.rundir.path} to resume from (the last trainer: {_last(r)}): starting "
                  "from step 0")
        m = r.cfg.model
        stitch = (f" {r.built.plan.cut_label} {m.destination or m.source}" if r.built.plan else "")
        r.say(f"run {r.rundir.path}: {r.built.kind} {m.source}{stitch}, {r.cost['macs'] / 1e9:.3f} GMACs, "
              f"{r.cost['trainable_params']:,} trainable of {r.cost['params']:,} params; {r.epochs} epochs x "
              f"{r.steps_per_epoch} steps, batch {r.cfg.train.batch_size} = {r.per_device} x {info.world_size} x "
              f"{r.accum}, {r.precision}, {r.device}")
        return
    r.checkpointed().load_state_dict(ckpt["trainable"])
    if r.st.optimizer:
        P.load_optimizer_state(r.st.optimizer, ckpt["optimizer"])   # (this device's fused/foreach kept)
        r.st.scheduler.load_state_dict(ckpt["scheduler"])
    r.st.scaler.load_state_dict(ckpt["scaler"])
    C.restore_rng(ckpt["rng"], r.device, info)
    r.pos = ckpt["position"]
    r.pos["sums"] = C.rank_sums(r.pos["sums"], info)
    r.st.step = r.pos["step"]
    # checkpoints are taken at optimizer-step boundaries: the micro-batch to go on from follows from the step,
    # which also holds when the number of processes (so the accumulation) changed since
    r.pos["batch"] = (r.pos["step"] - r.pos["epoch"] * r.steps_per_epoch) * r.accum
    written_by = r.pos.get("world_size", info.world_size)
    if written_by != info.world_size:
        r.say(f"the checkpoint was written by {written_by} processes, this run has {info.world_size}: it goes on "
              "with the new batch split (not bit-exact)")
    r.pos["world_size"] = info.world_size
    r.metrics = (r.rundir.read_rows(R.METRICS) if not force else [])[: r.pos["epoch"]]
    r.saved = _where(r)
    r.say(f"resuming {r.rundir.path} at epoch {r.pos['epoch'] + 1}, batch {r.pos['batch']} "
          f"(step {r.pos['step']} of {r.total_steps}"
          + ("; its evaluation first" if r.pos["batch"] >= r.steps_per_epoch * r.accum > 0 else "")
          + f"); the last trainer: {_last(r)}")


def _last(r: Run) -> str:
    """How the last trainer on this directory ended, from ``state.json`` as it left it."""
    state = r.previous
    if not state:
        return "said nothing (no state.json)"
    if state.get("status") == R.STARTED:
        return f"started (pid {state.get('pid')} on host {state.get('host')}) and never said how it ended: killed"
    return f"{state.get('status')}" + (f": {state['message']}" if state.get("message") else "")


def _where(r: Run) -> str:
    """Where the run stands, in words (the position of the checkpoint being written or just loaded)."""
    pos, total = r.pos, r.total_steps
    if pos["batch"] >= r.steps_per_epoch * r.accum > 0:
        return f"after the training of epoch {pos['epoch'] + 1}, step {pos['step']} of {total}; its evaluation reruns"
    if pos["batch"] == 0:
        return f"at the end of epoch {pos['epoch']}, step {pos['step']} of {total}"
    return f"in epoch {pos['epoch'] + 1} at step {pos['step']} of {total}"


def _train(r: Run) -> int:
    """Every remaining epoch, then the result; an exit code."""
    from stitching.data.loaders import set_epoch

    r.stop = S.StopSignals(r.info.is_main)
    r.started = time.time()
    if "similarity_before" not in r.pos:    # once, before epoch 1 (a checkpoint carries it)
        r.pos["similarity_before"] = measure.before(r.cfg, r.built, r.val_set, r.device) if r.info.is_main \
            else None
    last_eval = None
    for epoch in range(r.pos["epoch"], r.epochs):
        set_epoch(r.train_loader, epoch)
        if _train_epoch(r, epoch):
            return _stop(r, epoch)
        last_eval = _end_epoch(r, epoch)
        if last_eval is None:               # a stop signal during the evaluation
            return _stop(r, epoch)
    if last_eval is None:                   # train.epochs: 0, an evaluation only
        last_eval = evaluate(r.st, r.val_loader, r.info, r.to_device[1], _eval_stop(r))
        if last_eval is None:
            return _stop(r, None)
    return _finish(r, last_eval)


def _train_epoch(r: Run, epoch: int) -> bool:
    """One epoch from micro-batch ``pos['batch']``; True when a stop signal arrived. No host sync
    per step: the metric sums stay on the device until the epoch ends, the loss and the non-finite flag are
    read at log intervals only (the loss on rank 0 only, for its bar), and under DDP the ranks agree on a
    signal every ``train.preempt_check_every`` steps (:func:`stitching.train.perf.preempt_check_due`; one
    process looks after every step). ``images_per_s``'s timed window: :class:`stitching.train.perf.Throughput`."""
    from tqdm import tqdm

    st, pos, info = r.st, r.pos, r.info
    st.objective = r.objective.at(epoch)      # match_then_task switches here, at an epoch boundary
    st.runner.train()
    r.model.train()
    skip = pos["batch"]
    batches = itertools.islice(_skipped(r.train_loader, skip), r.steps_per_epoch * r.accum - skip)
    bar = tqdm(total=r.steps_per_epoch, initial=skip // r.accum, disable=not info.is_main,
               desc=f"epoch {epoch + 1}", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0,
               leave=False)
    meter = P.Throughput(r.steps_per_epoch - skip // r.accum, P.cuda_sync(r.device))
    step_images, preempted = 0, False
    # the sums start from the checkpointed ones so a resumed epoch adds in the same order as an uninterrupted one
    st.reset_sums(pos["sums"])
    try:
        for i, (x, y) in enumerate(batches, start=skip):
            x, y = r.to_device[0](x, y)
            loss = train_step(st, x, y, i)
            step_images += len(y) * info.world_size
            pos["batch"] = i + 1
            if (i + 1) % r.accum:
                continue
            meter.step(step_images)
            step_images = 0
            pos["step"] = st.step
            if r.stop.level and r.stop.seen_at is None:
                r.stop.seen_at = st.step                # (this process's first look: for the log line)
            bar.update(1)
            if r.lock is not None:
                r.lock.touch()
            done = st.step - epoch * r.steps_per_epoch    # (not bar.n: a disabled bar, ranks > 0, does not count)
            if done % r.cfg.train.log_every == 0 or done == r.steps_per_epoch:
                _check_finite(r, epoch)
                if info.is_main:                        # (reading the loss waits for the device)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{st.lr():.2e}",
                                    img_s=f"{meter.rate():.0f}")
            if P.preempt_check_due(st.step, r.cfg.train.preempt_check_every, info.enabled,
                                   done == r.steps_per_epoch) and r.stop.agree(r.device, info):
                preempted = True
                break
    finally:
        bar.close()     # (an error message then starts on a line of its own)
    pos["sums"] = st.sums.tolist()
    timed = meter.stop()
    # the run's and the epoch's timed windows (an epoch cut by a preemption adds its parts; the checkpoint
    # carries them); epoch_time: the epoch's training wall time, warm-up included
    pos["train_time"] += timed["seconds"]
    pos["train_images"] += timed["images"]
    pos["epoch_timed_s"] = pos.get("epoch_timed_s", 0.0) + timed["seconds"]
    pos["epoch_images"] = pos.get("epoch_images", 0) + timed["images"]
    pos["epoch_time"] = pos.get("epoch_time", 0.0) + timed["wall_s"]
    return preempted


def _check_finite(r: Run, epoch: int) -> None:
    """Stop (:class:`NonFiniteLoss`) if any rank saw a NaN/Inf loss; the last checkpoint stays as it is."""
    first = r.st.nonfinite()
    first = D.all_min(first if first is not None else math.inf, r.device, r.info)
    if first < math.inf:
        raise NonFiniteLoss(f"the loss became NaN/Inf at epoch {epoch + 1}, step {int(first)} of {r.total_steps}; "
                            f"stopped without a result (the last good checkpoint in {r.rundir.path} is kept); "
                            f"a lower train.lr usually helps")


def _end_epoch(r: Run, epoch: int) -> dict | None:
    """Evaluate, append the epoch's metrics row, checkpoint; None when a stop signal ended the evaluation
    (the epoch's training is then checkpointed by :func:`_stop`, its evaluation runs again on resume)."""
    _check_finite(r, epoch)
    ev = evaluate(r.st, r.val_loader, r.info, r.to_device[1], _eval_stop(r))
    if ev is None:
        return None
    return _record_epoch(r, epoch, ev)


def _record_epoch(r: Run, epoch: int, ev: dict) -> dict:
    """Append epoch ``epoch``'s metrics row (its evaluation ``ev``), write ``metrics.csv``, checkpoint; ``ev``."""
    s = D.all_sum(r.pos["sums"], r.device, r.info)
    r.metrics.append({"epoch": epoch + 1, "step": r.pos["step"], "lr": r.st.lr(),
                      "train_loss": s[0] / max(s[2], 1), "train_top1": 100 * s[1] / max(s[2], 1), **ev,
                      "images_per_s": P.images_per_s(r.pos.pop("epoch_images", 0),
                                                     r.pos.pop("epoch_timed_s", 0.0)),
                      "epoch_time_s": r.pos.pop("epoch_time", 0.0)})
    r.pos.update(epoch=epoch + 1, batch=0, sums=[0.0, 0.0, 0.0])
    if r.info.is_main:
        r.rundir.write_rows(R.METRICS, METRICS_COLUMNS, r.metrics)
        if r.trackers is not None:
            r.trackers.log(r.metrics[-1])
    _save_checkpoint(r)
    row = r.metrics[-1]
    r.say("epoch %d/%d: train_loss %.4f  val top1 %.2f top5 %.2f loss %.4f  %.1f img/s", epoch + 1, r.epochs,
          row["train_loss"], row["top1"], row["top5"], row["val_loss"], row["images_per_s"])
    return ev


def _eval_stop(r: Run):
    """The evaluation's look at a stop signal after each batch (``batches done -> stop now?``). Under DDP
    the ranks agree every ``train.preempt_check_every`` batches, on batches every rank has (their shares of
    the validation set may differ by one batch)."""
    if r.stop is None:
        return None
    every, distributed = r.cfg.train.preempt_check_every, r.info.enabled
    common = int(D.all_min(len(r.val_loader), r.device, r.info)) if distributed else None

    def stop(done: int) -> bool:      # (asked before batch done + 1: never after the last one)
        if distributed and done >= common:
            return False
        return P.preempt_check_due(done, every, distributed) and bool(r.stop.agree(r.device, r.info))
    return stop


def _save_checkpoint(r: Run) -> None:
    """Every rank's RNG states and metric sums gathered, rank 0 writes; all ranks wait for it."""
    ranks = C.gather({"rng": C.get_rng(r.device), "sums": r.pos["sums"]}, r.info)
    if r.info.is_main:
        r.pos["wall"] += time.time() - r.started
        r.started = time.time()
        position = {**r.pos, "sums": [x["sums"] for x in ranks]}
        C.save(r.rundir, C.make(r.checkpointed(), r.st.optimizer, r.st.scheduler, r.st.scaler,
                                [x["rng"] for x in ranks], position))
    r.saved = _where(r)
    D.barrier(r.info)


def _stop(r: Run, epoch: int | None) -> int:
    """A stop signal the ranks agreed on: checkpoint (not for an evaluation-only run, ``epoch`` None), then
    SIGTERM/SIGUSR1: ask for a requeue (``$STITCHING_REQUEUE_FILE``, rank 0), exit ``EXIT_PREEMPTED``;
    Ctrl-C: say how to resume, exit ``EXIT_INTERRUPTED``."""
    interrupted = r.stop.agreed == S.INTERRUPT
    if epoch is not None:
        _check_finite(r, epoch)
        _save_checkpoint(r)
    saved = f"checkpoint saved {r.saved}" if epoch is not None else "an evaluation only: nothing to save"
    if r.info.is_main and interrupted:
        r.ending = f"Ctrl-C (SIGINT): {saved}"
        _tell(f"interrupted by Ctrl-C: {saved}; exiting with {R.EXIT_INTERRUPTED}; to resume, run the same "
              f"command again ({_rerun(r)})")
    elif r.info.is_main:
        requested = R.request_requeue()
        name = signal.Signals(r.stop.signal).name if r.stop.signal else "a signal to another rank"
        r.ending = f"{name}: {saved}"
        log.info("signal %s (seen after step %s): %s; exiting with %d to be resumed%s", r.stop.signal,
                 r.stop.seen_at, saved, R.EXIT_PREEMPTED, f" (requeue requested in {requested})" if requested
                 else "")
    D.barrier(r.info)
    return R.EXIT_INTERRUPTED if interrupted else R.EXIT_PREEMPTED


def _finish(r: Run, last_eval: dict) -> int:
    r.pos["wall"] += time.time() - r.started
    if r.info.is_main:
        if r.cfg.output.save_model:
            _save_model(r.rundir, r.model, r.cfg, r.built.kind)
        row = _result_row(r, last_eval, measure.after(r.cfg, r.built, r.val_set, r.device))
        r.rundir.write_rows(R.RESULT, RESULT_COLUMNS, [row])
        log.info("top1 %.2f  top5 %.2f  val_loss %.4f", row["top1"], row["top5"], row["val_loss"])
        print(f"finished: results in {r.rundir.result} ({R.METRICS}, {R.MODEL}, {R.LOG} in {r.rundir.path})")
    D.barrier(r.info)
    return R.EXIT_OK


def _setup_logging(file: Path) -> tuple:
    """The trainer's log (``stitching.train`` and its children) to ``file`` and stderr, and only there; returns
    how it was before, for :func:`_restore_logging` when the run ends (``stitching.train()`` runs in the
    caller's process: a notebook, a script, a test session, which go on using ``logging``)."""
    was = (log.level, list(log.handlers), log.propagate)
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.FileHandler(file), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False
    return was


def _restore_logging(was: tuple) -> None:
    """The trainer's log as :func:`_setup_logging` found it; this run's handlers flushed and closed (the log
    file's handle; the stream handler leaves stderr open)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    level, handlers, propagate = was
    log.setLevel(level)
    for handler in handlers:
        log.addHandler(handler)
    log.propagate = propagate


def _lr_factor(cfg: Config, steps_per_epoch: int, total_steps: int):
    if cfg.train.lr_schedule == "constant":
        return lambda step: 1.0
    if cfg.train.lr_schedule_unit == "epoch":
        epochs = max(1, cfg.train.epochs)
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step // steps_per_epoch, epochs) / epochs))
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _skipped(loader, skip: int):
    """The loader from micro-batch ``skip`` on (resuming mid-epoch); skipping costs no image loading."""
    from stitching.data.loaders import start_at

    start_at(loader, skip)
    return iter(loader)


@torch.no_grad()
def evaluate(st: StepState, loader, info: D.DistInfo, prepare=None, stop=None) -> dict | None:
    """Top-1, top-5 (percent) and mean loss over ``loader`` (this rank's share): summed on the device
    (float64: loss, top-1 hits, top-5 hits, images; no host sync per batch), then one all-reduce over the
    ranks and one read. ``stop(batches done)`` is asked before each batch but the first (so never after
    the last: a complete evaluation is kept); when it says stop, None."""
    device = st.device
    st.runner.eval()
    sums = eval_sums(st)
    for i, (x, y) in enumerate(loader, start=1):
        if stop is not None and i > 1 and stop(i - 1):
            return None
        # prepare: the pipeline's device stage (uint8 -> normalised float there; stitching.data.pipeline)
        x, y = prepare(x, y) if prepare else (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        eval_batch(st, x, y, sums)
    return eval_result(sums, info)


def eval_sums(st: StepState) -> torch.Tensor:
    """An evaluation's running sums on the device (float64: loss, top-1 hits, top-5 hits, images)."""
    return torch.zeros(4, dtype=torch.float64, device=st.device)


@torch.no_grad()
def eval_batch(st: StepState, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
    """Add one validation batch (on the device, the runner in eval mode) to ``sums``."""
    if st.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(st.precision, st.device):
        logits = st.runner(x).float()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
    sums[1] += (topk[:, 0] == y).sum()
    sums[2] += (topk == y[:, None]).any(dim=1).sum()
    sums[3] += len(y)


def eval_result(sums: torch.Tensor, info: D.DistInfo) -> dict:
    """Top-1, top-5 (percent) and mean loss of an evaluation's sums, summed over the ranks (one read)."""
    loss_sum, top1, top5, n = D.all_sum_tensor(sums, info).tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "val_loss": loss_sum / n}


def _ips(pos: dict) -> float:
    return pos["train_images"] / pos["train_time"] if pos["train_time"] > 0 else 0.0


# ----------------------------------------------------------------------------- the model and the result
def _save_model(rundir: R.RunDir, model: nn.Module, cfg: Config, kind: str) -> None:
    """``model.safetensors``: the whole model's weights (native key names for an original model, so
    ``model.source_weights`` can point at it) with the config that rebuilds it in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    rundir.write_bytes(R.MODEL, save(tensors, metadata={"config": cfg.to_yaml(), "kind": kind}))


def load_trained(run_dir: str | Path) -> nn.Module:
    """Rebuild a finished run's model from its ``model.safetensors`` (weights and config inside)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from stitching.stitch.stitcher import build_model

    d = R.RunDir(run_dir)
    file = d.file(R.MODEL)
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    cfg = load_config(d.config, check=False, run_dir=True)
    mcfg = dataclasses.replace(cfg.model, pretrained=False, source_weights=None, destination_weights=None)
    built = build_model(mcfg, cfg.data.img_size, cfg.num_classes)
    if meta.get("kind") != built.kind:
        raise ValueError(f"{file} holds a {meta.get('kind')} model but {d.config} builds a {built.kind} one")
    built.model.load_state_dict(load_file(str(file)), strict=True)
    return built.model.eval()


def _result_row(r: Run, ev: dict, after: dict | None = None) -> dict:
    cfg, built, cost, pos, info = r.cfg, r.built, r.cost, r.pos, r.info
    m, plan = cfg.model, built.plan
    stitched = plan is not None and plan.kind == "stitched"
    dev = torch.cuda.get_device_name(r.device) if r.device.type == "cuda" else "cpu"
    return {
        "run_id": r.rundir.path.name, "kind": built.kind, "source": m.source,
        "destination": plan.destination if plan else m.source,
        "source_stage": plan.source_stage if plan else "", "destination_stage": plan.destination_stage if plan else "",
        "source_block": plan.source_block if plan else "", "destination_block": plan.destination_block if plan else "",
        "gap": plan.cut_label if plan else "",
        "adapter": plan.adapter if plan else "", "resize": plan.effective_resize if stitched else "",
        "resamples": any(s.size_in != s.size_out for s in plan.steps) if stitched else "",
        "resize_modes": resize_modes(cfg) if stitched else "",
        "schedule": plan.schedule if stitched else "",
        "num_adapters": plan.num_adapters if plan else 0,
        **recipe_columns(cfg, info.world_size, r.precision), "data_label": cfg.data.label or "",
        "seed": cfg.train.seed, "top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["val_loss"],
        "train_loss": r.metrics[-1]["train_loss"] if r.metrics else "",
        "init_residual": pos.get("init_residual", ""),
        **cost, "train_macs": train_macs(cfg, cost["macs"], r.objective.extra_macs(cfg.data.img_size)),
        **measure.columns(pos.get("similarity_before"), after),
        "images_per_s": _ips(pos), "wall_time_s": pos["wall"], "world_size": info.world_size, "pack": r.pack,
        "device": dev, "git_sha": git_sha(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
