"""Positional re-injection: the destination's own position embedding added to the adapters' output tokens.

Owns config key ``model.pos_embed`` (:data:`POS_EMBED_MODES`): ``none`` (default, as the paper) or
``reinject``. The paper guesses, without testing it, that ViT destinations stitch worst partly because
their position embedding is added once, in the stem, and never again: a ViT suffix receives whatever the
adapters give it. With ``reinject`` the destination's learned absolute position embedding (timm's
``pos_embed``), resampled to the token grid at the receiving point with timm's ``resample_abs_pos_embed``
where the grid differs, is added to the adapter chain's output (:class:`PosReinject`, the last module of
``StitchedModel.adapters``). Prefix tokens (class, distillation, registers) get their own rows of the
embedding where the model has rows for them (``no_embed_class=False``), else nothing. The module has no
parameters: the embedding is a buffer (not trained), computed once at build time and saved with the
model, because the destination's stem that holds the embedding is not part of a stitched model: a run
reloaded from its ``model.safetensors`` re-injects the embedding it was trained with.

:func:`learned_pos_embed` says whether a destination has such an embedding (the config check and the
stitcher both ask it).
"""

from __future__ import annotations

import torch
from torch import nn

POS_EMBED_MODES = ("none", "reinject")


def learned_pos_embed(model: nn.Module) -> tuple[torch.Tensor, tuple[int, int], int] | None:
    """``(embedding (1, E + H*W, C), its grid (H, W), E = rows for prefix tokens)`` of a timm ViT-like
    ``model`` with a learned absolute position embedding; None for any other model."""
    pos = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(pos, nn.Parameter) or pos.ndim != 3 or grid is None:
        return None
    grid = tuple(int(g) for g in grid)
    embedded = pos.shape[1] - grid[0] * grid[1]
    if getattr(model, "no_embed_class", False):
        embedded = 0 if embedded == 0 else -1
    if embedded < 0:
        return None
    return pos, grid, embedded


class PosReinject(nn.Module):
    """``x + embedding`` on a token sequence with ``prefix`` leading tokens and a ``grid`` of grid tokens."""

    def __init__(self, pos: torch.Tensor, old_grid: tuple[int, int], embedded: int, prefix: int,
                 grid: tuple[int, int]):
        super().__init__()
        from timm.layers import resample_abs_pos_embed

        pos = pos.detach()
        if tuple(grid) != tuple(old_grid):
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(old_grid),
                                         num_prefix_tokens=embedded)
        add = pos.new_zeros(1, prefix + grid[0] * grid[1], pos.shape[2])
        add[:, prefix:] = pos[:, embedded:]
        k = min(prefix, embedded)
        add[:, :k] = pos[:, :k]
        self.prefix, self.grid = prefix, tuple(grid)
        self.register_buffer("embedding", add)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1:] != self.embedding.shape[1:]:
            raise ValueError(f"position re-injection expects tokens of shape (B, {self.embedding.shape[1]}, "
                             f"{self.embedding.shape[2]}), got {tuple(x.shape)}")
        return x + self.embedding.to(x.dtype)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, prefix={self.prefix}, frozen destination embedding"
