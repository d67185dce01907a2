"""stitching.data: owns datasets (synthetic and ImageFolder), transforms and data loaders.

* :mod:`stitching.data.synthetic` -- :class:`SyntheticImages`, a procedural, learnable dataset.
* :mod:`stitching.data.transforms` -- the paper's training augmentation and timm-based evaluation
  preprocessing.
* :mod:`stitching.data.pipeline` -- the fast input pipeline (``data.pipeline: fast``): crop box first,
  reduced-size JPEG decoding, uint8 augmentation, normalisation on the device; ``data.decode: gpu``.
* :mod:`stitching.data.images` -- image files opened and converted to 8-bit RGB by the range of their mode
  (16-bit, float, palette, CMYK, alpha, 1-bit, ...); :class:`BadImageError` for a file that cannot be.
* :mod:`stitching.data.datasets` -- the ``(train, val)`` datasets a data config names (:data:`DATASET_NAMES`).
* :mod:`stitching.data.bad_images` -- ``data.bad_images``: an unreadable file stops the run or is skipped and
  counted.
* :mod:`stitching.data.seeding` -- per-sample seeds, ``set_epoch`` and ``start_at``: epoch order (and
  augmentation) a pure function of ``(seed, epoch)``.
* :mod:`stitching.data.loaders` -- ``build_loader``: the DataLoader putting them together.
"""

from stitching.data.synthetic import MAX_CLASSES, SyntheticImages

__all__ = ["MAX_CLASSES", "SyntheticImages"]
