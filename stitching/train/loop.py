"""The training run: the paper's recipe from a config to a finished run directory.

AdamW (lr 0.002, weight decay 0.05 by default) over the *trainable* parameters only, cosine annealing to 0
stepped per optimizer step (or per epoch), effective batch = per-device batch x world size x gradient
accumulation, bf16 autocast on CUDA (fp16 with a gradient scaler on request), channels_last and BatchNorm
folding of frozen parts (:mod:`stitching.stitch.fast`) and optional ``torch.compile``. Evaluation after
every epoch (top-1, top-5, loss), reduced exactly over ranks. A checkpoint is written atomically after
every epoch and when SIGTERM/SIGUSR1 arrives (then the process exits with :data:`EXIT_PREEMPTED`); running
the same command again resumes from it, mid-epoch included, and reproduces an uninterrupted run's numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from stitching.config import Config, ConfigError, check_files, load_config
from stitching.results.schema import METRICS_COLUMNS, RESULT_COLUMNS
from stitching.train import EXIT_PREEMPTED
from stitching.train import distributed as D
from stitching.train.rundir import RunDir, comparable_config

log = logging.getLogger("stitching.train")


# ------------------------------------------------------------------------------------------- set-up
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
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


def default_run_dir(cfg: Config) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / (Path(cfg.path).stem if cfg.path else "run")


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


class _Preemption:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # SLURM may deliver the signal twice (to the job step and forwarded by the batch script): ignore
        # the rest, or Python's default handler would turn the orderly exit 75 into a kill (143).
        self.signal = signum
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self):
        if self.signal is None:
            for sig, handler in self._old.items():
                signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------ the run
def run(cfg: Config, run_dir: Path | None = None, force: bool = False) -> int:
    """Train/evaluate ``cfg`` into ``run_dir``; returns the process exit code."""
    check_files(cfg)
    device = resolve_device(cfg.train.device)
    info = D.init(device.type)
    from stitching.data.loaders import BadImageError

    try:
        return _run(cfg, Path(run_dir) if run_dir else default_run_dir(cfg), force, device, info)
    except BadImageError as err:  # met while loading (also when re-raised from a DataLoader worker)
        hint = " (data.bad_images=skip leaves such files out)" if cfg.data.bad_images == "error" else ""
        raise cfg.error("data.root", err.message + hint) from None
    finally:
        D.shutdown()


def _run(cfg: Config, path: Path, force: bool, device: torch.device, info: D.DistInfo) -> int:
    from stitching.data.loaders import build_datasets, build_loader, set_epoch
    from stitching.data.transforms import data_config_for_size, eval_transform, train_transform
    from stitching.stitch.cost import count_cost
    from stitching.stitch.stitcher import build_model

    rundir = RunDir(path)
    per_device, accum = batch_split(cfg, info.world_size)
    cfg.output.dir = str(path)

    # ---- the run directory's state, decided before anything is written
    if rundir.finished and not force:
        if info.is_main:
            print(f"run already finished: results in {rundir.file('result.csv')} (pass --force to redo it)")
        return 0
    old_cfg = rundir.file("config.yaml")
    if old_cfg.is_file() and not force:
        old = yaml.safe_load(old_cfg.read_text()) or {}
        if comparable_config(old) != comparable_config(cfg.to_dict()):
            diff = sorted(f"{s}.{k}" for s, v in comparable_config(cfg.to_dict()).items() for k in v
                          if old.get(s, {}).get(k) != v[k])
            raise ConfigError("output.dir", str(path), cfg.source_of("output.dir"),
                              f"holds a different run (differs in {', '.join(diff) or 'sections'}); "
                              "choose another output.dir or pass --force (the old files are kept in previous/)")

    # ---- model and data (all checks before any compute or write)
    torch.manual_seed(cfg.train.seed)
    try:
        built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
    except (ValueError, FileNotFoundError) as err:
        key = getattr(err, "key", None) or ("model.destination_weights" if "destination" in str(err)
                                            else "model.source_weights")
        raise cfg.error(key, str(err).splitlines()[0]) from None
    model = built.model
    dcfg = data_config_for_size(built.data_config, cfg.data.img_size)
    train_tf = train_transform(cfg.data.img_size, dcfg["mean"], dcfg["std"], auto_augment=cfg.data.auto_augment,
                               interpolation=dcfg.get("interpolation", "bilinear"),
                               min_crop_scale=cfg.data.min_crop_scale)
    try:
        train_ds, val_ds = build_datasets(dataclasses.replace(cfg.data, num_classes=cfg.num_classes), train_tf,
                                          eval_transform(dcfg))
    except (FileNotFoundError, ValueError) as err:
        raise cfg.error("data.root" if cfg.data.name == "imagefolder" else "data.name", str(err)) from None
    classes = getattr(train_ds, "classes", None)
    if classes is not None and len(classes) != cfg.num_classes:
        raise cfg.error("data.num_classes", f"{len(classes)} class folders found in {cfg.data.root}/train")
    epochs = cfg.train.epochs
    steps_per_epoch = len(train_ds) // cfg.train.batch_size
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if epochs > 0 and steps_per_epoch < 1:
        raise cfg.error("train.batch_size", f"larger than the {len(train_ds)} training images")
    if epochs > 0 and built.kind == "original" and not any(p.requires_grad for p in model.parameters()):
        raise cfg.error("train.epochs", "nothing to train")

    # ---- now the run directory may be touched
    if info.is_main:
        if force:
            moved = rundir.archive()
            if moved:
                print(f"--force: earlier files moved to {moved}")
        path.mkdir(parents=True, exist_ok=True)
        rundir.write_text("config.yaml", cfg.to_yaml())
        _setup_logging(rundir.file("train.log"))
    D.barrier(info)

    cost = count_cost(model, cfg.data.img_size)
    model.to(device)
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    runner, channels_last = _fast_runner(model, cfg, device, built.kind)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if info.enabled and epochs > 0:
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[info.local_rank] if device.type == "cuda"
                                                     else None)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay) if trainable else None
    total_steps = max(1, epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, steps_per_epoch, total_steps)) \
        if optimizer else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    train_loader = build_loader(train_ds, per_device, True, cfg.train.seed, cfg.data.workers, info.rank,
                                info.world_size) if epochs > 0 else None
    val_loader = build_loader(torch.utils.data.Subset(val_ds, range(info.rank, len(val_ds), info.world_size)),
                              per_device, False, cfg.train.seed, cfg.data.workers)

    # ---- resume
    state = {"epoch": 0, "batch": 0, "step": 0, "wall": 0.0, "train_time": 0.0, "train_images": 0,
             "sums": [0.0, 0.0, 0.0]}
    metrics = rundir.read_rows("metrics.csv") if not force else []
    ckpt = rundir.load_checkpoint()
    if ckpt is not None:
        _trainable_module(model, built.kind).load_state_dict(ckpt["trainable"])
        if optimizer:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng(ckpt["rng"])
        state = ckpt["position"]
        metrics = metrics[: state["epoch"]]
        log_main(info, f"resuming {path} at epoch {state['epoch'] + 1}, batch {state['batch']} "
                       f"(step {state['step']} of {total_steps})")
    else:
        metrics = []
        log_main(info, f"run {path}: {built.kind} {cfg.model.source}"
                       + (f" {cfg.model.source_stage}->{cfg.model.destination_stage} {cfg.model.destination or cfg.model.source}"
                          if built.plan else "")
                       + f", {cost['macs'] / 1e9:.3f} GMACs, {cost['trainable_params']:,} trainable of "
                         f"{cost['params']:,} params; {epochs} epochs x {steps_per_epoch} steps, batch "
                         f"{cfg.train.batch_size} = {per_device} x {info.world_size} x {accum}, {precision}, {device}")

    preempt = _Preemption()
    started = time.time()
    last_eval = None
    try:
        for epoch in range(state["epoch"], epochs):
            set_epoch(train_loader, epoch)
            stopped = _train_epoch(runner, model, optimizer, scheduler, scaler, train_loader, state, epoch,
                                   steps_per_epoch, accum, precision, channels_last, device, info, preempt,
                                   cfg, started, rundir, built.kind, total_steps)
            if stopped:
                return EXIT_PREEMPTED
            last_eval = evaluate(runner, val_loader, precision, channels_last, device, info)
            s = D.all_sum(state["sums"], device, info)
            row = {"epoch": epoch + 1, "step": state["step"], "lr": _lr(optimizer),
                   "train_loss": s[0] / max(s[2], 1), "train_top1": 100 * s[1] / max(s[2], 1),
                   **last_eval, "images_per_s": _ips(state), "epoch_time_s": state.pop("epoch_time", 0.0)}
            metrics.append(row)
            state.update(epoch=epoch + 1, batch=0, sums=[0.0, 0.0, 0.0])
            if info.is_main:
                rundir.write_rows("metrics.csv", METRICS_COLUMNS, metrics)
                state["wall"] += time.time() - started
                started = time.time()
                rundir.save_checkpoint(_checkpoint(model, built.kind, optimizer, scheduler, scaler, state))
                log.info("epoch %d/%d: train_loss %.4f  val top1 %.2f top5 %.2f loss %.4f  %.1f img/s", epoch + 1,
                         epochs, row["train_loss"], row["top1"], row["top5"], row["val_loss"], row["images_per_s"])
            D.barrier(info)
    finally:
        preempt.restore()
    if last_eval is None:
        last_eval = evaluate(runner, val_loader, precision, channels_last, device, info)
    state["wall"] += time.time() - started

    if info.is_main:
        if cfg.output.save_model:
            _save_model(rundir, model, cfg, built.kind)
        row = _result_row(cfg, built, cost, last_eval, metrics, state, precision, device, info, path)
        rundir.write_rows("result.csv", RESULT_COLUMNS, [row])
        log.info("top1 %.2f  top5 %.2f  val_loss %.4f", row["top1"], row["top5"], row["val_loss"])
        print(f"finished: results in {rundir.file('result.csv')} (metrics.csv, model.safetensors, train.log "
              f"in {path})")
    D.barrier(info)
    return 0


def log_main(info: D.DistInfo, msg: str) -> None:
    if info.is_main:
        log.info(msg)


def _setup_logging(file: Path) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.FileHandler(file), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def _fast_runner(model: nn.Module, cfg: Config, device: torch.device, kind: str):
    from stitching.stitch import fast

    want = cfg.train.channels_last
    channels_last = fast.default_channels_last(device) if want == "auto" else bool(want)
    runner = fast.prepare_for_training(model, fold_bn=cfg.train.fold_bn and kind == "stitched",
                                       channels_last=channels_last, compile=cfg.train.compile)
    return runner, channels_last


def _lr_factor(cfg: Config, steps_per_epoch: int, total_steps: int):
    if cfg.train.lr_schedule == "constant":
        return lambda step: 1.0
    if cfg.train.lr_schedule_unit == "epoch":
        epochs = max(1, cfg.train.epochs)
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step // steps_per_epoch, epochs) / epochs))
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _train_epoch(runner, model, optimizer, scheduler, scaler, loader, state, epoch, steps, accum, precision,
                 channels_last, device, info, preempt, cfg, started, rundir, kind, total_steps) -> bool:
    """One epoch from ``state['batch']``; returns True when preempted (after saving a checkpoint)."""
    from tqdm import tqdm

    runner.train()
    model.train()
    skip = state["batch"]
    batches = itertools.islice(_skipped(loader, skip), steps * accum - skip)
    bar = tqdm(total=steps, initial=skip // accum, disable=not info.is_main, desc=f"epoch {epoch + 1}",
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0, leave=False)
    t0, images = time.time(), 0
    # running (loss sum, correct, count) on the device: no host sync per step; seeded with the checkpointed
    # sums so a resumed epoch adds in the same order as an uninterrupted one
    acc = torch.tensor(state["sums"], dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(batches, start=skip):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last_micro = (i + 1) % accum == 0
        sync = runner.no_sync() if info.enabled and not last_micro else contextlib.nullcontext()
        with sync, _autocast(precision, device):
            logits = runner(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.train.label_smoothing)
        scaler.scale(loss / accum).backward()
        with torch.no_grad():
            acc[0] += loss.detach() * len(y)
            acc[1] += (logits.argmax(1) == y).sum()
            acc[2] += len(y)
        images += len(y) * info.world_size
        state["batch"] = i + 1
        if last_micro:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            bar.update(1)
            if bar.n % cfg.train.log_every == 0 or bar.n == steps:
                elapsed = time.time() - t0
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{_lr(optimizer):.2e}",
                                img_s=f"{images / max(elapsed, 1e-9):.0f}")
            if D.any_rank(preempt.signal is not None, device, info):
                state["sums"] = acc.tolist()
                _account(state, images, t0)
                bar.close()
                if info.is_main:
                    state["wall"] += time.time() - started
                    rundir.save_checkpoint(_checkpoint(model, kind, optimizer, scheduler, scaler, state))
                    log.info("signal %s: checkpoint saved at epoch %d, step %d of %d; exiting with %d to be "
                             "resumed", preempt.signal, epoch + 1, state["step"], total_steps, EXIT_PREEMPTED)
                D.barrier(info)
                return True
    bar.close()
    state["sums"] = acc.tolist()
    _account(state, images, t0)
    return False


def _account(state: dict, images: int, t0: float) -> None:
    elapsed = time.time() - t0
    state["train_time"] += elapsed
    state["train_images"] += images
    state["epoch_time"] = elapsed


def _skipped(loader, skip: int):
    """The loader from micro-batch ``skip`` on (resuming mid-epoch); skipping costs no image loading."""
    from stitching.data.loaders import start_at

    start_at(loader, skip)
    return iter(loader)


@torch.no_grad()
def evaluate(runner, loader, precision, channels_last, device, info) -> dict:
    runner.eval()
    loss_sum = top1 = top5 = n = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(precision, device):
            logits = runner(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        top1 += (topk[:, 0] == y).sum().item()
        top5 += (topk == y[:, None]).any(dim=1).sum().item()
        n += len(y)
    loss_sum, top1, top5, n = D.all_sum([loss_sum, top1, top5, n], device, info)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "val_loss": loss_sum / n}


def _ips(state: dict) -> float:
    return state["train_images"] / state["train_time"] if state["train_time"] > 0 else 0.0


def _lr(optimizer) -> float:
    return optimizer.param_groups[0]["lr"] if optimizer else 0.0


# ----------------------------------------------------------------------------- checkpoints and results
def _trainable_module(model: nn.Module, kind: str) -> nn.Module:
    return model.adapters if kind == "stitched" else model


def _checkpoint(model, kind, optimizer, scheduler, scaler, state) -> dict:
    return {"trainable": {k: v.detach().cpu() for k, v in _trainable_module(model, kind).state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer else {},
            "scheduler": scheduler.state_dict() if scheduler else {},
            "scaler": scaler.state_dict(), "rng": _get_rng(), "position": dict(state),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _get_rng() -> dict:
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
           "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
    random.setstate((rng["python_version"], tuple(rng["python"]), None))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _save_model(rundir: RunDir, model: nn.Module, cfg: Config, kind: str) -> None:
    """``model.safetensors``: the whole model's weights (native key names for an original model, so
    ``model.source_weights`` can point at it) with the config that rebuilds it in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = rundir.file(".model.safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"config": cfg.to_yaml(), "kind": kind})
    tmp.replace(rundir.file("model.safetensors"))


def load_trained(run_dir: str | Path) -> nn.Module:
    """Rebuild a finished run's model from its ``model.safetensors`` (weights and config inside)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from stitching.stitch.stitcher import build_model

    file = Path(run_dir) / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    cfg_path = Path(run_dir) / "config.yaml"
    cfg = load_config(cfg_path, check=False)
    mcfg = dataclasses.replace(cfg.model, pretrained=False, source_weights=None, destination_weights=None)
    built = build_model(mcfg, cfg.data.img_size, cfg.num_classes)
    if meta.get("kind") != built.kind:
        raise ValueError(f"{file} holds a {meta.get('kind')} model but {cfg_path} builds a {built.kind} one")
    built.model.load_state_dict(load_file(str(file)), strict=True)
    return built.model.eval()


def _result_row(cfg, built, cost, ev, metrics, state, precision, device, info, path) -> dict:
    m, plan = cfg.model, built.plan
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "run_id": path.name, "kind": built.kind, "source": m.source,
        "destination": plan.destination if plan else m.source,
        "source_stage": plan.source_stage if plan else "", "destination_stage": plan.destination_stage if plan else "",
        "gap": f"{plan.source_stage}->{plan.destination_stage}" if plan else "",
        "adapter": plan.adapter if plan else "", "resize": plan.effective_resize if plan and plan.kind == "stitched" else "",
        "resamples": any(st.size_in != st.size_out for st in plan.steps) if plan and plan.kind == "stitched" else "",
        "schedule": plan.schedule if plan and plan.kind == "stitched" else "",
        "num_adapters": plan.num_adapters if plan else 0,
        "pretrained": m.pretrained if not (m.source_weights or m.destination_weights) else "weights_file",
        "dataset": cfg.data.name if cfg.data.name == "synthetic" else Path(cfg.data.root).name,
        "num_classes": cfg.num_classes, "img_size": cfg.data.img_size, "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
        "seed": cfg.train.seed, "top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["val_loss"],
        "train_loss": metrics[-1]["train_loss"] if metrics else "",
        **cost, "images_per_s": _ips(state), "wall_time_s": state["wall"], "world_size": info.world_size,
        "device": dev, "precision": precision, "git_sha": git_sha(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
