"""Datasets from a data config, and seeded data loaders whose epochs are reproducible.

This module owns:

* :func:`build_datasets` -- the ``(train, val)`` datasets named by a data config
  (``"synthetic"``: :class:`~stitching.data.synthetic.SyntheticImages`; ``"imagefolder"``:
  ``torchvision.datasets.ImageFolder`` on ``root/train`` and ``root/val``).
* :func:`build_loader` / :func:`set_epoch` -- DataLoaders for which epoch ``e`` is a pure function
  of ``(seed, e)``, so a run resumed at epoch ``e`` sees exactly the batches an uninterrupted run
  sees.
* :func:`default_workers` -- ``data.workers: null``: loader workers from the CPUs the job gives each process.
* ``data.bad_images`` -- an unreadable or non-image file in an image folder (a corrupt or truncated JPEG, a
  text file named ``.jpg``, no read permission, a mode that cannot be converted to 8-bit RGB:
  :class:`stitching.data.images.BadImageError`) is found when it is loaded (no scan of the whole folder
  first): ``"error"`` stops with an error naming the file
  (also from DataLoader worker processes, whose exceptions PyTorch wraps); ``"skip"`` leaves the file
  out of its batch and counts it, and every pass over the data that skipped files logs the count and
  the first file's name (on the ``stitching.train`` log, i.e. ``train.log``).

**Contract: call** ``set_epoch(loader, epoch)`` **before iterating each epoch** (also the first,
and also after resuming). It sets the sample order (DistributedSampler's epoch, or re-seeds the
RandomSampler's generator with ``seed + epoch``) and, with ``epoch_seeded=True``, the seed of each
sample's augmentation. A train loader iterated twice without ``set_epoch`` in between advances the
epoch by itself and warns.

Why per-sample augmentation seeds: the random crops/flips/AutoAugment draw from torch's global
RNG inside whichever process loads the sample. With worker processes (persistent or not) that state
depends on the worker count and on how many epochs the worker has already served, so a resumed
run would get the same images in a different augmentation. With ``epoch_seeded=True`` each sample
is loaded under RNGs (torch CPU, ``random``, ``numpy``) seeded from ``(seed, epoch, index)`` and
restored afterwards, which makes batches identical for any ``workers`` and across resumes.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import random
import signal
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from torch.utils.data import default_collate

from stitching.data.images import BadImageError, load_image, open_image
from stitching.data.pipeline import EncodedSample, collate_encoded
from stitching.data.synthetic import SyntheticImages
from stitching.messages import short_repr

__all__ = ["build_datasets", "build_loader", "set_epoch", "start_at", "sample_seed", "seed_worker", "DATASET_NAMES",
           "default_workers", "BAD_IMAGE_MODES"]

DATASET_NAMES = ("synthetic", "imagefolder")
BAD_IMAGE_MODES = ("error", "skip")  # data.bad_images: stop naming the file | leave it out and count it
log = logging.getLogger("stitching.train.data")  # a child of the trainer's log: lands in train.log
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- datasets


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
        datasets.append(_SkipBadFiles(folder) if mode == "skip" else folder)
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


# --------------------------------------------------------------------------- unreadable files


class _SkipBadFiles(Dataset):
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


def _collate_present(batch: list):
    """``default_collate`` of the samples that loaded (an unreadable file skipped by ``bad_images: skip``
    arrives as ``None``); undecoded samples (``data.decode: gpu``) stay a list, their labels a tensor."""
    kept = [b for b in batch if b is not None]
    if not kept:
        raise BadImageError(f"every file of a batch of {len(batch)} is unreadable (data.bad_images=skip)")
    if isinstance(kept[0][0], EncodedSample):
        return collate_encoded([b[0] for b in kept]), torch.tensor([b[1] for b in kept])
    return default_collate(kept)


def _skip_counter(dataset: Dataset) -> "_SkipBadFiles | None":
    """The :class:`_SkipBadFiles` under a loader's dataset (wrapped by Subset / the seeding wrapper), or None."""
    for _ in range(8):
        if isinstance(dataset, _SkipBadFiles):
            return dataset
        dataset = getattr(dataset, "__dict__", {}).get("dataset")
    return None


_LIVE_LOADERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _shutdown_live_workers() -> None:
    """Stop the worker processes of loaders still alive at exit (an exception's traceback keeps their iterator
    referenced). Otherwise multiprocessing's exit hook would terminate them with SIGTERM, which workers
    ignore (preemption signals are the main process's), and wait for them for ever."""
    for loader in list(_LIVE_LOADERS):
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


class _Loader(DataLoader):
    """A DataLoader that logs how many files ``bad_images: skip`` left out of each pass over the data, and
    whose worker processes are stopped at exit whatever ended the program."""

    skipped_last_pass = 0

    def __iter__(self):
        if self.num_workers > 0:
            _LIVE_LOADERS.add(self)
        counter = _skip_counter(self.dataset)
        if counter is None:
            yield from super().__iter__()
            return
        with counter.skipped.get_lock():
            counter.skipped.value = 0
            counter.first_skipped.value = b""
        try:
            yield from super().__iter__()
        finally:
            self.skipped_last_pass = skipped = counter.skipped.value
            if skipped:
                split = os.path.basename(str(getattr(counter.dataset, "root", ""))) or "data"
                first = counter.first_skipped.value.decode(errors="replace")
                log.warning("data.bad_images=skip: %d unreadable file(s) left out of this pass over %s; first: %s",
                            skipped, split, first)


# --------------------------------------------------------------------------- seeding


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch`` of a run seeded ``seed`` (splitmix64 mixing)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB) & _MASK64
    for _ in range(2):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``numpy`` and ``random`` from the worker's torch seed, and ignore
    the stop signals (SIGTERM, SIGUSR1, SIGINT): SLURM sends them to every process of a job and a terminal's
    Ctrl-C reaches every process in its foreground group, and a worker that died of one would make the main
    process fail (exit 1, a traceback per worker) before it could checkpoint; the main process checkpoints
    and exits, and its workers are shut down with it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class _EpochSeededSampler(Sampler):
    """Wraps a sampler; yields ``(index, sample_seed(seed, epoch, index))`` and owns the epoch."""

    def __init__(self, sampler: Sampler, seed: int, warn_unset: bool) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.epoch = 0
        self._epoch_set = False
        self._iterated = False
        self._warn_unset = warn_unset
        self.skip = 0  # indices to pass over on the next iteration (resuming mid-epoch), see start_at

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_set = True
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self.epoch)
        elif isinstance(self.sampler, RandomSampler) and self.sampler.generator is not None:
            self.sampler.generator.manual_seed(self.seed + self.epoch)

    def __iter__(self) -> Iterator[Any]:
        if self._iterated and not self._epoch_set:
            if self._warn_unset:
                warnings.warn(
                    "data loader iterated again without set_epoch(loader, epoch); advancing the epoch "
                    "automatically, but call set_epoch each epoch so that resumed runs reproduce batches",
                    stacklevel=3,
                )
            self.set_epoch(self.epoch + 1)
        self._iterated, self._epoch_set = True, False
        skip, self.skip = self.skip, 0
        for index in itertools.islice(self.sampler, skip, None):
            yield (index, sample_seed(self.seed, self.epoch, index))

    def __len__(self) -> int:
        return len(self.sampler)


class _SeededSampleDataset(Dataset):
    """Loads ``dataset[index]`` with torch (CPU), ``random`` and ``numpy`` RNGs seeded for that sample.

    In the main process (``workers=0``) the global RNG states are restored afterwards, so loading
    does not disturb the training loop's own randomness.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # delegate e.g. ``classes`` / ``targets``; guard against recursion during unpickling
        # never delegate dunders: DataLoader would find e.g. a wrapped Subset's ``__getitems__`` and bypass
        # the seeding ``__getitem__`` below
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if torch.utils.data.get_worker_info() is not None:
            # a worker process: nobody else draws from its RNGs, so skip saving/restoring them
            _seed_all(seed)
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            _seed_all(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    """Seed torch's CPU generator, ``random`` and ``numpy``'s global RNG (not CUDA's)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------- loaders


def default_workers(environ=None, cpus: int | None = None) -> int:
    """Loader workers per training process when ``data.workers`` is null: the CPUs the job gives this process
    less one for the process itself -- ``SLURM_CPUS_PER_TASK`` (else the CPUs this process may run on,
    ``os.sched_getaffinity``) divided by the processes sharing them (``LOCAL_WORLD_SIZE``, set by
    ``torch.distributed.run``; one task per GPU under ``srun`` has its own CPUs)."""
    env = os.environ if environ is None else environ
    if cpus is None:
        slurm = str(env.get("SLURM_CPUS_PER_TASK", "")).strip()
        if slurm.isdigit() and int(slurm) > 0:
            cpus = int(slurm)
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = str(env.get("LOCAL_WORLD_SIZE", "")).strip()
    per_process = cpus // max(1, int(local)) if local.isdigit() and int(local) > 0 else cpus
    return max(0, per_process - 1)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    seed: int,
    workers: int | None,
    rank: int = 0,
    world_size: int = 1,
    epoch_seeded: bool = True,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader whose epoch ``e`` (after ``set_epoch(loader, e)``) depends only on ``(seed, e)``.

    * ``world_size > 1``: ``DistributedSampler(shuffle=train, seed=seed, drop_last=train)``; each
      rank gets its shard.
    * otherwise: a ``RandomSampler`` driven by its own ``torch.Generator`` (seeded ``seed + epoch``
      by :func:`set_epoch`) when ``train``, sequential order when not.
    * ``workers=None``: :func:`default_workers`. ``drop_last=train``; ``pin_memory`` as given (the trainer:
      when it trains on CUDA; None: when CUDA is available); ``persistent_workers`` for a train loader with
      workers (an evaluation loader's workers end with each pass instead of idling through training);
      workers seeded via :func:`seed_worker` and a seeded loader generator.
    * ``epoch_seeded=True`` (default): every sample's augmentation is seeded from
      ``(seed, epoch, index)``, so batches are identical for any worker count and across resumes.
      ``epoch_seeded=False``: the plain PyTorch behaviour (augmentation from the worker RNG
      streams; only the order is reproducible).

    Call :func:`set_epoch` before each epoch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    train = bool(train)
    if world_size > 1:
        sampler: Sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train
        )
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(int(seed)))
    else:
        sampler = SequentialSampler(dataset)

    if epoch_seeded:
        sampler = _EpochSeededSampler(sampler, seed, warn_unset=train)
        dataset = _SeededSampleDataset(dataset)
    loader = _Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        persistent_workers=workers > 0 and train,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(int(seed) + 1),
        collate_fn=_collate_present,
    )
    loader.seed = int(seed)  # read by set_epoch
    if len(loader) == 0:
        raise ValueError(
            f"loader has no batches: {len(sampler)} samples per rank with batch_size={batch_size}, drop_last={train}"
        )
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the next iteration of ``loader`` epoch ``epoch``: call this before every epoch.

    Sets the DistributedSampler's epoch, or re-seeds the RandomSampler's generator to
    ``seed + epoch``, and (``epoch_seeded`` loaders) the epoch of the per-sample augmentation seeds.
    A no-op for the order of sequential (eval) loaders.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    sampler = loader.sampler
    if isinstance(sampler, _EpochSeededSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        seed = getattr(loader, "seed", None)
        if seed is None:
            raise ValueError("set_epoch needs a loader made by build_loader (it records the seed)")
        sampler.generator.manual_seed(seed + epoch)


def start_at(loader: DataLoader, batch: int) -> None:
    """Make the next iteration of ``loader`` begin at batch ``batch`` of the epoch set by :func:`set_epoch`.

    For resuming mid-epoch: the skipped samples' indices are drawn from the sampler (so the order is the
    uninterrupted run's) but their images are never loaded. Call after :func:`set_epoch`.
    """
    sampler = loader.sampler
    if not isinstance(sampler, _EpochSeededSampler):
        raise ValueError("start_at needs a loader made by build_loader with epoch_seeded=True")
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch!r}")
    sampler.skip = batch * loader.batch_size
