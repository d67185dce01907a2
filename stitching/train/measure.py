"""The similarity at the join that every stitched training run writes to ``result.csv``.

Owns when and on what it is measured (its cells in the row: :func:`stitching.results.row.similarity_cells`,
the columns :data:`stitching.results.schema.SIMILARITY_COLUMNS`):

- on the first ``train.similarity_images`` validation images (evaluation transforms, in order, batches of
  :data:`BATCH`; 0 switches it off), on the main process only;
- *before training* (once, before epoch 1; the values travel in the checkpoint's position, so a resumed run
  neither measures again nor loses them): linear CKA and the affine least-squares residual between the
  source's features at the join and the destination's own activation at the receiving point
  (:func:`stitching.stitch.join.similarity_before`);
- *after training* (at the end): linear CKA and the mean squared error between the trained adapter chain's
  output and the destination's own activation (:func:`stitching.stitch.join.similarity_after`).

Fine-tuning runs and original models have no adapter chain at a join: their cells are empty. The loader is
seeded on its own (:func:`stitching.data.loaders.build_loader`) and the models run in eval mode, so measuring
draws nothing from the global random generators: a run trains the same with or without it.
"""

from __future__ import annotations

import torch

from stitching.kinds import STITCHED

BATCH = 64      # images per batch: the unbiased HSIC estimator wants several; bounded memory for large features


def applies(cfg, built) -> bool:
    """Whether the run measures it: a stitched model with adapters and ``train.similarity_images > 0``."""
    return built.kind == STITCHED and built.target is not None and cfg.train.similarity_images > 0


def _images(cfg, val_set):
    from stitching.data.loaders import build_loader

    n = min(cfg.train.similarity_images, len(val_set))
    subset = torch.utils.data.Subset(val_set, range(n))
    loader = build_loader(subset, min(BATCH, max(n, 1)), False, cfg.train.seed, cfg.data.workers)
    return (x for x, _ in loader)


def before(cfg, built, val_set, device) -> dict | None:
    """``{cka, ls_residual, n}`` before training, or None when the run does not measure it."""
    from stitching.stitch.join import similarity_before

    if not applies(cfg, built):
        return None
    return similarity_before(built, _images(cfg, val_set), device)


def after(cfg, built, val_set, device) -> dict | None:
    """``{cka, mse, n}`` after training, or None when the run does not measure it."""
    from stitching.stitch.join import similarity_after

    if not applies(cfg, built):
        return None
    return similarity_after(built, _images(cfg, val_set), device)

