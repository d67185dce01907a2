"""Does the input pipeline keep up with training? Both benchmarks in one run, on the node that trains.

1. ``train_step.py`` on ``--device`` (default: CUDA where available, else the CPU) at precision ``auto`` (what
   ``train.precision: auto`` picks there: bf16 on GPUs with bf16 tensor cores): the images/s of (a) the stitched
   model's training step (the trainer's own) and (c) the full destination model's, per stitch (``--pair``, or a
   custom ``--source``/``--source-stage``/``--destination-stage``).
2. ``data.py`` with the loader workers the trainer gives one training process by default (``data.workers: null``:
   :func:`stitching.data.loaders.default_workers`, the job's CPUs less one; ``--workers`` overrides), wall
   clock: the images/s of (a) the framework's pipeline and (b) torchvision's standard one, on generated
   ImageNet-sized JPEGs at the training resolution.
3. For every stitch and pipeline: **keeps up** when the loader delivers at least the images/s the step consumes;
   ``headroom`` = loader images/s / training images/s (below 1: the GPU waits for data).

The last line is JSON: ``device``, ``precision``, ``workers``, ``loader_images_per_s`` (``framework``,
``torchvision``), and per stitch ``train_images_per_s`` (``stitched``, ``full``), ``keeps_up`` and
``headroom`` for each pipeline x model.

    python benchmarks/keep_up.py                                  # a GPU node: cuda, bf16, batch 256, 224 px
    python benchmarks/keep_up.py --device cpu --batch-size 4 --img-size 64 --images 64 --rounds 1 \\
        --source resnet18 --steps 2 --warmup 1 --matmul-sizes 64  # a quick look on a CPU
"""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data as data_bench  # noqa: E402 - benchmarks/data.py
import train_step as step_bench  # noqa: E402 - benchmarks/train_step.py

from stitching import cli  # noqa: E402
from stitching.data.loaders import default_workers  # noqa: E402


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser("python benchmarks/keep_up.py", __doc__, [
        "python benchmarks/keep_up.py --device cuda"], {0: "measured (the last line is the JSON)", 2: "bad options"})
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the training step runs (default: cuda where available, else cpu)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (default: the trainer's, stitching.data.loaders.default_workers())")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: 256 on cuda, 16 on cpu)")
    p.add_argument("--img-size", type=int, default=224, help="training and loader resolution")
    p.add_argument("--images", type=int, default=2048, help="JPEGs the loader benchmark generates")
    p.add_argument("--rounds", type=int, default=3, help="timed loader rounds")
    p.add_argument("--pair", default="all", help="train_step.py's preset stitch(es)")
    p.add_argument("--source", help="a custom stitch instead (train_step.py --source)")
    p.add_argument("--source-stage", type=int, default=1)
    p.add_argument("--destination-stage", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=None,
                   help="train_step.py's reference matmul sizes (default: its own)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch_size or (256 if device == "cuda" else 16)
    workers = default_workers() if args.workers is None else args.workers

    step_args = ["--device", device, "--precision", "auto", "--batch-size", str(batch), "--img-size",
                 str(args.img_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    step_args += (["--source", args.source, "--source-stage", str(args.source_stage), "--destination-stage",
                   str(args.destination_stage)] if args.source else ["--pair", args.pair])
    step_args += ["--matmul-sizes", *map(str, args.matmul_sizes)] if args.matmul_sizes else []
    print(f"1/2 training step: python benchmarks/train_step.py {' '.join(step_args)}", flush=True)
    out = io.StringIO()
    with redirect_stdout(out):
        step_bench.main(step_args)
    print(out.getvalue(), end="")
    step = _last_json(out.getvalue())

    data_args = ["--workers", str(workers), "--clock", "wall", "--img-size", str(args.img_size), "--images",
                 str(args.images), "--rounds", str(args.rounds), "--batch-size", str(min(32, args.images))]
    print(f"2/2 input pipeline: python benchmarks/data.py {' '.join(data_args)}", flush=True)
    loader = data_bench.main(data_args)["images_per_s"]
    loaders = {"framework": loader["a"], "torchvision": loader["b"]}

    summary = {"device": step["device"], "device_name": step["device_name"], "precision": step["precision"],
               "batch_size": batch, "img_size": args.img_size, "workers": workers,
               "loader_images_per_s": loaders, "stitches": []}
    print(f"\n{'stitch':48} {'model':9} {'trains img/s':>12}  " + "  ".join(f"{k + ' headroom':>22}" for k in loaders))
    for st in step["stitches"]:
        trains = {"stitched": st["images_per_s"]["a"], "full": st["images_per_s"]["c"]}
        row = {"stitch": st["stitch"], "train_images_per_s": trains, "keeps_up": {}, "headroom": {}}
        for model, rate in trains.items():
            cells = []
            for name, feed in loaders.items():
                row["headroom"][f"{name}/{model}"] = round(feed / rate, 3)
                row["keeps_up"][f"{name}/{model}"] = feed >= rate
                cells.append(f"{feed / rate:8.2f} ({'keeps up' if feed >= rate else 'GPU waits'})")
            print(f"{st['stitch']:48} {model:9} {rate:12.1f}  " + "  ".join(f"{c:>22}" for c in cells))
        summary["stitches"].append(row)
    print(f"loader images/s with {workers} workers: framework {loaders['framework']:.0f}, "
          f"torchvision {loaders['torchvision']:.0f}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
