"""The ``(train, val)`` datasets a data config names (:func:`build_datasets`; :data:`DATASET_NAMES`):
``"synthetic"`` (:class:`~stitching.data.synthetic.SyntheticImages`) or ``"imagefolder"``
(``torchvision.datasets.ImageFolder`` on ``root/train`` and ``root/val``, wrapped by
:class:`~stitching.data.bad_images.SkipBadFiles` under ``data.bad_images: skip``), and their sizes without
reading an image (:func:`dataset_sizes`, for the sweep's estimates)."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from torch.utils.data import Dataset

from stitching.data.bad_images import BAD_IMAGE_MODES, SkipBadFiles
from stitching.data.images import load_image, open_image
from stitching.data.synthetic import SyntheticImages
from stitching.messages import short_repr

__all__ = ["DATASET_NAMES", "build_datasets", "dataset_sizes"]

DATASET_NAMES = ("synthetic", "imagefolder")


def build_datasets(data: Any, train_tf: Optional[Callable], eval_tf: Optional[Callable]) -> tuple[Dataset, Dataset]:
    """``(train_ds, val_ds)`` for a data config.

    ``data`` has attributes ``name`` (``"synthetic"`` | ``"imagefolder"``), ``root``
    (imagefolder: ``root/train/<class>/*``, ``root/val/<class>/*``), ``num_classes``,
    ``train_size`` / ``val_size`` (synthetic lengths), ``img_size`` (synthetic render size) and
    ``seed``. The train set gets ``train_tf``, the val set ``eval_tf``.

    Raises ``FileNotFoundError`` (naming the path) for a missing root or split folder, and
    ``ValueError`` for an unknown name, an unset root, or class folders that differ between the
    splits or from ``num_classes``.
    """
    name = getattr(data, "name", None)
    if name == "synthetic":
        common = dict(num_classes=data.num_classes, img_size=data.img_size, seed=data.seed)
        train = SyntheticImages(length=data.train_size, split="train", transform=train_tf, **common)
        val = SyntheticImages(length=data.val_size, split="val", transform=eval_tf, **common)
        return train, val
    if name == "imagefolder":
        return _build_imagefolders(data, train_tf, eval_tf)
    raise ValueError(f"unknown dataset name {short_repr(name)}; expected one of {DATASET_NAMES}")


def dataset_sizes(data: Any) -> tuple[int, int]:
    """``(training images, validation images)`` of a data config without reading an image: the synthetic
    lengths, or the files torchvision's ``ImageFolder`` lists under ``root/train`` and ``root/val`` (what
    :func:`build_datasets` would load). ``FileNotFoundError`` (naming the path) for a missing root or split
    folder, ``ValueError`` for an unknown name or an unset root."""
    name = getattr(data, "name", None)
    if name == "synthetic":
        return data.train_size, data.val_size
    if name != "imagefolder":
        raise ValueError(f"unknown dataset name {name!r}; expected one of {DATASET_NAMES}")
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = getattr(data, "root", None)
    if root is None or str(root) == "":
        raise ValueError("data.root must be set for the 'imagefolder' dataset")
    sizes = []
    for split in ("train", "val"):
        path = os.path.join(os.path.expanduser(str(root)), split)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"imagefolder split folder does not exist: {path}")
        sizes.append(len(make_dataset(path, find_classes(path)[1], extensions=IMG_EXTENSIONS)))
    return sizes[0], sizes[1]


def _build_imagefolders(data: Any, train_tf: Optional[Callable], eval_tf: Optional[Callable]
                        ) -> tuple[Dataset, Dataset]:
    from torchvision.datasets import ImageFolder

    root = getattr(data, "root", None)
    if root is None or str(root) == "":
        raise ValueError("data.root must be set for the 'imagefolder' dataset "
                         "(layout root/train/<class>, root/val/<class>)")
    mode = getattr(data, "bad_images", "error")
    if mode not in BAD_IMAGE_MODES:
        raise ValueError(f"data.bad_images must be one of {', '.join(BAD_IMAGE_MODES)}, got {short_repr(mode)}")
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"imagefolder root does not exist or is not a directory: {root}")
    datasets = []
    for split, tf in (("train", train_tf), ("val", eval_tf)):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"imagefolder split folder does not exist: {path} "
                                    f"(expected root/{split}/<class>/...)")
        # the fast transforms decode the lazily opened file themselves (at a reduced size where they can)
        folder = ImageFolder(path, transform=tf, loader=open_image if getattr(tf, "decodes", False) else load_image)
        datasets.append(SkipBadFiles(folder) if mode == "skip" else folder)
    train, val = datasets
    # ImageFolder numbers classes by sorted folder name: a class folder missing from one split
    # would silently shift every later label, so insist on identical class lists.
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"class folders differ between {root}/train and {root}/val "
            f"(only in train: {only_train[:10]}, only in val: {only_val[:10]})"
        )
    num_classes = getattr(data, "num_classes", None)
    if num_classes is not None and num_classes != len(train.classes):
        raise ValueError(f"data.num_classes is {num_classes} but {root}/train has {len(train.classes)} class folders")
    return train, val
