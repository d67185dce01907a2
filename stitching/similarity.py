"""How alike two representations of the same images are: linear CKA and the affine least-squares residual.

Owns the two measures, each a streaming accumulator fed batch by batch (never holding all the features):

- :class:`MinibatchCKA`: linear CKA with the unbiased minibatch estimator of Nguyen, Raghu & Kornblith (2021):
  per batch of n >= 4 examples, the unbiased HSIC estimator of Song et al. (2012) of (K, L), (K, K) and
  (L, L) with linear kernels K = X X^T, L = Y Y^T is added up, and
  ``CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L))``. Features of any format are flattened
  per example. Invariant to orthogonal maps and isotropic scaling of either side; about 0 for independent
  features.
- :class:`LeastSquares`: the relative residual of predicting Y from X with the best affine map
  ``Y ~ X A + b``, channel-wise over positions / tokens (each position of each image is a sample: what a
  linear adapter can do). Streams the normal equations (sums of X^T X, X^T Y, the sums of X, Y and of
  ||Y||^2) and solves once at the end, in float64; a ridge of ``eps * mean diag`` is only for numerical
  safety. Residual = ||Y - X A - b||^2 / ||Y - mean(Y)||^2: 0 for an exact affine map, about 1 when X says
  nothing about Y.

:func:`channels_last_samples` turns a tensor of a known format into (samples, channels) for the latter.
"""

from __future__ import annotations

import math

import torch

from stitching.models.formats import is_token, to_image


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012)'s unbiased HSIC estimator of two n x n Gram matrices (n >= 4)."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 examples per batch, got {n}")
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    kl = k @ l
    return ((kl.diagonal().sum() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * kl.sum() / (n - 2))
            / (n * (n - 3)))


class MinibatchCKA:
    """Linear CKA accumulated over batches (``update(x, y)`` with matching first dimensions; ``value()``)."""

    def __init__(self):
        self.xy = self.xx = self.yy = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.flatten(1).double(), y.flatten(1).double()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"CKA needs the same examples on both sides, got {x.shape[0]} and {y.shape[0]}")
        k, l = x @ x.T, y @ y.T
        self.xy += float(hsic_unbiased(k, l))
        self.xx += float(hsic_unbiased(k, k))
        self.yy += float(hsic_unbiased(l, l))
        self.n += x.shape[0]

    def value(self) -> float:
        denom = math.sqrt(max(self.xx, 0.0) * max(self.yy, 0.0))
        return self.xy / denom if denom > 0 else float("nan")


def channels_last_samples(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """(samples, channels): every grid position (every token, prefix tokens included, of a token sequence) of
    every example is a sample."""
    if is_token(fmt):
        return x.reshape(-1, x.shape[-1])
    img = to_image(x, fmt)
    return img.permute(0, 2, 3, 1).reshape(-1, img.shape[1])


class LeastSquares:
    """Relative residual of the best affine map from X to Y (``update(x, y)`` with (samples, channels)
    matrices, the same samples on both sides; ``value()``); ``solve()`` returns the map (A, b)."""

    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self.xtx = self.xty = self.sx = self.sy = None
        self.yty = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"least squares needs (samples, channels) pairs, got {tuple(x.shape)}, {tuple(y.shape)}")
        if self.xtx is None:
            self.xtx, self.xty = x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1], y.shape[1])
            self.sx, self.sy = x.new_zeros(x.shape[1]), y.new_zeros(y.shape[1])
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.yty += float((y * y).sum())
        self.n += x.shape[0]

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, b) minimising ||Y - X A - b||^2, from centred normal equations (+ a tiny ridge)."""
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xtx - self.n * torch.outer(mx, mx)
        cxy = self.xty - self.n * torch.outer(mx, my)
        ridge = self.eps * max(float(cxx.diagonal().mean()), 1e-300)
        a = torch.linalg.solve(cxx + ridge * torch.eye(cxx.shape[0], dtype=cxx.dtype), cxy)
        return a, my - mx @ a

    def value(self) -> float:
        mx, my = self.sx / self.n, self.sy / self.n
        a, _ = self.solve()
        cxx = self.xtx - self.n * torch.outer(mx, mx)
        cxy = self.xty - self.n * torch.outer(mx, my)
        total = self.yty - self.n * float(my @ my)          # ||Y - mean Y||^2
        explained = float((2 * cxy * a).sum() - (a * (cxx @ a)).sum())
        return max(total - explained, 0.0) / total if total > 0 else float("nan")
