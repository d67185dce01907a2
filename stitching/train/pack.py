"""Packed runs: one process trains several runs that share a source, over one data pass.

``python -m stitching.train --run-dir A --run-dir B ...`` (or ``--config`` several times; the launchers with
``--pack K``) trains the runs as the *branches* of one pack when :func:`stitching.validate.pack_key` puts them
together (the same source model, weights, data, seed, epochs, batch split, device and precision; they may
differ in cut, destination, adapters, objective, lr and schedule). Each micro-batch is loaded and sent to the
device once; the frozen source runs once to the deepest cut any branch needs (no autograd, eval mode), its
output kept at every branch's cut (:class:`stitching.stitch.shared.SharedFrozen`); then each branch, one at a
time (peak memory: the prefix outputs plus one branch), runs its adapters and suffix forward and backward and
steps its own optimizer and schedule (:func:`stitching.train.step.train_step`, the single run's step).
Frozen networks with the same architecture and weights are held once. Evaluation is one pass over the
validation set for every branch. Fine-tuning runs and ``train.frozen_bn: train`` runs (whose prefix is not
frozen in eval mode) join for the data pass only: they run their own forward on the batch.

**Each branch is a normal run, with the result it has alone**: its own run directory, lock, ``config.yaml``,
``train.log``, ``metrics.csv``, ``checkpoint.pt`` (the single run's format), ``state.json`` and
``result.csv`` (:func:`stitching.results.row.result_row`, its ``pack`` column naming the pack), written by the
single run's own functions (:mod:`stitching.train.loop`), so collection, plots, resume and ``--status`` see
ordinary runs. What makes a run's numbers depend on what else happens in the process, and how a branch is
kept to what it computes alone: every branch is built as its run alone builds it (``torch.manual_seed`` then
:func:`~stitching.stitch.stitcher.build_model`: its adapters' initial weights) and then keeps its *own* global
random state (torch's CPU and CUDA generators, ``random``, ``numpy``), swapped in around everything it does
(:func:`stitching.train.branch.scope`: dropout, stochastic depth, a random network) and saved in its checkpoint;
the shared work draws nothing (samples are a pure function of ``(seed, epoch, index)`` and restore the generators;
the frozen prefix runs in eval mode); a branch's adapters receive the very tensor its own prefix computes (the same
modules, the same operations in the same order); and within a branch the operations are those of its run alone. So
on the CPU, at the same thread count, a branch's ``metrics.csv`` and ``result.csv`` equal its run alone bit for bit
(tests/test_pack.py); on CUDA, where cuDNN chooses its algorithms by timing, to float tolerance, as a resumed run.
``images_per_s`` and ``wall_time_s`` are the pack's (every branch trains on every image).

Positions: a branch resumes from its own checkpoint. The pack's data pass starts at the earliest branch's
position; a branch further on joins when the pass reaches its epoch and micro-batch (samples depend only on
``(seed, epoch, index)``), so branches at different positions -- one new, one half-way, one finished (left out)
-- each go on exactly from where they stand. A stop signal (:mod:`stitching.train.stop`, as a run alone takes it:
at the next step, or after the current evaluation batch) checkpoints every branch that trained up to there (a
branch still waiting for its position keeps its checkpoint) and ends every branch ``EXIT_PREEMPTED``
(SIGTERM/SIGUSR1) or ``EXIT_INTERRUPTED`` (Ctrl-C; a second one aborts at once, each branch keeping its last
complete checkpoint). A branch whose loss becomes NaN/Inf stops alone: ``EXIT_NONFINITE`` in its own
``state.json``, its last good checkpoint kept, its lock released, while the others go on; a file of one branch
that cannot be written stops that branch (``EXIT_IO``). The process exits 0 when every branch finished,
``EXIT_INTERRUPTED`` after Ctrl-C, ``EXIT_PREEMPTED`` when the pack was preempted (run it again), else the first
branch's failure code. Several processes (``torchrun``) train the pack as they train a run: every rank steps the
same branches at the same steps and stops at the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from stitching import rundir as R
from stitching.rundir_paths import check_writable
from stitching.config import Config, ConfigError
from stitching.validate import check_files, pack_key, pack_refusal
from stitching.data.images import BadImageError
from stitching.data.seeding import set_epoch
from stitching.data.pipeline import CpuFloat
from stitching.stitch import fast
from stitching.stitch.cost import count_cost
from stitching.stitch.shared import SharedFrozen
from stitching.train import branch as B
from stitching.train import distributed as D
from stitching.train import ending as E
from stitching.train import evaluation as EV
from stitching.train import loop as L
from stitching.train import measure
from stitching.train import opening as O
from stitching.train import perf as P
from stitching.train import stop as S
from stitching.train.branch import Branch
from stitching.train.objective import Objective
from stitching.train.step import backends, step_state
from stitching.train.trainer import NonFiniteLoss, log
from stitching.train.step import autocast, train_step

log = log


@dataclasses.dataclass(eq=False)
class Pack:
    branches: list[Branch]
    info: D.DistInfo
    device: torch.device
    name: str
    frozen: SharedFrozen | None = None
    train_loader: object = None
    val_loader: object = None
    to_device: tuple = (None, None)
    channels_last: bool = False
    precision: str = "fp32"
    steps_per_epoch: int = 0
    accum: int = 1
    epochs: int = 0
    stop: S.StopSignals | None = None      # installed while training (stitching.train.stop)
    logging_was: tuple | None = None        # the trainer's log before the pack (B.adopt)
    log_every: int = 10
    preempt_every: int = 10

    @property
    def active(self) -> list[Branch]:
        return [b for b in self.branches if b.code is None]

    def say(self, msg: str) -> None:
        if self.info.is_main:
            log.info(msg)


# ------------------------------------------------------------------------------------------- the pack
def run(cfgs: list[Config], force: bool = False, exiting: bool = False) -> int:
    """Train the runs of ``cfgs`` as one pack (each resolved, ``output.dir`` set or named by its identity);
    returns the process exit code (module docstring). A config that cannot join the first one's pack, or two
    configs naming one directory, is a :class:`~stitching.config.ConfigError` before anything is built.
    ``exiting``: as :func:`stitching.train.loop.run` (the command line exits with the code next)."""
    for cfg in cfgs:
        check_files(cfg)
    first = cfgs[0].to_dict()
    for cfg in cfgs[1:]:
        refused = pack_refusal(first, cfg.to_dict())
        if refused is not None:
            key, why = refused
            raise cfg.error(key, f"cannot train in one pack with {cfgs[0].path or 'the first run'}: {why}")
    device = O.resolve_device(cfgs[0])
    paths = [O.run_dir_path(cfg, None) for cfg in cfgs]
    seen: dict[Path, Config] = {}
    for cfg, (path, _) in zip(cfgs, paths):
        if path in seen:
            raise ConfigError("output.dir", str(path), cfg.source_of("output.dir"),
                              f"is also the run directory of {seen[path].path or 'another run'} of this pack")
        seen[path] = cfg
    info = D.init(device.type)
    name = pack_name(cfgs[0].to_dict(), [p for p, _ in paths])
    for (path, how) in paths:
        if how and info.is_main:
            print(f"run directory: {path} ({how})", flush=True)
    pack = Pack([Branch(cfg, R.RunDir(path), info, device, pack=name, index=i)
                 for i, (cfg, (path, _)) in enumerate(zip(cfgs, paths))], info, device, name)
    code, message, aborted = R.EXIT_FAILED, R.UNEXPECTED, False
    try:
        _start(pack, force)
        if pack.active:
            _train(pack)
        code = outcome(pack)
        message = R.describe_exit(code)
        return code
    except BadImageError as err:  # met while loading (also when re-raised from a DataLoader worker)
        hint = " (data.bad_images=skip leaves such files out)" if cfgs[0].data.bad_images == "error" else ""
        code, message = R.EXIT_CONFIG, err.message + hint
        raise cfgs[0].error("data.root", err.message + hint) from None
    except ConfigError as err:
        code, message = R.EXIT_CONFIG, str(err)
        raise
    except R.RunDirError as err:
        code, message = err.exit_code, str(err)
        if info.is_main:
            print(f"error: {err}", file=sys.stderr)
        return code
    except KeyboardInterrupt as err:    # Ctrl-C while starting up, or a second one (stitching.train.stop)
        aborted = isinstance(err, S.Aborted)
        code = R.EXIT_INTERRUPTED
        for b in pack.active:           # (each branch's line and state.json say what it keeps)
            with B.scope(b, rng=False):
                b.message = E.interrupted(b, aborted)
        return code
    finally:
        if pack.stop is not None:
            pack.stop.restore(exiting)
        for b in pack.active:         # the branches still in the pack end with it
            note = E.close(b, code, b.message or message)
            if note and info.is_main:
                print(f"warning: {note[2:]}", file=sys.stderr)
        _restore_log(pack)
        if not (aborted and info.enabled):  # (other ranks may be gone mid-collective: no goodbye with them)
            D.shutdown()


def _restore_log(pack: Pack) -> None:
    """The trainer's log as it was before the pack (:func:`stitching.train.B.adopt`)."""
    was = B.adopt(pack.branches) or pack.logging_was
    pack.logging_was = None
    if was is not None:
        E.restore_logging(was)


def pack_name(config: dict, paths: list[Path]) -> str:
    """The ``pack`` column: the pack key (:func:`stitching.validate.pack_key`) and 6 hex digits naming its runs."""
    members = hashlib.sha1("\n".join(sorted(p.name for p in paths)).encode()).hexdigest()[:6]
    return f"{pack_key(config)}.{members}"


def outcome(pack: Pack) -> int:
    """The process's exit code: 0 when every branch finished, ``EXIT_INTERRUPTED`` when Ctrl-C stopped it,
    ``EXIT_PREEMPTED`` when a signal preempted it, else the first branch's failure."""
    codes = [b.code for b in pack.branches]
    if all(c == R.EXIT_OK for c in codes):
        return R.EXIT_OK
    for stopped in (R.EXIT_INTERRUPTED, R.EXIT_PREEMPTED):
        if stopped in codes:
            return stopped
    return next(c for c in codes if c not in (R.EXIT_OK, None))


def _end(pack: Pack, b: Branch, code: int, message: str) -> None:
    """Branch ``b`` leaves the pack with ``code``: its ``state.json`` says so and its lock is given back now."""
    b.code, b.message = code, message
    failed = code not in (R.EXIT_OK, R.EXIT_PREEMPTED, R.EXIT_INTERRUPTED)
    if failed and pack.logging_was is not None:     # (its train.log, once the pack's log is open)
        with B.scope(b, rng=False):
            log.info("stopped (exit %d): %s; the other runs of the pack go on", code, message)
    note = E.close(b, code, message)
    if pack.info.is_main and (failed or note):
        print(f"error: {b.rundir.path}: {message}{note}" if failed else f"warning: {note[2:]}", file=sys.stderr)


# ------------------------------------------------------------------------------------------- set-up
def _start(pack: Pack, force: bool) -> None:
    """Every branch checked, built as its run alone builds it (its frozen networks then held once), the data
    built once, the run directories opened (locked, config written), the steps and the shared prefix; each
    branch resumed from its own checkpoint."""
    info = pack.info
    for b in pack.branches:
        b.per_device, b.accum = O.batch_split(b.cfg, info.world_size)
        b.cfg.output.dir = str(b.rundir.path)
        if O.already_finished(b, force):
            b.code, b.message = R.EXIT_OK, "already finished"
    for b in pack.active:
        check_writable(b.rundir.path)
    if not pack.active:
        return
    t = pack.branches[0].cfg.train
    pack.channels_last = backends(pack.branches[0].cfg, pack.device)
    pack.frozen = SharedFrozen(t.fold_bn, pack.channels_last)
    transforms = None
    for b in pack.active:
        with B.scope(b):
            tf = O.build_model(b)          # (seeds the branch's generators as its run alone: its adapters)
        transforms = transforms or tf
        pack.frozen.share(b.built)          # its own copies of networks the pack holds are dropped here
    lead = pack.active[0]
    train_ds, val_ds = O.build_data(lead, *transforms)
    val_set = CpuFloat(val_ds, val_ds.transform) if hasattr(val_ds, "transform") else val_ds
    for b in pack.active:
        b.steps_per_epoch, b.total_steps, b.val_set = lead.steps_per_epoch, lead.total_steps, val_set
    for b in pack.active:
        try:
            if O.open_rundir(b, force):
                b.code, b.message = R.EXIT_OK, "already finished (by another trainer)"
        except (R.BusyError, R.WriteError) as err:
            _end(pack, b, err.exit_code, str(err))
        except ConfigError as err:
            _end(pack, b, R.EXIT_CONFIG, str(err))
    if not pack.active:
        return
    if info.is_main:
        pack.logging_was = B.open_log(pack.branches, pack.active)
    pack.steps_per_epoch, pack.accum, pack.epochs = lead.steps_per_epoch, lead.accum, lead.epochs
    pack.log_every, pack.preempt_every = t.log_every, t.preempt_check_every
    pack.precision = P.resolve_precision(t.precision, pack.device)
    if pack.device.type == "cpu":
        fast.tune_cpu_allocator()
    for b in pack.active:
        with B.scope(b):
            b.cost = count_cost(b.model, b.cfg.data.img_size)
            b.model.to(b.device)
            b.precision = pack.precision
    for b in pack.active:
        with B.scope(b):
            runner, b.shared = pack.frozen.runner(b.built)
            b.st = step_state(runner, b.model, b.cfg, b.device, b.precision, b.accum, b.steps_per_epoch, info,
                                pack.channels_last)
            b.objective = Objective(b.cfg, b.built, b.device, b.st.channels_last)
    pack.train_loader, pack.val_loader = O.loaders(lead, train_ds, val_ds)
    pack.to_device = lead.to_device
    shared = sum(b.shared for b in pack.active)
    pack.say(f"pack {pack.name}: {len(pack.active)} runs over one data pass; the source prefix run once for "
             f"{shared} of them (the others run their own forward), {pack.frozen.held_count()} frozen network(s) "
             f"held once; runs: " + "; ".join(f"{b.label.strip()} {b.rundir.path}" for b in pack.active))
    for b in pack.active:
        with B.scope(b):
            L.resume(b, force)


# ------------------------------------------------------------------------------------------- training
def _train(pack: Pack) -> None:
    """From the earliest branch's position to the end: epochs over the shared data pass, one evaluation pass
    per epoch for the branches that trained it, each branch's result."""
    pack.stop = S.StopSignals(pack.info.is_main)
    for b in pack.active:
        b.started, b.stop, b.val_loader = time.time(), pack.stop, pack.val_loader
        if not b.pos.measured:                  # once, before epoch 1 (a checkpoint carries it)
            with B.scope(b):
                b.pos.similarity_before = measure.before(b.cfg, b.built, b.val_set, b.device) \
                    if pack.info.is_main else None
            b.pos.measured = True
    while pack.active:
        epoch = min(b.pos.epoch for b in pack.active)
        if epoch >= pack.epochs:
            break
        training = [b for b in pack.active if b.pos.epoch == epoch]
        if _train_epoch(pack, epoch, training) or not _end_epoch(pack, epoch, training):
            _stop(pack, epoch, training)        # (a stop signal in the training or in the evaluation)
            return
    left = [b for b in pack.active if b.last_eval is None]      # evaluation only, or resumed at the very end
    evs = _evaluate(pack, left)
    if evs is None:
        _stop(pack, None, [])
        return
    for b, ev in zip(left, evs):
        b.last_eval = ev
    for b in pack.active:
        try:
            with B.scope(b):
                L.finish(b, b.last_eval)
        except R.RunDirError as err:
            _end(pack, b, err.exit_code, str(err))
            continue
        _end(pack, b, R.EXIT_OK, R.describe_exit(R.EXIT_OK))


def _train_epoch(pack: Pack, epoch: int, training: list[Branch]) -> bool:
    """One epoch of the shared data pass from the earliest of ``training``'s positions (each joins at its own);
    True when a stop signal arrived (:mod:`stitching.train.stop`). As :func:`stitching.train.loop._train_epoch`,
    per branch: no host sync per step, the loss and the non-finite flag read at log intervals; the ranks agree on
    a signal every ``train.preempt_check_every`` steps."""
    info, accum, steps = pack.info, pack.accum, pack.steps_per_epoch
    set_epoch(pack.train_loader, epoch)
    for b in training:
        b.st.objective = b.objective.at(epoch)      # match_then_task switches here, at an epoch boundary
        b.st.runner.train()
        b.model.train()
        b.st.reset_sums(b.pos.sums)
        b.step_images, b.joined = 0, False
    skip = min(b.pos.batch for b in training)
    batches = itertools.islice(L.skipped(pack.train_loader, skip), steps * accum - skip)
    bar = tqdm(total=steps, initial=skip // accum, disable=not info.is_main,
               desc=f"epoch {epoch + 1} ({len(training)} runs)", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, leave=False)
    preempted = False
    try:
        for i, (x, y) in enumerate(batches, start=skip):
            x, y = pack.to_device[0](x, y)
            joining = [b for b in training if b.code is None and b.pos.batch <= i]
            x = _prefix(pack, x, joining)
            for b in joining:
                if not b.joined:            # (a branch further on waits for its position: its meter starts now)
                    b.meter = P.Throughput(steps - i // accum, P.cuda_sync(pack.device))
                    b.joined = True
                with B.scope(b):
                    b.loss = train_step(b.st, x, y, i)
                b.step_images += len(y) * info.world_size
                b.pos.batch = i + 1
            if (i + 1) % accum:
                continue
            done = (i + 1) // accum                     # optimizer steps of this epoch
            for b in joining:
                b.meter.step(b.step_images)
                b.step_images = 0
                b.pos.step = b.st.step
                if b.lock is not None:
                    b.lock.touch()
            if pack.stop.level and pack.stop.seen_at is None:
                pack.stop.seen_at = epoch * steps + done
            bar.update(1)
            if done % pack.log_every == 0 or done == steps:
                for b in joining:
                    _check_finite(pack, b, epoch)
                shown = next((b for b in joining if b.code is None), None)
                if info.is_main and shown is not None:
                    bar.set_postfix(run=shown.index + 1, loss=f"{shown.loss.item():.3f}", lr=f"{shown.st.lr():.2e}",
                                    img_s=f"{shown.meter.rate() * len(joining):.0f}")
            if P.preempt_check_due(epoch * steps + done, pack.preempt_every, info.enabled, done == steps) and \
                    pack.stop.agree(pack.device, info):
                preempted = True
                break
    finally:
        bar.close()
        pack.frozen.cache.clear()
    for b in training:
        if b.code is not None or not b.joined:
            continue
        b.pos.sums = b.st.sums.tolist()
        timed = b.meter.stop()
        b.pos.add_timed(timed)
    return preempted


def _prefix(pack: Pack, x: torch.Tensor, branches: list[Branch]) -> torch.Tensor:
    """``x`` in the runners' layout, the shared source prefix run on it when any of ``branches`` reads it."""
    if pack.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if any(b.shared for b in branches):
        pack.frozen.run_prefix(x, lambda: autocast(pack.precision, pack.device))
    return x


def _check_finite(pack: Pack, b: Branch, epoch: int) -> None:
    """:func:`stitching.train.loop._check_finite` for one branch: a NaN/Inf loss ends that branch alone."""
    if b.code is not None:
        return
    try:
        L.check_finite(b, epoch)
    except NonFiniteLoss as err:
        _end(pack, b, err.exit_code, str(err))


def _end_epoch(pack: Pack, epoch: int, training: list[Branch]) -> bool:
    """The branches that trained epoch ``epoch``: finite checks, one evaluation pass for all, then each one's
    metrics row and checkpoint (:func:`stitching.train.loop.record_epoch`); False when a stop signal ended the
    evaluation (the epoch's training is then checkpointed by :func:`_stop`, its evaluation runs again on
    resume)."""
    for b in training:
        _check_finite(pack, b, epoch)
    live = [b for b in training if b.code is None]
    evs = _evaluate(pack, live)
    if evs is None:
        return False
    for b, ev in zip(live, evs):
        try:
            with B.scope(b):
                b.last_eval = L.record_epoch(b, epoch, ev)
        except R.RunDirError as err:
            _end(pack, b, err.exit_code, str(err))
    return True


@torch.no_grad()
def _evaluate(pack: Pack, branches: list[Branch]) -> list[dict] | None:
    """One pass over the validation set for every branch of ``branches`` (each as
    :func:`stitching.train.evaluation.evaluate` evaluates it alone, a stop signal looked at after each batch as
    there); None when a stop signal ended it."""
    if not branches:
        return []
    sums = [EV.eval_sums(b.st) for b in branches]
    for b in branches:
        b.st.runner.eval()
    stop = L.eval_stop(branches[0])
    try:
        for i, (x, y) in enumerate(pack.val_loader, start=1):
            if stop is not None and i > 1 and stop(i - 1):
                return None
            x, y = pack.to_device[1](x, y)
            x = _prefix(pack, x, branches)
            for b, s in zip(branches, sums):
                EV.eval_batch(b.st, x, y, s)
    finally:
        pack.frozen.cache.clear()
    return [EV.eval_result(s, pack.info) for s in sums]


def _stop(pack: Pack, epoch: int | None, training: list[Branch]) -> None:
    """A stop signal the ranks agreed on (:func:`stitching.train.loop._stop` for a pack): every branch that
    trained up to this point in epoch ``epoch`` is checkpointed (a branch still waiting for its position keeps its
    own; None: an evaluation only); then every branch left in the pack ends -- SIGTERM/SIGUSR1: a requeue asked
    for once, ``EXIT_PREEMPTED``; Ctrl-C: one line says how to resume the pack, ``EXIT_INTERRUPTED``."""
    interrupted, saved_now = pack.stop.agreed == S.INTERRUPT, set()
    for b in training:
        if b.code is None and b.joined:
            _check_finite(pack, b, epoch)
            if b.code is None:
                try:
                    with B.scope(b):
                        L.save_checkpoint(b)
                    saved_now.add(b.index)
                except R.RunDirError as err:
                    _end(pack, b, err.exit_code, str(err))
    requested = R.request_requeue() if pack.info.is_main and not interrupted else None
    name = "Ctrl-C (SIGINT)" if interrupted else \
        signal.Signals(pack.stop.signal).name if pack.stop.signal else "a signal to another rank"
    for b in pack.active:
        saved = f"checkpoint saved {b.saved}" if b.index in saved_now else \
            f"its checkpoint ({b.saved}) is kept" if b.saved else "nothing saved yet"
        with B.scope(b, rng=False):
            if interrupted:
                pack.say(f"interrupted by Ctrl-C: {saved}; exiting with {R.EXIT_INTERRUPTED}")
            else:
                pack.say(f"signal {pack.stop.signal} (seen after step {pack.stop.seen_at}): {saved}; exiting with "
                         f"{R.EXIT_PREEMPTED} to be resumed" + (f" (requeue requested in {requested})" if requested
                                                                 else ""))
        _end(pack, b, R.EXIT_INTERRUPTED if interrupted else R.EXIT_PREEMPTED, f"{name}: {saved}")
    if interrupted and pack.info.is_main:
        dirs = " ".join(f"--run-dir {shlex.quote(str(b.rundir.path))}" for b in pack.branches)
        pack.say(f"to resume the pack, run the same command again (or: python -m stitching.train {dirs})")
    D.barrier(pack.info)
