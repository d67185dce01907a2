"""Similarity measures against closed forms (linear CKA, affine least-squares residual)."""

import pytest
import torch

from stitching.similarity import LeastSquares, MinibatchCKA, channels_last_samples


def _cka(x, y, batch):
    cka = MinibatchCKA()
    for i in range(0, x.shape[0], batch):
        cka.update(x[i:i + batch], y[i:i + batch])
    return cka.value()


def test_cka_is_one_under_an_orthogonal_map_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 40, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    assert _cka(x, x @ q, 64) == pytest.approx(1.0, abs=1e-10)
    y = torch.randn(256, 30, generator=g, dtype=torch.float64) + x[:, :30]
    assert _cka(x, 7.5 * y, 64) == pytest.approx(_cka(x, y, 64), abs=1e-10)
    assert _cka(0.01 * x, y, 64) == pytest.approx(_cka(x, y, 64), abs=1e-10)
    # features of any format are flattened per example
    assert _cka(x.reshape(256, 10, 2, 2), (x @ q).reshape(256, 4, 10), 64) == pytest.approx(1.0, abs=1e-10)


def test_cka_of_independent_features_is_about_zero():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4096, 20, generator=g), torch.randn(4096, 20, generator=g)
    assert abs(_cka(x, y, 256)) < 0.02


def test_minibatch_estimate_equals_the_full_batch_one_over_the_same_batches():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 12, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(12, 8, generator=g, dtype=torch.float64))
    from stitching.similarity import hsic_unbiased

    batches = [(0, 32), (32, 64), (64, 96)]
    gram = lambda a: a @ a.T  # noqa: E731
    xy = sum(hsic_unbiased(gram(x[i:j]), gram(y[i:j])) for i, j in batches)
    xx = sum(hsic_unbiased(gram(x[i:j]), gram(x[i:j])) for i, j in batches)
    yy = sum(hsic_unbiased(gram(y[i:j]), gram(y[i:j])) for i, j in batches)
    assert _cka(x, y, 32) == pytest.approx(float(xy / (xx * yy).sqrt()), abs=1e-12)
    # one batch: the plain unbiased CKA, which for a single batch has the closed form of Song et al.
    n = 96
    k, l = gram(x).fill_diagonal_(0), gram(y).fill_diagonal_(0)
    ones = torch.ones(n, dtype=torch.float64)

    def hsic(k, l):
        return (torch.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))
    assert _cka(x, y, n) == pytest.approx(float(hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()), abs=1e-12)


def test_least_squares_residual_is_zero_for_an_affine_map_and_one_for_independent_features():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    a, b = torch.randn(16, 9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    ls = LeastSquares()
    for i in range(0, 2000, 300):        # streamed, uneven last batch
        ls.update(x[i:i + 300], x[i:i + 300] @ a + b)
    assert ls.value() == pytest.approx(0.0, abs=1e-8)
    a_hat, b_hat = ls.solve()
    assert torch.allclose(a_hat, a, atol=1e-6) and torch.allclose(b_hat, b, atol=1e-6)
    ind = LeastSquares()
    ind.update(torch.randn(20000, 8, generator=g), torch.randn(20000, 5, generator=g))
    assert ind.value() == pytest.approx(1.0, abs=0.01)


def test_samples_are_positions_or_tokens():
    x = torch.arange(2 * 3 * 2 * 2.).reshape(2, 3, 2, 2)           # image: (B, C, H, W)
    s = channels_last_samples(x, "image")
    assert s.shape == (8, 3) and torch.equal(s[1], x[0, :, 0, 1])
    assert torch.equal(channels_last_samples(x.permute(0, 2, 3, 1), "bhwc"), s)
    t = torch.randn(2, 5, 4)                                        # tokens_cls: class + 2x2 grid
    assert channels_last_samples(t, "tokens_cls").shape == (10, 4)
