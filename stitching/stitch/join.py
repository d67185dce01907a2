"""The two representations that meet at a join, on the same images, and how alike they are.

Owns, for a built stitched model (:func:`stitching.stitch.stitcher.build_model`):

- :func:`source_at_join`: the source's features at its cut, converted into the chain's working format,
  resized (bilinear, ``align_corners=False``, the grid tokens of a sequence with its prefix tokens left
  alone) to the destination cut's size where the sizes differ, and converted into the destination cut's
  format -- the format conventions of the adapter chain (:mod:`stitching.models.formats`), without adapters;
- :func:`destination_at_join`: the destination's own activation at the receiving point (its own network up to
  where the suffix starts, ``BuiltModel.target``);
- :func:`similarity_before`: linear CKA and the affine least-squares residual between the two
  (:mod:`stitching.similarity`) over a stream of images; positions / tokens of the destination's format are
  the least-squares samples, so the two sides always have the same number of them;
- :func:`similarity_after`: linear CKA and the mean squared error between the adapter chain's output (what the
  suffix receives, as trained) and the destination's own activation.
"""

from __future__ import annotations

from typing import Iterable

import torch

from stitching.models.formats import convert, is_token, prefix_tokens
from stitching.similarity import LeastSquares, MinibatchCKA, channels_last_samples
from stitching.stitch.adapters import Resize


@torch.no_grad()
def source_at_join(built, x: torch.Tensor) -> torch.Tensor:
    plan, model = built.plan, built.model
    src, dst = plan.source_cut, plan.destination_cut
    work = plan.working_format
    y = convert(model.prefix(x), src.format, work, (src.height, src.width))
    size_in, size_out = (src.height, src.width), (dst.height, dst.width)
    if size_in != size_out:
        y = Resize(size_in, size_out, prefix_tokens(work) if is_token(work) else None)(y)
    return convert(y, work, dst.format, size_out)


@torch.no_grad()
def destination_at_join(built, x: torch.Tensor) -> torch.Tensor:
    return built.target(x)


@torch.no_grad()
def similarity_before(built, images: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> dict:
    """``{cka, ls_residual, n}`` between :func:`source_at_join` and :func:`destination_at_join` over the
    batches of ``images`` (batches of fewer than 4 images count for least squares only: the unbiased HSIC
    estimator needs 4)."""
    if built.plan is None or built.target is None:
        raise ValueError("similarity at the join needs a stitched model with adapters")
    built.model.eval()
    built.target.eval()
    fmt = built.plan.destination_cut.format
    cka, ls, n = MinibatchCKA(), LeastSquares(), 0
    for x in images:
        x = x.to(device)
        a, b = source_at_join(built, x).float(), destination_at_join(built, x).float()
        if x.shape[0] >= 4:
            cka.update(a, b)
        ls.update(channels_last_samples(a, fmt), channels_last_samples(b, fmt))
        n += x.shape[0]
    return {"cka": cka.value() if cka.n else float("nan"), "ls_residual": ls.value(), "n": n}


@torch.no_grad()
def adapted_at_join(built, x: torch.Tensor) -> torch.Tensor:
    """The adapter chain's output on ``x``: what the suffix receives."""
    return built.model.adapters(built.model.prefix(x))


def on_destination_grid(adapted: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The adapter chain's output on the grid of the destination's own activation ``own``: itself where the
    shapes agree; a feature map that kept the source's size (``model.resize: none``, the larger map flowing on
    into the destination) resized bilinearly (``align_corners=False``, as the adapters resize) to the
    destination's own size. What the similarity after training and ``train.objective: match`` compare."""
    if adapted.shape == own.shape:
        return adapted
    if adapted.dim() == own.dim() == 4 and adapted.shape[:2] == own.shape[:2]:
        return Resize(tuple(adapted.shape[-2:]), tuple(own.shape[-2:]))(adapted)
    raise ValueError(f"the adapters' output {tuple(adapted.shape)} cannot be compared with the destination's own "
                     f"activation {tuple(own.shape)}")


@torch.no_grad()
def similarity_after(built, images: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> dict:
    """``{cka, mse, n}`` between :func:`adapted_at_join` (on the destination's grid: :func:`on_destination_grid`)
    and :func:`destination_at_join` over the batches of ``images`` (the mean squared error over every element,
    as ``train.objective: match`` trains it)."""
    if built.plan is None or built.target is None:
        raise ValueError("similarity at the join needs a stitched model with adapters")
    built.model.eval()
    built.target.eval()
    cka, sq, count, n = MinibatchCKA(), 0.0, 0, 0
    for x in images:
        x = x.to(device)
        b = destination_at_join(built, x).float()
        a = on_destination_grid(adapted_at_join(built, x).float(), b)
        if x.shape[0] >= 4:
            cka.update(a, b)
        sq += float(((a.double() - b.double()) ** 2).sum())
        count += a.numel()
        n += x.shape[0]
    return {"cka": cka.value() if cka.n else float("nan"), "mse": sq / count if count else float("nan"), "n": n}
