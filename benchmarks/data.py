"""Benchmark of the ImageNet-style training input pipeline: images/s per data-loader worker count.

What it measures: JPEG decode through ``torchvision.datasets.ImageFolder`` + the paper's
``train_transform`` (RandomResizedCrop, flip, AutoAugment, ToTensor, Normalize) at ``--img-size``,
batched by ``stitching.data.loaders.build_loader`` (train mode, per-sample seeded augmentation),
for each ``--workers`` count. The JPEGs (~500x375, quality 90, like ImageNet's) are generated from
``SyntheticImages`` into a temporary directory that is removed afterwards.

Each worker count gets one untimed warm-up pass (worker start-up, page cache) and one timed
pass. Output: a table, then one JSON line ``{"images_per_s": {"0": ..., ...}, "cpu_count": ...}``.

    python benchmarks/data.py                       # defaults: --workers 0 1 2 --images 512
    python benchmarks/data.py --workers 0 4 8 16 --images 4096 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from stitching.data.loaders import build_loader, set_epoch  # noqa: E402
from stitching.data.synthetic import SyntheticImages  # noqa: E402
from stitching.data.transforms import train_transform  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
JPEG_SIZE = (500, 375)  # width x height, a typical ImageNet photo


def write_jpegs(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """``images`` JPEGs of JPEG_SIZE under ``root/<class>/``, rendered from SyntheticImages."""
    source = SyntheticImages(num_classes=classes, length=images, img_size=256, seed=seed)
    for c in range(classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        image, label = source[i]
        image = image.resize(JPEG_SIZE, Image.BILINEAR)
        image.save(root / f"class_{label:03d}" / f"{i:06d}.jpg", quality=90)


def images_per_second(root: Path, workers: int, batch_size: int, img_size: int) -> float:
    """Throughput of one timed epoch (after a warm-up epoch) with ``workers`` loader workers."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=train_transform(img_size, IMAGENET_MEAN, IMAGENET_STD))
    loader = build_loader(dataset, batch_size=batch_size, train=True, seed=0, workers=workers)
    count = 0
    for epoch in range(2):
        set_epoch(loader, epoch)
        start = time.perf_counter()
        count = 0
        for images, _ in loader:
            count += images.shape[0]
        elapsed = time.perf_counter() - start
    del loader
    return count / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to measure")
    parser.add_argument("--images", type=int, default=512, help="number of JPEGs to generate")
    parser.add_argument("--classes", type=int, default=4, help="number of class folders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224, help="RandomResizedCrop output size")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in the main process (1 = like a training job's loader)")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error("--images must be at least --batch-size (train loaders drop the last partial batch)")
    if any(w < 0 for w in args.workers):
        parser.error("--workers must be >= 0")
    torch.set_num_threads(args.threads)

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="stitching-data-bench-") as tmp:
        start = time.perf_counter()
        write_jpegs(Path(tmp), args.images, args.classes)
        print(f"wrote {args.images} JPEGs of {JPEG_SIZE[0]}x{JPEG_SIZE[1]} in {time.perf_counter() - start:.1f} s; "
              f"pipeline: ImageFolder decode + train_transform({args.img_size}) + build_loader(batch {args.batch_size})")
        print(f"{'workers':>8} {'images/s':>10} {'images/s/worker':>16}")
        for workers in args.workers:
            rate = images_per_second(Path(tmp), workers, args.batch_size, args.img_size)
            results[str(workers)] = round(rate, 1)
            print(f"{workers:>8d} {rate:>10.1f} {rate / max(workers, 1):>16.1f}", flush=True)
    summary = {
        "images_per_s": results,
        "cpu_count": os.cpu_count(),
        "images": args.images,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
