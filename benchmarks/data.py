"""Benchmark of the training input pipeline, per CPU core, side by side in one run.

Three variants on the same generated ImageNet-sized JPEGs, in one process with one thread
(``torch.set_num_threads(1)``, loaders with ``--workers`` workers, default 0: everything on this core), timed
in interleaved rounds so that load from other processes hits all three alike (the median round counts):

- **(a) framework**: the trainer's own code path -- ``stitching.data.datasets.build_datasets`` (ImageFolder
  opening files lazily) with ``stitching.data.transforms.build_transforms(..., device)`` (``data.pipeline:
  fast``: RandomResizedCrop box drawn first, JPEG decoded at a reduced size where the box allows,
  antialiased uint8 resize of the box only, flip, AutoAugment(IMAGENET) on uint8), batched by
  ``build_loader`` (per-sample seeded, as in training). Its batches are uint8; the float conversion and
  normalisation run on the device (``stitching.data.pipeline.DeviceNormalize``) and are not counted here.
- **(b) torchvision**: torchvision's standard ImageNet training pipeline -- ``ImageFolder`` (PIL loader),
  ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip`` + ``AutoAugment(IMAGENET)`` + ``ToTensor`` +
  ``Normalize``, a plain shuffled ``DataLoader``.
- **(c) decode**: the JPEG decode alone with libjpeg-turbo at full size (PIL ``Image.open(path).convert("RGB")``
  over the same files): the ceiling of any pipeline that decodes every image at full size, as (b) does.
- **(c') decode, simplejpeg** (printed when the optional ``simplejpeg`` is installed: ``pip install
  '.[fast-jpeg]'``, which (a) then decodes with): the same full-size decode into a numpy array
  (``simplejpeg.decode_jpeg(bytes, "RGB")``, libjpeg-turbo without Pillow's buffers), for reference.

Both pipelines use ``--interpolation`` (default bilinear, torchvision's default) for the crop resize and
AutoAugment. The JPEGs: ``--images`` files of varied sizes around 500x375 (width 400-600, aspect 0.6-0.9,
portrait one in eight), quality 90, 4:2:0, of photo-like content (a 1/f-spectrum colour background, like
natural images' statistics, with a rendered object from ``SyntheticImages`` on it), ~100 KB each as
ImageNet's average; written to a temporary directory that is removed afterwards.

Rates are images per CPU-second of this process by default (``--clock cpu``, with ``--workers 0``): the
per-core cost, which other processes competing for the cores do not distort as they do wall time;
``--clock wall`` gives images/s (and is what ``--workers N`` uses).

Output: a table, the ratios a/b and a/c, the implied images/s of an 8-core and a 16-core node (per-core rate
x cores: data loading scales with worker processes), then one JSON line with ``ratio_a_over_b`` and
``ratio_a_over_c``.

    python benchmarks/data.py                                   # 512 JPEGs, 5 rounds, batch 32, 224 px
    python benchmarks/data.py --images 1024 --rounds 7 --interpolation bicubic
    python benchmarks/data.py --photo-scale 2 --images 256            # ~1000x750: reduced-size decoding
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from stitching import cli  # noqa: E402
from stitching.config import DataConfig  # noqa: E402
from stitching.data.datasets import build_datasets  # noqa: E402
from stitching.data.loaders import build_loader  # noqa: E402
from stitching.data.seeding import set_epoch  # noqa: E402
from stitching.data.synthetic import SyntheticImages  # noqa: E402
from stitching.data.transforms import build_transforms  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(rng: np.random.Generator, width: int, height: int, obj: Image.Image) -> Image.Image:
    """A photo-like image: a 1/f-spectrum colour background (natural images' power law) with ``obj``
    (a rendered object on its own background) blended into a random region."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(width, height))
    planes = []
    for _ in range(3):
        spectrum = amp * np.exp(2j * np.pi * rng.random(amp.shape))
        plane = np.fft.irfft2(spectrum, s=(height, width))
        planes.append((plane - plane.mean()) / plane.std())
    x = np.stack(planes, -1) @ rng.normal(0.0, 0.35, (3, 3)) + rng.uniform(-0.4, 0.4, 3)
    img = Image.fromarray((np.clip(x * 0.22 + 0.5, 0.0, 1.0) * 255).astype(np.uint8))
    side = int(min(width, height) * rng.uniform(0.4, 0.8))
    left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    img.paste(Image.blend(img.crop((left, top, left + side, top + side)), obj.resize((side, side), Image.BILINEAR),
                          0.5), (left, top))
    return img


def write_jpegs(root: Path, images: int, classes: int, seed: int = 0, scale: float = 1.0) -> float:
    """``images`` JPEGs under ``root/train/<class>/`` and ``root/val/<class>/`` (a few), ``scale`` times the
    ImageNet-like size; mean size in KB."""
    rng = np.random.default_rng(seed)
    objects = SyntheticImages(num_classes=classes, length=images, img_size=128, seed=seed)
    sizes = []
    for split, count in (("train", images), ("val", classes)):
        for c in range(classes):
            (root / split / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            width = int(rng.integers(400, 601) * scale)
            height = int(width * rng.uniform(0.6, 0.9))
            if rng.random() < 0.125:
                width, height = height, width
            obj, label = objects[i]
            path = root / split / f"class_{label:03d}" / f"{i:06d}.jpg"
            photo(rng, width, height, obj).save(path, quality=90)
            sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1e3


def framework_loader(root: Path, classes: int, img_size: int, batch_size: int, workers: int, interpolation: str):
    """(a): the trainer's datasets, transforms and loader for ``data.name: imagefolder`` (pipeline fast)."""
    # the config's own data section (every key at its default, so a key added later is here too)
    data = DataConfig(name="imagefolder", root=str(root), num_classes=classes, img_size=img_size,
                      normalize="imagenet", train_interpolation=interpolation, pipeline="fast", decode="cpu")
    model_cfg = {"input_size": (3, img_size, img_size), "interpolation": interpolation, "mean": IMAGENET_MEAN,
                 "std": IMAGENET_STD, "crop_pct": 0.875, "crop_mode": "center"}
    train_tf, eval_tf = build_transforms(model_cfg, data, torch.device("cpu"))
    train, _ = build_datasets(data, train_tf, eval_tf)
    return build_loader(train, batch_size, True, 0, workers, pin_memory=False)


def torchvision_loader(root: Path, img_size: int, batch_size: int, workers: int, interpolation: str):
    """(b): torchvision's standard ImageNet training pipeline."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    mode = T.InterpolationMode(interpolation)
    tf = T.Compose([T.RandomResizedCrop(img_size, interpolation=mode), T.RandomHorizontalFlip(),
                    T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=mode), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(0))


def _has_simplejpeg() -> bool:
    from stitching.data import pipeline

    return pipeline.simplejpeg is not None


def _clock(kind: str) -> float:
    return time.process_time() if kind == "cpu" else time.perf_counter()


def time_loader(loader, epoch: int, clock: str) -> float:
    """images per second of ``clock`` over one pass."""
    if hasattr(loader, "seed"):
        set_epoch(loader, epoch)
    start, count = _clock(clock), 0
    for images, _ in loader:
        count += images.shape[0]
    return count / (_clock(clock) - start)


def time_decode(files: list[Path], clock: str) -> float:
    """images per second of ``clock`` decoding every file at full size (libjpeg-turbo via PIL)."""
    start = _clock(clock)
    for path in files:
        with Image.open(path) as img:
            img.convert("RGB")
    return len(files) / (_clock(clock) - start)


def time_decode_simplejpeg(files: list[Path], clock: str) -> float:
    """images per second of ``clock`` decoding every file at full size with simplejpeg (file read included)."""
    import simplejpeg

    start = _clock(clock)
    for path in files:
        simplejpeg.decode_jpeg(path.read_bytes(), "RGB")
    return len(files) / (_clock(clock) - start)


def main(argv: list[str] | None = None) -> dict:
    parser = cli.parser("python benchmarks/data.py", __doc__, [
        "python benchmarks/data.py --images 512 --workers 0 --clock cpu"], cli.SIMPLE_EXITS)
    parser.add_argument("--images", type=int, default=512, help="number of training JPEGs to generate")
    parser.add_argument("--classes", type=int, default=4, help="number of class folders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224, help="RandomResizedCrop output size")
    parser.add_argument("--interpolation", default="bilinear", choices=("nearest", "bilinear", "bicubic"))
    parser.add_argument("--workers", type=int, default=0,
                        help="loader workers of (a) and (b) (0: in this process, i.e. one core)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--photo-scale", type=float, default=1.0,
                        help="photo size relative to ~500x375 (2: ~1000x750, where reduced-size decoding applies)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: images per CPU-second of this process (default with --workers 0: the per-core "
                             "cost, unaffected by other processes competing for the cores); wall: images/s")
    args = parser.parse_args(argv)
    clock = args.clock or ("cpu" if args.workers == 0 else "wall")
    if clock == "cpu" and args.workers:
        parser.error("--clock cpu counts this process only: use it with --workers 0")
    if args.images < args.batch_size:
        parser.error("--images must be at least --batch-size (train loaders drop the last partial batch)")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="stitching-data-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        kb = write_jpegs(root, args.images, args.classes, scale=args.photo_scale)
        files = sorted((root / "train").rglob("*.jpg"))
        size = f"{500 * args.photo_scale:.0f}x{375 * args.photo_scale:.0f}"
        print(f"wrote {len(files)} JPEGs (~{size}, varied; mean {kb:.0f} KB) in {time.perf_counter() - start:.1f} s; "
              f"{args.img_size} px, batch {args.batch_size}, {args.interpolation}, workers {args.workers}, "
              f"torch threads {torch.get_num_threads()}, {args.rounds} rounds, clock {clock}")
        loaders = {"a": framework_loader(root, args.classes, args.img_size, args.batch_size, args.workers,
                                         args.interpolation),
                   "b": torchvision_loader(root, args.img_size, args.batch_size, args.workers, args.interpolation)}
        keys = ("a", "b", "c") + (("c'",) if _has_simplejpeg() else ())
        rates: dict[str, list[float]] = {k: [] for k in keys}
        for round_ in range(args.rounds + 1):                     # round 0 warms up (page cache, workers)
            for key in keys:
                if key in loaders:
                    rate = time_loader(loaders[key], round_, clock)
                else:
                    rate = (time_decode if key == "c" else time_decode_simplejpeg)(files, clock)
                if round_:
                    rates[key].append(rate)
        del loaders

    median = {k: statistics.median(v) for k, v in rates.items()}
    names = {"a": "(a) framework (fast, uint8)", "b": "(b) torchvision ImageNet", "c": "(c) decode only (full)",
             "c'": "(c') decode only, simplejpeg"}
    unit = "images/CPU-s" if clock == "cpu" else "images/s"
    print(f"{'variant':30} {unit:>12} {'ms/image':>9}   rounds ({unit})")
    for key in rates:
        print(f"{names[key]:30} {median[key]:12.1f} {1e3 / median[key]:9.3f}   "
              f"[{', '.join(f'{r:.0f}' for r in rates[key])}]")
    a_b, a_c = median["a"] / median["b"], median["a"] / median["c"]
    per_core = {k: v / max(args.workers, 1) for k, v in median.items()}
    print(f"a/b = {a_b:.2f}, a/c = {a_c:.2f}; per core: (a) {per_core['a']:.0f}, (b) {per_core['b']:.0f} images/s "
          f"-> 8-core node (a) {8 * per_core['a']:.0f} / (b) {8 * per_core['b']:.0f}, "
          f"16-core node (a) {16 * per_core['a']:.0f} / (b) {16 * per_core['b']:.0f} images/s")
    summary = {
        "images_per_s": {k: round(v, 1) for k, v in median.items()},
        "rounds": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "ratio_a_over_b": round(a_b, 3), "ratio_a_over_c": round(a_c, 3),
        "node_images_per_s": {"8": {k: round(8 * per_core[k]) for k in ("a", "b")},
                              "16": {k: round(16 * per_core[k]) for k in ("a", "b")}},
        "mean_jpeg_kb": round(kb, 1), "photo_scale": args.photo_scale, "images": len(files), "batch_size": args.batch_size,
        "img_size": args.img_size, "interpolation": args.interpolation, "workers": args.workers, "clock": clock,
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "jpeg_decoder_a": "simplejpeg" if _has_simplejpeg() else "pillow",
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
