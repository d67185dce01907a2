"""The columns of ``result.csv`` (one row per finished run) and how plots read them.

Conventions
-----------
- ``kind`` is ``stitched`` (prefix -> adapters -> suffix), ``finetune`` (the fine-tuning baseline) or
  ``original`` (an unstitched model: the reference rows; its stages, gap, adapter and resize are empty).
- ``gap`` is the label ``"s->t"`` (e.g. ``"1->3"``); ``source_stage``/``destination_stage`` hold the ints.
  A block cut (``model.source_block`` / ``destination_block``) leaves the stages empty, holds the block indices
  in ``source_block``/``destination_block`` (empty for stage cuts) and labels the gap ``"b<i>->b<j>"``.
- ``top1``/``top5`` are percentages (0-100). ``macs`` are multiply-accumulates of one forward pass at the
  run's input resolution (the paper's "FLOPs"); ``flops`` = 2 x ``macs``. ``train_macs`` is the forward cost of
  one *training* image: ``macs`` plus the frozen destination's extra forward pass that ``train.objective``
  match / distill adds (averaged over the epochs for match_then_task; the backward pass not counted; empty
  without training).
- ``resize`` is the *effective* mode: where every adapter's input and output sizes already match, the
  three modes build the same module and the row says ``none``. ``resamples`` says whether any adapter
  changes the spatial size (False: the row stands for every resize mode; a sweep trains it once).
  ``resize_modes`` lists (``|``-joined) every resize mode that builds this row's very module -- also
  ``bilinear|strided`` for an "integrated" chain that must upsample -- and the plots share the row with each.
- ``images_per_s`` (``result.csv``: the run; ``metrics.csv``: the epoch) is training images per second over
  all ranks, timed over windows that leave out the first ``min(10, n // 2)`` optimizer steps of every stretch
  of ``n`` steps a process trains in an epoch (worker start-up, ``torch.compile``, cuDNN autotuning), with the
  device synchronised at the windows' edges only; evaluation is never timed. ``metrics.csv``'s
  ``epoch_time_s`` is the epoch's whole training wall time, warm-up included
  (:class:`stitching.train.perf.Throughput`).
- ``init_residual``: with ``model.init: least_squares``, the relative residual ||out - Y||^2 / ||Y - mean Y||^2
  of the initialised adapters' output against the destination's own activation at the receiving point, on
  the fit's images, before training (:mod:`stitching.stitch.lsinit`); empty for ``default``.
- ``pack`` names the pack the run was trained in (:mod:`stitching.train.pack`: one process training several runs
  that share a source, over one data pass; ``<source>.seed<seed>.<shared identity>.<members>``), '' for a run
  trained alone. A packed run's numbers are those it has alone; its ``images_per_s`` and ``wall_time_s`` are the
  pack's (every branch trains on every image of the pack's data pass).
- ``data_label`` is ``data.label``, the dataset's name in figures and tables ('' when not given: the plots
  name it by ``dataset``); not part of the recipe, so a new label never splits a figure.
- The recipe (dataset, epochs, batch sizes, lr, weight decay, schedule, image size, precision, adapter style,
  frozen-BN mode, preprocessing, ...) is :data:`stitching.results.recipe.RECIPE_COLUMNS`; rows of two
  recipes are never averaged together.
"""

from stitching.results.recipe import RECIPE_COLUMNS

#: the similarity at the join, measured by every stitched training run (stitching/train/measure.py): the number of
#: validation images; before training linear CKA and the least-squares residual between the source's features
#: and the destination's own activation; after training CKA and the mean squared error between the adapters'
#: output and that activation. Empty for fine-tuning runs, original models and ``train.similarity_images: 0``.
SIMILARITY_COLUMNS = ["similarity_images", "cka_before", "ls_residual_before", "cka_after", "match_mse_after"]

RESULT_COLUMNS = [
    "run_id", "kind", "source", "destination", "source_stage", "destination_stage", "source_block",
    "destination_block", "gap",
    "adapter", "resize", "resamples", "resize_modes", "schedule", "num_adapters",
    *RECIPE_COLUMNS, "data_label", "seed",
    "top1", "top5", "val_loss", "train_loss", "init_residual",
    "macs", "flops", "params", "trainable_params", "train_macs",
    *SIMILARITY_COLUMNS,
    "images_per_s", "wall_time_s", "world_size", "pack", "device", "git_sha", "finished_at",
]

METRICS_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "top1", "top5",
    "images_per_s", "epoch_time_s",
]
