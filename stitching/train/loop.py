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

Reading order: :func:`run` (outcome -> exit code) -> :func:`_start` (:mod:`stitching.train.opening`: the
checks, the model and data, the run directory; :func:`stitching.train.step.build_step`, :func:`resume`) ->
:func:`_train` (epochs) -> :func:`_train_epoch` -> :func:`_end_epoch` / :func:`_stop` -> :func:`finish`
(:func:`_result_row`: :func:`stitching.results.row.result_row`); :func:`stitching.train.ending.close`.
The run's state is a :class:`stitching.train.trainer.Trainer`, its position a
:class:`stitching.train.checkpoint.Position`; evaluation is :mod:`stitching.train.evaluation`, the saved model
:mod:`stitching.train.saved`.
"""

from __future__ import annotations

import itertools
import math
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from stitching import rundir as R, rundir_paths
from stitching.config import Config, ConfigError
from stitching.data.images import BadImageError
from stitching.data.seeding import set_epoch, start_at
from stitching.data.pipeline import CpuFloat
from stitching.results.row import result_row
from stitching.results.schema import METRICS_COLUMNS, RESULT_COLUMNS
from stitching.stitch.cost import count_cost
from stitching.stitch.lsinit import initialise
from stitching.train import checkpoint as C
from stitching.train import curves
from stitching.train import distributed as D
from stitching.train import ending as E
from stitching.train import measure
from stitching.train import opening as O
from stitching.train import perf as P
from stitching.train import stop as S
from stitching.train.evaluation import evaluate
from stitching.train.objective import Objective, train_macs
from stitching.train.saved import save_model
from stitching.train.step import build_step, train_step
from stitching.train.trainer import NonFiniteLoss, Trainer, log
from stitching.validate import check_files


# ------------------------------------------------------------------------------------------ the run
def run(cfg: Config, run_dir: Path | None = None, force: bool = False, exiting: bool = False) -> int:
    """Train/evaluate ``cfg`` into ``run_dir``; returns the process exit code (:mod:`stitching.rundir`).
    ``exiting``: the caller exits with that code next (the command line: after a stop, the stop signals'
    handlers stay until then, :meth:`stitching.train.stop.StopSignals.restore`)."""
    check_files(cfg)
    curves.check_installed(cfg)
    device = O.resolve_device(cfg)
    path, how = O.run_dir_path(cfg, run_dir)
    info = D.init(device.type)
    if how and info.is_main:
        print(f"run directory: {path} ({how})", flush=True)
    r = Trainer(cfg, R.RunDir(path), info, device)
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
        code, message = R.EXIT_INTERRUPTED, E.interrupted(r, aborted)
        return code
    finally:
        if r.stop is not None:
            r.stop.restore(exiting)
        note = E.close(r, code, message)
        if info.is_main and (error or note):
            print(f"error: {error}{note}" if error else f"warning: {note[2:]}", file=sys.stderr)
        if r.logging_was is not None:
            E.restore_logging(r.logging_was)
        if not (aborted and info.enabled):  # (other ranks may be gone mid-collective: no goodbye with them)
            D.shutdown()


def _start(r: Trainer, force: bool) -> int | None:
    """Checks, model, data, then the run directory (locked, config written) and the step; None to train
    on, or an exit code (an already finished run)."""
    cfg, info = r.cfg, r.info
    r.per_device, r.accum = O.batch_split(cfg, info.world_size)
    cfg.output.dir = str(r.rundir.path)
    if O.already_finished(r, force):
        return R.EXIT_OK
    rundir_paths.check_writable(r.rundir.path)     # (a place this process cannot write: said before any compute)
    train_ds, val_ds = O.build(r)
    r.val_set = CpuFloat(val_ds, val_ds.transform) if hasattr(val_ds, "transform") else val_ds   # normalised floats
    if O.open_rundir(r, force):
        return R.EXIT_OK

    r.cost = count_cost(r.model, cfg.data.img_size)
    r.model.to(r.device)
    r.precision = P.resolve_precision(cfg.train.precision, r.device)
    r.st = build_step(r.model, cfg, r.built.kind, r.device, r.precision, r.accum, r.steps_per_epoch, info)
    r.objective = Objective(cfg, r.built, r.device, r.st.channels_last)
    r.train_loader, r.val_loader = O.loaders(r, train_ds, val_ds)
    resume(r, force)
    return None


def resume(r: Trainer, force: bool) -> None:
    """Load the newest good checkpoint (rank 0 sets damaged ones aside first), else log the start."""
    info = r.info
    ckpt = C.load_latest(r.rundir, set_aside=True) if info.is_main else None
    D.barrier(info)
    if not info.is_main:
        ckpt = C.load_latest(r.rundir, set_aside=False)
    if ckpt is None:
        residual = initialise(r.cfg, r.built, r.device, r.per_device, r.say)   # model.init (a fresh start only)
        if residual is not None:        # every rank fitted the same images; rank 0's weights, bit for bit
            D.broadcast_module(r.model.adapters, info)
            r.pos.init_residual = residual                                     # (the checkpoint carries it)
        r.metrics = []
        r.pos.world_size = info.world_size
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
    r.pos = C.Position.from_dict(ckpt["position"])
    r.pos.sums = C.rank_sums(r.pos.sums, info)
    r.st.step = r.pos.step
    # checkpoints are taken at optimizer-step boundaries: the micro-batch to go on from follows from the step,
    # which also holds when the number of processes (so the accumulation) changed since
    r.pos.batch = (r.pos.step - r.pos.epoch * r.steps_per_epoch) * r.accum
    written_by = r.pos.world_size or info.world_size
    if written_by != info.world_size:
        r.say(f"the checkpoint was written by {written_by} processes, this run has {info.world_size}: it goes on "
              "with the new batch split (not bit-exact)")
    r.pos.world_size = info.world_size
    r.metrics = (r.rundir.read_rows(R.METRICS) if not force else [])[: r.pos.epoch]
    r.saved = r.where()
    r.say(f"resuming {r.rundir.path} at epoch {r.pos.epoch + 1}, batch {r.pos.batch} "
          f"(step {r.pos.step} of {r.total_steps}"
          + ("; its evaluation first" if r.pos.batch >= r.steps_per_epoch * r.accum > 0 else "")
          + f"); the last trainer: {_last(r)}")


def _last(r: Trainer) -> str:
    """How the last trainer on this directory ended, from ``state.json`` as it left it."""
    state = r.previous
    if not state:
        return "said nothing (no state.json)"
    if state.get("status") == R.STARTED:
        return f"started (pid {state.get('pid')} on host {state.get('host')}) and never said how it ended: killed"
    return f"{state.get('status')}" + (f": {state['message']}" if state.get("message") else "")


def _train(r: Trainer) -> int:
    """Every remaining epoch, then the result; an exit code."""
    r.stop = S.StopSignals(r.info.is_main)
    r.started = time.time()
    if not r.pos.measured:                  # once, before epoch 1 (a checkpoint carries it)
        r.pos.similarity_before = measure.before(r.cfg, r.built, r.val_set, r.device) if r.info.is_main \
            else None
        r.pos.measured = True
    last_eval = None
    for epoch in range(r.pos.epoch, r.epochs):
        set_epoch(r.train_loader, epoch)
        if _train_epoch(r, epoch):
            return _stop(r, epoch)
        last_eval = _end_epoch(r, epoch)
        if last_eval is None:               # a stop signal during the evaluation
            return _stop(r, epoch)
    if last_eval is None:                   # train.epochs: 0, an evaluation only
        last_eval = evaluate(r.st, r.val_loader, r.info, r.to_device[1], eval_stop(r))
        if last_eval is None:
            return _stop(r, None)
    return finish(r, last_eval)


def _train_epoch(r: Trainer, epoch: int) -> bool:
    """One epoch from micro-batch ``r.pos.batch``; True when a stop signal arrived. No host sync
    per step: the metric sums stay on the device until the epoch ends, the loss and the non-finite flag are
    read at log intervals only (the loss on rank 0 only, for its bar), and under DDP the ranks agree on a
    signal every ``train.preempt_check_every`` steps (:func:`stitching.train.perf.preempt_check_due`; one
    process looks after every step). ``images_per_s``'s timed window: :class:`stitching.train.perf.Throughput`."""
    st, pos, info = r.st, r.pos, r.info
    st.objective = r.objective.at(epoch)      # match_then_task switches here, at an epoch boundary
    st.runner.train()
    r.model.train()
    skip = pos.batch
    batches = itertools.islice(skipped(r.train_loader, skip), r.steps_per_epoch * r.accum - skip)
    bar = tqdm(total=r.steps_per_epoch, initial=skip // r.accum, disable=not info.is_main,
               desc=f"epoch {epoch + 1}", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0,
               leave=False)
    meter = P.Throughput(r.steps_per_epoch - skip // r.accum, P.cuda_sync(r.device))
    step_images, preempted = 0, False
    # the sums start from the checkpointed ones so a resumed epoch adds in the same order as an uninterrupted one
    st.reset_sums(pos.sums)
    try:
        for i, (x, y) in enumerate(batches, start=skip):
            x, y = r.to_device[0](x, y)
            loss = train_step(st, x, y, i)
            step_images += len(y) * info.world_size
            pos.batch = i + 1
            if (i + 1) % r.accum:
                continue
            meter.step(step_images)
            step_images = 0
            pos.step = st.step
            if r.stop.level and r.stop.seen_at is None:
                r.stop.seen_at = st.step                # (this process's first look: for the log line)
            bar.update(1)
            if r.lock is not None:
                r.lock.touch()
            done = st.step - epoch * r.steps_per_epoch    # (not bar.n: a disabled bar, ranks > 0, does not count)
            if done % r.cfg.train.log_every == 0 or done == r.steps_per_epoch:
                check_finite(r, epoch)
                if info.is_main:                        # (reading the loss waits for the device)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{st.lr():.2e}",
                                    img_s=f"{meter.rate():.0f}")
            if P.preempt_check_due(st.step, r.cfg.train.preempt_check_every, info.enabled,
                                   done == r.steps_per_epoch) and r.stop.agree(r.device, info):
                preempted = True
                break
    finally:
        bar.close()     # (an error message then starts on a line of its own)
    pos.sums = st.sums.tolist()
    timed = meter.stop()
    pos.add_timed(timed)        # the run's and the epoch's timed windows (the checkpoint carries them)
    return preempted


def check_finite(r: Trainer, epoch: int) -> None:
    """Stop (:class:`NonFiniteLoss`) if any rank saw a NaN/Inf loss; the last checkpoint stays as it is."""
    first = r.st.nonfinite()
    first = D.all_min(first if first is not None else math.inf, r.device, r.info)
    if first < math.inf:
        raise NonFiniteLoss(f"the loss became NaN/Inf at epoch {epoch + 1}, step {int(first)} of {r.total_steps}; "
                            f"stopped without a result (the last good checkpoint in {r.rundir.path} is kept); "
                            f"a lower train.lr usually helps")


def _end_epoch(r: Trainer, epoch: int) -> dict | None:
    """Evaluate, append the epoch's metrics row, checkpoint; None when a stop signal ended the evaluation
    (the epoch's training is then checkpointed by :func:`_stop`, its evaluation runs again on resume)."""
    check_finite(r, epoch)
    ev = evaluate(r.st, r.val_loader, r.info, r.to_device[1], eval_stop(r))
    if ev is None:
        return None
    return record_epoch(r, epoch, ev)


def record_epoch(r: Trainer, epoch: int, ev: dict) -> dict:
    """Append epoch ``epoch``'s metrics row (its evaluation ``ev``), write ``metrics.csv``, checkpoint; ``ev``."""
    s = D.all_sum(r.pos.sums, r.device, r.info)
    images, seconds, epoch_time = r.pos.take_epoch()
    r.metrics.append({"epoch": epoch + 1, "step": r.pos.step, "lr": r.st.lr(),
                      "train_loss": s[0] / max(s[2], 1), "train_top1": 100 * s[1] / max(s[2], 1), **ev,
                      "images_per_s": P.images_per_s(images, seconds), "epoch_time_s": epoch_time})
    r.pos.epoch, r.pos.batch, r.pos.sums = epoch + 1, 0, [0.0, 0.0, 0.0]
    if r.info.is_main:
        r.rundir.write_rows(R.METRICS, METRICS_COLUMNS, r.metrics)
        if r.trackers is not None:
            r.trackers.log(r.metrics[-1])
    save_checkpoint(r)
    row = r.metrics[-1]
    r.say("epoch %d/%d: train_loss %.4f  val top1 %.2f top5 %.2f loss %.4f  %.1f img/s", epoch + 1, r.epochs,
          row["train_loss"], row["top1"], row["top5"], row["val_loss"], row["images_per_s"])
    return ev


def eval_stop(r: Trainer):
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


def save_checkpoint(r: Trainer) -> None:
    """Every rank's RNG states and metric sums gathered, rank 0 writes; all ranks wait for it."""
    ranks = C.gather({"rng": C.get_rng(r.device), "sums": r.pos.sums}, r.info)
    if r.info.is_main:
        r.pos.wall += time.time() - r.started
        r.started = time.time()
        position = {**r.pos.to_dict(), "sums": [x["sums"] for x in ranks]}
        C.save(r.rundir, C.make(r.checkpointed(), r.st.optimizer, r.st.scheduler, r.st.scaler,
                                [x["rng"] for x in ranks], position))
    r.saved = r.where()
    D.barrier(r.info)


def _stop(r: Trainer, epoch: int | None) -> int:
    """A stop signal the ranks agreed on: checkpoint (not for an evaluation-only run, ``epoch`` None), then
    SIGTERM/SIGUSR1: ask for a requeue (``$STITCHING_REQUEUE_FILE``, rank 0), exit ``EXIT_PREEMPTED``;
    Ctrl-C: say how to resume, exit ``EXIT_INTERRUPTED``."""
    interrupted = r.stop.agreed == S.INTERRUPT
    if epoch is not None:
        check_finite(r, epoch)
        save_checkpoint(r)
    saved = f"checkpoint saved {r.saved}" if epoch is not None else "an evaluation only: nothing to save"
    if r.info.is_main and interrupted:
        r.ending = f"Ctrl-C (SIGINT): {saved}"
        E.tell(f"interrupted by Ctrl-C: {saved}; exiting with {R.EXIT_INTERRUPTED}; to resume, run the same "
              f"command again ({E.rerun(r)})")
    elif r.info.is_main:
        requested = R.request_requeue()
        name = signal.Signals(r.stop.signal).name if r.stop.signal else "a signal to another rank"
        r.ending = f"{name}: {saved}"
        log.info("signal %s (seen after step %s): %s; exiting with %d to be resumed%s", r.stop.signal,
                 r.stop.seen_at, saved, R.EXIT_PREEMPTED, f" (requeue requested in {requested})" if requested
                 else "")
    D.barrier(r.info)
    return R.EXIT_INTERRUPTED if interrupted else R.EXIT_PREEMPTED


def finish(r: Trainer, last_eval: dict) -> int:
    r.pos.wall += time.time() - r.started
    if r.info.is_main:
        if r.cfg.output.save_model:
            save_model(r.rundir, r.model, r.cfg, r.built.kind)
        row = _result_row(r, last_eval, measure.after(r.cfg, r.built, r.val_set, r.device))
        r.rundir.write_rows(R.RESULT, RESULT_COLUMNS, [row])
        log.info("top1 %.2f  top5 %.2f  val_loss %.4f", row["top1"], row["top5"], row["val_loss"])
        print(f"finished: results in {r.rundir.result} ({R.METRICS}, {R.MODEL}, {R.LOG} in {r.rundir.path})")
    D.barrier(r.info)
    return R.EXIT_OK


def skipped(loader, skip: int):
    """The loader from micro-batch ``skip`` on (resuming mid-epoch); skipping costs no image loading."""
    start_at(loader, skip)
    return iter(loader)


def _result_row(r: Trainer, ev: dict, after: dict | None = None) -> dict:
    """The run's ``result.csv`` row (:func:`stitching.results.row.result_row`) from what the trainer holds."""
    cfg, pos = r.cfg, r.pos
    return result_row(run_id=r.rundir.path.name, cfg=cfg, kind=r.built.kind, plan=r.built.plan,
                      precision=r.precision, world_size=r.info.world_size, evaluation=ev,
                      train_loss=r.metrics[-1]["train_loss"] if r.metrics else "",
                      init_residual="" if pos.init_residual is None else pos.init_residual, cost=r.cost,
                      train_macs=train_macs(cfg, r.cost["macs"], r.objective.extra_macs(cfg.data.img_size)),
                      before=pos.similarity_before, after=after, images_per_s=pos.images_per_s(),
                      wall_time_s=pos.wall, pack=r.pack, device=P.device_name(r.device))
