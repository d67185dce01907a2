"""Seeding: data loaders whose epoch ``e`` is a pure function of ``(seed, e)``, so a run resumed at epoch ``e``
(or mid-epoch: :func:`start_at`) sees exactly the batches an uninterrupted run sees.

Owns the per-sample seeds (:func:`sample_seed`), the worker seeding (:func:`seed_worker`), the sampler that
owns the epoch (:class:`EpochSeededSampler`), the dataset wrapper loading each sample under its seed
(:class:`SeededSampleDataset`), :func:`set_epoch` and :func:`start_at`;
:func:`stitching.data.loaders.build_loader` puts them together.

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

import itertools
import random
import signal
import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

__all__ = ["sample_seed", "seed_worker", "EpochSeededSampler", "SeededSampleDataset", "set_epoch", "start_at"]

_MASK64 = (1 << 64) - 1


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


class EpochSeededSampler(Sampler):
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


class SeededSampleDataset(Dataset):
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


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the next iteration of ``loader`` epoch ``epoch``: call this before every epoch.

    Sets the DistributedSampler's epoch, or re-seeds the RandomSampler's generator to
    ``seed + epoch``, and (``epoch_seeded`` loaders) the epoch of the per-sample augmentation seeds.
    A no-op for the order of sequential (eval) loaders.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    sampler = loader.sampler
    if isinstance(sampler, EpochSeededSampler):
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
    if not isinstance(sampler, EpochSeededSampler):
        raise ValueError("start_at needs a loader made by build_loader with epoch_seeded=True")
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch!r}")
    sampler.skip = batch * loader.batch_size
