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

from __future__ import annotations

from dataclasses import dataclass

from stitching.results.recipe import RECIPE_COLUMNS


@dataclass(frozen=True)
class Column:
    """One column of ``result.csv``: its name, the type :func:`stitching.results.collect.normalize_columns` gives
    it (``str``: kept as read; ``int``: nullable integers where every value is whole; ``float``) and whether a
    ``result.csv`` without it is damaged (``required``; the others are filled with missing values when absent:
    older runs, hand-made rows). Its value is set by :func:`stitching.results.row.result_row`."""

    name: str
    type: type = str
    required: bool = False


#: the similarity at the join, measured by every stitched training run (stitching/train/measure.py): the number of
#: validation images; before training linear CKA and the least-squares residual between the source's features
#: and the destination's own activation; after training CKA and the mean squared error between the adapters'
#: output and that activation. Empty for fine-tuning runs, original models and ``train.similarity_images: 0``.
SIMILARITY = (Column("similarity_images", int), Column("cka_before", float), Column("ls_residual_before", float),
              Column("cka_after", float), Column("match_mse_after", float))
SIMILARITY_COLUMNS = [c.name for c in SIMILARITY]

#: the recipe columns (:data:`stitching.results.recipe.RECIPE_COLUMNS`) that are numbers; the others are strings
_RECIPE_TYPES = {"num_classes": int, "img_size": int, "epochs": int, "batch_size": int, "lr": float,
                 "weight_decay": float}
_REQUIRED_RECIPE = ("lr",)

#: every column of ``result.csv``, in order: the one declaration (a new column is one entry here plus its value in
#: :func:`stitching.results.row.result_row`)
COLUMNS: tuple[Column, ...] = (
    Column("run_id", required=True), Column("kind", required=True), Column("source", required=True),
    Column("destination", required=True), Column("source_stage", int, True), Column("destination_stage", int, True),
    Column("source_block", int), Column("destination_block", int), Column("gap"),
    Column("adapter", required=True), Column("resize", required=True), Column("resamples"), Column("resize_modes"),
    Column("schedule"), Column("num_adapters", int),
    *(Column(c, _RECIPE_TYPES.get(c, str), c in _REQUIRED_RECIPE) for c in RECIPE_COLUMNS),
    Column("data_label"), Column("seed", int, True),
    Column("top1", float, True), Column("top5", float), Column("val_loss", float), Column("train_loss", float),
    Column("init_residual"),
    Column("macs", float, True), Column("flops", float), Column("params", int), Column("trainable_params", int),
    Column("train_macs", float),
    *SIMILARITY,
    Column("images_per_s", float), Column("wall_time_s", float), Column("world_size", int), Column("pack"),
    Column("device"), Column("git_sha"), Column("finished_at"),
)

RESULT_COLUMNS = [c.name for c in COLUMNS]
#: the columns a ``result.csv`` must have to be usable by the plots
REQUIRED_COLUMNS = [c.name for c in COLUMNS if c.required]
INT_COLUMNS = [c.name for c in COLUMNS if c.type is int]
FLOAT_COLUMNS = [c.name for c in COLUMNS if c.type is float]

METRICS_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "top1", "top5",
    "images_per_s", "epoch_time_s",
]
