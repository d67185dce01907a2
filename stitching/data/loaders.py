"""Data loaders: :func:`build_loader` puts a dataset (:mod:`stitching.data.datasets`) into a DataLoader whose
epochs are reproducible (:mod:`stitching.data.seeding`: call :func:`~stitching.data.seeding.set_epoch` before
each epoch), that leaves out and counts unreadable files under ``data.bad_images: skip``
(:mod:`stitching.data.bad_images`: each pass that skipped files logs the count and the first file's name on the
``stitching.train`` log, i.e. ``train.log``), and whose worker processes stop at exit whatever ended the program;
:func:`default_workers` -- ``data.workers: null``: loader workers from the CPUs the job gives each process.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from stitching.data.bad_images import collate_present, skip_counter
from stitching.data.seeding import EpochSeededSampler, SeededSampleDataset, seed_worker

__all__ = ["build_loader", "default_workers"]

log = logging.getLogger("stitching.train.data")  # a child of the trainer's log: lands in train.log


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
        counter = skip_counter(self.dataset)
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
        sampler = EpochSeededSampler(sampler, seed, warn_unset=train)
        dataset = SeededSampleDataset(dataset)
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
        collate_fn=collate_present,
    )
    loader.seed = int(seed)  # read by set_epoch
    if len(loader) == 0:
        raise ValueError(
            f"loader has no batches: {len(sampler)} samples per rank with batch_size={batch_size}, drop_last={train}"
        )
    return loader
