"""``data.bad_images``: what a loader does with an image file that cannot be read (what such a file is, and the
conversion that finds it, are :mod:`stitching.data.images`' :class:`~stitching.data.images.BadImageError`).

An unreadable or non-image file in an image folder (a corrupt or truncated JPEG, a text file named ``.jpg``, no
read permission, a mode that cannot be converted to 8-bit RGB) is found when it is loaded (no scan of the whole
folder first): ``"error"`` stops with an error naming the file (also from DataLoader worker processes, whose
exceptions PyTorch wraps); ``"skip"`` (:class:`SkipBadFiles`) leaves the file out of its batch
(:func:`collate_present`) and counts it, and every pass over the data that skipped files logs the count and
the first file's name (:mod:`stitching.data.loaders`, on the ``stitching.train`` log, i.e. ``train.log``).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from stitching.data.images import BadImageError
from stitching.data.pipeline import EncodedSample, collate_encoded

__all__ = ["BAD_IMAGE_MODES", "SkipBadFiles", "collate_present", "skip_counter"]

BAD_IMAGE_MODES = ("error", "skip")  # data.bad_images: stop naming the file | leave it out and count it


class SkipBadFiles(Dataset):
    """Wraps an ImageFolder: an unreadable file loads as ``None`` (left out of its batch by the collate
    function) and is counted in memory shared with the DataLoader's worker processes."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.skipped = multiprocessing.Value("q", 0)
        self.first_skipped = multiprocessing.Array("c", 4096)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # classes, targets, root, ... of the ImageFolder
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except BadImageError as err:
            with self.skipped.get_lock():
                self.skipped.value += 1
                if not self.first_skipped.value:
                    self.first_skipped.value = err.message.encode()[: len(self.first_skipped) - 1]
            return None


def collate_present(batch: list):
    """``default_collate`` of the samples that loaded (an unreadable file skipped by ``bad_images: skip``
    arrives as ``None``); undecoded samples (``data.decode: gpu``) stay a list, their labels a tensor."""
    kept = [b for b in batch if b is not None]
    if not kept:
        raise BadImageError(f"every file of a batch of {len(batch)} is unreadable (data.bad_images=skip)")
    if isinstance(kept[0][0], EncodedSample):
        return collate_encoded([b[0] for b in kept]), torch.tensor([b[1] for b in kept])
    return default_collate(kept)


def skip_counter(dataset: Dataset) -> "SkipBadFiles | None":
    """The :class:`SkipBadFiles` under a loader's dataset (wrapped by Subset / the seeding wrapper), or None."""
    for _ in range(8):
        if isinstance(dataset, SkipBadFiles):
            return dataset
        dataset = getattr(dataset, "__dict__", {}).get("dataset")
    return None
