"""Benchmark of packed runs (:mod:`stitching.train.pack`): the ResNet-50 self-stitch gaps trained one after another
and as one pack, through the real trainer on generated ImageNet-sized JPEGs.

The group: the paper's 9 ResNet-50 self-stitch gaps (source stage 1-3 to destination stage s-4), bottleneck
adapters with bilinear resizing, random-init weights (``model.pretrained: false``: the same compute), the
paper's recipe (``configs/paper/imagenet.yaml``) at ``--img-size`` px, batch ``--batch-size``, one epoch over
``--steps`` x batch generated JPEGs (``benchmarks/data.py``'s photo-like images, ~500x375) in ImageFolder layout.

(a) ``separate``: each run ``python -m stitching.train --config FILE``, one process after the other;
(b) ``packed``: the 9 runs as one pack, ``python -m stitching.train --config F1 --config F2 ...``;
(c) ``ideal``: in this process, the same pack built by the trainer (:func:`stitching.train.pack._start`), then
    per step: the batch loaded and sent to the device once, the shared prefix run once, and each branch's
    :func:`stitching.train.step.train_step`, each piece timed alone (device-synchronised) and summed: one data
    pass + one prefix forward + each branch alone, with none of the pack's bookkeeping.

The training time of (a) and (b) is the trainer's own (result.csv's ``images_per_s`` over its timed window: the
steps after the warm-up, :data:`stitching.train.perf.WARMUP_STEPS` or half the steps); (c) times the same steps.
Rates are *branch-images* per second (images x runs trained on them). Ratios: ``speedup_packed`` = a / b (time),
``overhead_vs_ideal`` = b / c, and ``speedup_by_macs``, what the shared prefix allows by MAC count (a run alone
does, per image, its prefix P once and the rest R forward and about as much backward: ``sum(P + 2R) / (max P +
sum 2R)``). The processes' wall times (start-up, model building, evaluation included) are
printed too: packing also saves 8 of 9 start-ups. Then the paper sweep's totals separate vs packed
(:func:`stitching.sweep.packs.savings`, ``--pack`` K). The output ends with one JSON line.

    python benchmarks/pack.py                                   # CPU, 224 px, batch 16, 8 steps
    python benchmarks/pack.py --img-size 64 --steps 4 --gaps 3 --source resnet18   # a quick look
    python benchmarks/pack.py --device cuda                     # the loader at the trainer's default workers
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.data import write_jpegs  # noqa: E402
from stitching import cli  # noqa: E402
from stitching import rundir as R  # noqa: E402
from stitching.data.seeding import set_epoch  # noqa: E402
from stitching.sweep.packs import pack_runs, prefix_gmacs, savings  # noqa: E402
from stitching.sweep.spec import PAPER, expand  # noqa: E402
from stitching.train import distributed as D  # noqa: E402
from stitching.train import ending as E  # noqa: E402
from stitching.train import pack as PK  # noqa: E402
from stitching.train import perf as P  # noqa: E402
from stitching.train import resolve  # noqa: E402
from stitching.train.step import train_step  # noqa: E402

#: the paper's ResNet-50 self-stitch gaps: (source stage, destination stage)
GAPS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4), (3, 3), (3, 4)]
CLASSES = 10


def write_configs(where: Path, data_root: Path, args, gaps) -> list[Path]:
    """One config file per gap (its output.dir ``where/<gap>``)."""
    where.mkdir(parents=True, exist_ok=True)
    workers = "null" if args.workers is None else args.workers
    files = []
    for s, d in gaps:
        path = where / f"{args.source}_{s}to{d}.yaml"
        path.write_text(
            f"base: {json.dumps(str(ROOT / 'configs' / 'paper' / 'imagenet.yaml'))}\n"
            f"model: {{source: {args.source}, destination: {args.source}, source_stage: {s}, destination_stage: {d}, "
            f"adapter: bottleneck, resize: bilinear, pretrained: false}}\n"
            f"data: {{root: {json.dumps(str(data_root))}, num_classes: {CLASSES}, img_size: {args.img_size}, "
            f"workers: {workers}}}\n"
            f"train: {{epochs: 1, batch_size: {args.batch_size}, per_device_batch_size: {args.batch_size}, "
            f"device: {args.device}, precision: {args.precision}, log_every: 1000}}\n"
            f"output: {{dir: {json.dumps(str(where / path.stem))}}}\n")
        files.append(path)
    return files


def trainer(files: list[Path], env: dict) -> float:
    """``python -m stitching.train`` on ``files`` (one: a run; several: a pack); its wall time."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stitching.train", *[a for f in files for a in ("--config", str(f))]],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the trainer exited {proc.returncode} on {files[0]}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def window(args) -> tuple[int, int]:
    """(warm-up steps, timed steps) of the trainer's meter over one epoch of ``args.steps`` steps."""
    warm = min(P.WARMUP_STEPS, args.steps // 2)
    return warm, args.steps - warm


def timed_seconds(run_dir: Path, args) -> float:
    """The trainer's timed training seconds of a run: its timed window's images over result.csv's images/s."""
    with (run_dir / R.RESULT).open() as f:
        [row] = list(csv.DictReader(f))
    return window(args)[1] * args.batch_size / float(row["images_per_s"])


def mac_bound(files: list[Path], where: Path) -> float:
    """The speed-up the shared prefix allows by MAC count: per image, a run alone does ``P + 2 R`` (its frozen
    prefix P once, the rest R forward and, about as much again, backward); the pack ``max P + sum 2 R``."""
    alone = packed = 0.0
    deepest = 0.0
    for f in files:
        with (where / f.stem / R.RESULT).open() as fh:
            [row] = list(csv.DictReader(fh))
        p = prefix_gmacs(resolve(f)) * 1e9
        rest = float(row["macs"]) - p
        alone += p + 2 * rest
        packed += 2 * rest
        deepest = max(deepest, p)
    return alone / (packed + deepest)


def ideal(files: list[Path], args) -> dict:
    """(c): the pack built by the trainer, its steps' pieces timed alone (module docstring); seconds of the timed
    window: ``data``, ``prefix``, ``branches`` (one per run) and ``total``."""
    device = torch.device(args.device)
    sync = P.cuda_sync(device)
    cfgs = [resolve(f) for f in files]
    info = D.init(device.type)
    pk = PK.Pack([PK.Branch(cfg, R.RunDir(Path(cfg.output.dir)), info, device, pack="ideal", index=i)
                  for i, cfg in enumerate(cfgs)], info, device, "ideal")
    try:
        PK._start(pk, force=True)
        for b in pk.active:
            b.st.objective = b.objective.at(0)
            b.st.runner.train()
            b.model.train()
            b.st.reset_sums(b.pos.sums)
        set_epoch(pk.train_loader, 0)
        warm, _ = window(args)
        data = prefix = 0.0
        branches = [0.0] * len(pk.active)
        batches = iter(pk.train_loader)
        for i in range(args.steps):
            sync()
            t0 = time.perf_counter()
            x, y = next(batches)
            x, y = pk.to_device[0](x, y)
            sync()
            t1 = time.perf_counter()
            x = PK._prefix(pk, x, pk.active)
            sync()
            t2 = time.perf_counter()
            own = []
            for b in pk.active:
                t = time.perf_counter()
                train_step(b.st, x, y, i)
                sync()
                own.append(time.perf_counter() - t)
            pk.frozen.cache.clear()
            if i >= warm:
                data, prefix = data + t1 - t0, prefix + t2 - t1
                branches = [a + b for a, b in zip(branches, own)]
    finally:
        for b in pk.active:
            E.close(b, R.EXIT_PREEMPTED, "benchmark: the ideal pass is not a run")
        PK._restore_log(pk)
    return {"data": data, "prefix": prefix, "branches": branches, "total": data + prefix + sum(branches)}


def paper_totals(k: int) -> dict:
    """The paper sweep's (paper part and full) jobs, data passes and prefix GMACs per image, separate vs packed."""
    _, _, exp = expand(ROOT / "configs" / "sweeps" / "paper.yaml", Path(tempfile.gettempdir()) / "paper-runs",
                       extensions=True)
    out = {}
    for part, runs in (("paper", exp.part(PAPER)), ("full", exp.runs)):
        totals = savings(runs, pack_runs(runs, k))
        out[part] = {key: {"separate": round(a, 1), "packed": round(b, 1), "ratio": round(a / b, 2)}
                     for key, (a, b) in totals.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = cli.parser("python benchmarks/pack.py", __doc__, [
        "python benchmarks/pack.py                                   # CPU, 224 px, batch 16, 8 steps",
        "python benchmarks/pack.py --img-size 64 --steps 4 --gaps 3 --source resnet18   # a quick look"],
        cli.SIMPLE_EXITS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--source", default="resnet50", help="the self-stitched model (4 stages; tests: resnet18)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="steps of the one epoch (the first half, at most "
                                                             f"{P.WARMUP_STEPS}, are the trainer's warm-up)")
    parser.add_argument("--gaps", type=int, default=len(GAPS), help="the first N of the 9 gaps")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers (default: 0 on the CPU, the trainer's default on CUDA)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--pack", type=int, default=16, help="K for the paper sweep's totals")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    if not 1 <= args.gaps <= len(GAPS):
        parser.error(f"--gaps must be 1..{len(GAPS)}")
    if args.workers is None and args.device == "cpu":
        args.workers = 0
    gaps = GAPS[:args.gaps]
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        data_root = work / "jpegs"
        kb = write_jpegs(data_root, args.steps * args.batch_size, CLASSES)
        print(f"{args.steps * args.batch_size} training JPEGs (mean {kb:.0f} KB), {len(gaps)} gaps, "
              f"{args.img_size} px, batch {args.batch_size}, {args.device}, {args.threads} threads", flush=True)
        separate = write_configs(work / "separate", data_root, args, gaps)
        walls_a = [trainer([f], env) for f in separate]
        time_a = sum(timed_seconds(work / "separate" / f.stem, args) for f in separate)
        by_macs = mac_bound(separate, work / "separate")
        print(f"(a) separate: {time_a:.2f} s trained, {sum(walls_a):.1f} s wall", flush=True)
        packed = write_configs(work / "packed", data_root, args, gaps)
        wall_b = trainer(packed, env)
        time_b = timed_seconds(work / "packed" / packed[0].stem, args)
        print(f"(b) packed: {time_b:.2f} s trained, {wall_b:.1f} s wall", flush=True)
        c = ideal(write_configs(work / "ideal", data_root, args, gaps), args)
        print(f"(c) ideal: {c['total']:.2f} s (data {c['data']:.2f}, prefix {c['prefix']:.2f}, branches "
              + " ".join(f"{t:.2f}" for t in c["branches"]) + ")", flush=True)
    images = window(args)[1] * args.batch_size * len(gaps)         # branch-images of the timed window
    totals = paper_totals(args.pack)
    result = {
        "images_per_s": {"a": round(images / time_a, 1), "b": round(images / time_b, 1),
                         "c": round(images / c["total"], 1)},
        "timed_s": {"a": round(time_a, 3), "b": round(time_b, 3), "c": round(c["total"], 3)},
        "ideal_parts_s": {"data": round(c["data"], 3), "prefix": round(c["prefix"], 3),
                          "branches": [round(t, 3) for t in c["branches"]]},
        "process_wall_s": {"a": round(sum(walls_a), 1), "b": round(wall_b, 1)},
        "speedup_packed": round(time_a / time_b, 3),
        "overhead_vs_ideal": round(time_b / c["total"], 3),
        "speedup_wall": round(sum(walls_a) / wall_b, 3),
        "speedup_by_macs": round(by_macs, 3),
        "paper_sweep": totals,
        "source": args.source, "gaps": len(gaps), "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
        "timed_steps": window(args)[1], "device": args.device, "threads": args.threads, "workers": args.workers,
        "mean_jpeg_kb": round(kb, 1), "torch": torch.__version__,
    }
    print(f"a/b (packed speed-up) {result['speedup_packed']:.2f}x (by MAC count: {by_macs:.2f}x), b/c (overhead vs ideal) "
          f"{result['overhead_vs_ideal']:.2f}, process walls a/b {result['speedup_wall']:.2f}x")
    for part, t in totals.items():
        print(f"paper sweep ({part}), --pack {args.pack}: " + ", ".join(
            f"{k} {v['separate']:,} -> {v['packed']:,} ({v['ratio']}x)" for k, v in t.items()))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
