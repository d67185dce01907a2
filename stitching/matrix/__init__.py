"""Stitching matrices: every sender cut into every receiver cut, with random-init controls.

For two models (or one with itself) a matrix stitches each cut of the sender (the base config's
``model.source``) into each cut of the receiver (its ``model.destination``) -- stages or blocks, thinned by
a stride -- each cell a short run of the usual recipe, and repeats the whole matrix with the sender, the
receiver and both built with random weights (config ``model.random_init``). The modules:

- :mod:`~stitching.matrix.spec`: the matrix file, the cut lists and controls, and the sweep blocks a
  matrix is expanded into (the sweep machinery expands and launches them: :mod:`stitching.sweep`).
- :mod:`~stitching.matrix.cells`: the cells read back from the tidy results table, their calibrated scores
  against the controls, and the relative depth of each cut.
- :mod:`~stitching.matrix.closed_form`: closed-form matrices (``--closed-form``): every cell's adapters fitted by
  least squares and evaluated without training, the cells of one control and seed sharing their passes
  (:mod:`~stitching.matrix.passes`: the fit, similarity and evaluation passes themselves).
- :mod:`~stitching.matrix.predict`: how well a closed-form matrix, CKA and the least-squares residual predict
  the trained matrix (Spearman's rho, agreement of the top cells).
- ``__main__``: the command ``python -m stitching.matrix MATRIX.yaml --launcher local|slurm [--closed-form]
  [--dry-run]``.

The figures are :mod:`stitching.plots.matrix`; the method is in ``docs/method.md`` (stitching matrices).
"""
