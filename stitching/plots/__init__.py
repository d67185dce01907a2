"""Plots: the paper's figures and Table 1 from a results CSV.

Input is the tidy table written by ``python -m stitching.collect`` (one row per finished run, columns in
:mod:`stitching.results.schema`). The modules, in the order data flows through them:

- :mod:`~stitching.plots.labels`: the paper's names for methods and architectures, and line styles.
- :mod:`~stitching.plots.aggregate`: seeds -> mean and standard error per scenario; the fine-tuning
  baseline's learning rate chosen by the best *mean* over seeds.
- :mod:`~stitching.plots.figures`: accuracy vs. stage (Figs. 3, 4-left, 9-11), accuracy vs. MACs
  (Figs. 4-right, 5, 12-14) and the cross-architecture comparison (Figs. 6, 15).
- :mod:`~stitching.plots.similarity`: accuracy vs. linear CKA at the join, before and after training.
- :mod:`~stitching.plots.table`: Table 1 (Markdown and LaTeX).
- :mod:`~stitching.plots.selection`: what the figures show of a results table, what they leave out and why
  (``selection.md``).
- :mod:`~stitching.plots.draw`: everything at once for every architecture combination present (:func:`draw`,
  which ``scripts/plot_results.py`` and the notebook both use; :func:`draw_all` writes the files).
- :mod:`~stitching.plots.matrix`: stitching-matrix heatmaps (with the random-init controls) and accuracy vs
  relative depth difference, from a matrix's cell table (``python -m stitching.matrix``).

Figures are drawn on matplotlib's Agg canvas without touching the global backend, so the same
functions work in scripts and inline in notebooks; none needs an optional extra (no scipy).
"""

from stitching.plots.aggregate import (
    aggregate,
    best_finetune_lr,
    load_results,
    originals,
    prepare,
    share_resize_free,
)
from stitching.plots.draw import DrawOptions, draw_all
from stitching.plots.figures import (
    FigureOptions,
    NoData,
    plot_accuracy_vs_macs,
    plot_accuracy_vs_stage,
    plot_cross_architecture,
)
from stitching.plots.labels import add_labels, arch_name, method_label
from stitching.plots.similarity import cka_scenarios, plot_accuracy_vs_cka
from stitching.plots.table import table1, write_table1

__all__ = [
    "DrawOptions", "FigureOptions", "NoData", "add_labels", "aggregate", "arch_name", "best_finetune_lr",
    "cka_scenarios", "draw_all",
    "load_results", "method_label", "originals", "plot_accuracy_vs_cka", "plot_accuracy_vs_macs",
    "plot_accuracy_vs_stage", "plot_cross_architecture", "prepare", "share_resize_free", "table1", "write_table1",
]
