"""The figures as a researcher uses them: nothing hidden, nothing clipped, no optional extra needed.

- Spearman's rank correlation of the CKA figure without scipy, equal to scipy's where scipy is installed.
"""

from __future__ import annotations

import numpy as np
import pytest

from stitching.plots.similarity import spearman


# ------------------------------------------------------------------------------------------ rank correlation

def test_spearman_without_scipy_by_hand():
    # ranks (1, 2, 3, 4) against (1, 3, 2, 4): r = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([10, 20, 30, 40], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ties take their average rank: x ranks (1.5, 1.5, 3, 4), y ranks (1, 2, 3, 4)
    rx, ry = np.array([1.5, 1.5, 3, 4]), np.arange(1.0, 5.0)
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman([5, 5, 6, 9], [1, 2, 3, 4]) == pytest.approx(expected) and expected < 1
    # missing pairs are left out; too few pairs or a constant side give NaN
    assert spearman([1, np.nan, 2, 3], [1, 5, 2, 3]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 2], [2, 1])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_equals_scipys():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 7, 30, 200):
        x = rng.normal(size=n).round(1)             # rounded: ties
        y = (x + rng.normal(size=n)).round(1)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
