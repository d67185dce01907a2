"""Image transforms: the paper's training augmentation and each model's own evaluation preprocessing.

This module owns how a PIL image becomes a normalised tensor:

* :func:`train_transform` -- RandomResizedCrop, RandomHorizontalFlip(0.5), AutoAugment(IMAGENET),
  ToTensor, Normalize (the paper's training recipe: ``docs/method.md``, "Training recipe").
* :func:`eval_transform` -- the source model's pretrained preprocessing, built by timm itself from
  a timm data config (resize, crop_pct, crop_mode, interpolation, mean/std -- ViT augreg uses
  mean/std 0.5, not ImageNet's).
* :func:`data_config_for_size` -- the same data config at another input resolution.
* :func:`build_transforms` -- both (as :mod:`stitching.data.pipeline`'s fast transforms by default), from the source
  model's data config and a config's ``data`` section (which may override normalisation, interpolations and the
  evaluation crop: the code-faithful preset ``configs/paper/imagenet_code.yaml`` uses ImageNet mean/std, Resize 256
  / CenterCrop 224 bilinear and AutoAugment with nearest interpolation for every model, as the paper's code did).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import timm.data
from torchvision import transforms as T
from torchvision.transforms import AutoAugmentPolicy, InterpolationMode

from stitching.messages import short_repr

__all__ = ["train_transform", "eval_transform", "data_config_for_size", "build_transforms", "EVAL_CONFIG_KEYS",
           "INTERPOLATIONS", "NORMALIZATIONS"]

#: keys of a timm data config that :func:`eval_transform` passes on to ``timm.data.create_transform``
EVAL_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_INTERPOLATIONS = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
                   "bicubic": InterpolationMode.BICUBIC}
INTERPOLATIONS = tuple(_INTERPOLATIONS)
#: ``data.normalize``: the source model's own mean/std, or ImageNet's for every model (the paper's code)
NORMALIZATIONS = ("model", "imagenet")


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def train_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    auto_augment: bool = True,
    interpolation: str = "bilinear",
    min_crop_scale: float = 0.08,
    auto_augment_interpolation: str | None = None,
    hflip: float = 0.5,
) -> T.Compose:
    """The paper's training augmentation, ending in a normalised ``(3, img_size, img_size)`` tensor.

    RandomResizedCrop(img_size, scale=(min_crop_scale, 1)) -> RandomHorizontalFlip(hflip) -> AutoAugment(IMAGENET
    policy, if ``auto_augment``, with ``auto_augment_interpolation``, default ``interpolation``) -> ToTensor ->
    Normalize(mean, std). Randomness comes from torch's global RNG (seeded per sample by
    :func:`stitching.data.loaders.build_loader`).
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    auto_augment_interpolation = auto_augment_interpolation or interpolation
    for value in (interpolation, auto_augment_interpolation):
        if value not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {short_repr(value)}")
    mean, std = _check_mean_std(mean, std)
    mode = _INTERPOLATIONS[interpolation]
    if not 0 < min_crop_scale <= 1:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale!r}")
    steps: list[Any] = [T.RandomResizedCrop(img_size, scale=(min_crop_scale, 1.0), interpolation=mode),
                        T.RandomHorizontalFlip(hflip)]
    if auto_augment:
        steps.append(T.AutoAugment(AutoAugmentPolicy.IMAGENET,
                                   interpolation=_INTERPOLATIONS[auto_augment_interpolation]))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(data_config: Mapping[str, Any]) -> T.Compose:
    """A model's evaluation preprocessing from its timm data config, built by timm.

    ``data_config`` is what ``timm.data.resolve_model_data_config(model)`` returns (keys
    ``input_size`` (3, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``).
    The result resizes (to ``H / crop_pct``), centre-crops to ``H x W``, converts to a tensor and
    normalises with the config's own mean/std.
    """
    missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
    if missing:
        raise ValueError(f"data_config lacks {missing}; expected timm data config keys {EVAL_CONFIG_KEYS}")
    _check_mean_std(data_config["mean"], data_config["std"])
    kwargs = {k: data_config[k] for k in EVAL_CONFIG_KEYS if k in data_config}
    return timm.data.create_transform(**kwargs, is_training=False)


def data_config_for_size(data_config: Mapping[str, Any], img_size: int) -> dict:
    """A copy of ``data_config`` whose ``input_size`` is ``(C, img_size, img_size)`` (low-resolution runs)."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if "input_size" not in data_config:
        raise ValueError("data_config lacks 'input_size'")
    config = copy.deepcopy(dict(data_config))
    channels = tuple(config["input_size"])[0]
    config["input_size"] = (channels, img_size, img_size)
    return config


def build_transforms(model_data_config: Mapping[str, Any], data, device=None) -> tuple[Any, Any]:
    """(train, eval) transforms for a run: the source model's data config at ``data.img_size``, with the
    overrides of a config's ``data`` section (``normalize``, ``train_interpolation``,
    ``auto_augment_interpolation``, ``eval_crop_pct``, ``eval_interpolation``; null keeps the model's).

    ``data.pipeline`` picks how they are computed (the same augmentation distribution either way):
    ``torchvision`` -- :func:`train_transform` / :func:`eval_transform` (PIL, float work on the CPU);
    ``fast`` (default) -- :mod:`stitching.data.pipeline` (crop box first, reduced-size JPEG decoding, uint8
    augmentation). With ``device`` (the trainer's), the fast transforms return uint8 images and their
    ``normalize`` runs on the device (:func:`stitching.data.pipeline.batch_to_device`), and ``data.decode: gpu``
    leaves the decoding to the device (falling back to the CPU, in one line on the log, where CUDA or nvJPEG
    is missing). Without ``device`` every transform returns a normalised float tensor (other callers)."""
    from stitching.data import pipeline as P

    dcfg = data_config_for_size(model_data_config, data.img_size)
    if data.normalize == "imagenet":
        dcfg["mean"], dcfg["std"] = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    elif data.normalize != "model":
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {short_repr(data.normalize)}")
    interpolation = data.train_interpolation or dcfg.get("interpolation", "bilinear")
    train = train_transform(data.img_size, dcfg["mean"], dcfg["std"], auto_augment=data.auto_augment,
                            interpolation=interpolation, min_crop_scale=data.min_crop_scale,
                            auto_augment_interpolation=data.auto_augment_interpolation, hflip=data.hflip)
    if data.eval_crop_pct is not None:
        dcfg["crop_pct"], dcfg["crop_mode"] = data.eval_crop_pct, "center"
    if data.eval_interpolation is not None:
        dcfg["interpolation"] = data.eval_interpolation
    evaluation = eval_transform(dcfg)
    pipeline = getattr(data, "pipeline", "fast")
    if pipeline == "torchvision":
        return train, evaluation
    if pipeline != "fast":
        raise ValueError(f"pipeline must be one of {P.PIPELINES}, got {short_repr(pipeline)}")
    fast_train = P.FastTrainTransform(
        data.img_size, dcfg["mean"], dcfg["std"], scale=(data.min_crop_scale, 1.0),
        interpolation=_INTERPOLATIONS[interpolation], auto_augment=data.auto_augment,
        auto_augment_interpolation=_INTERPOLATIONS[data.auto_augment_interpolation or interpolation],
        hflip=data.hflip, cpu_float=device is None)
    fast_eval = P.FastEvalTransform(evaluation, dcfg["mean"], dcfg["std"], cpu_float=device is None)
    if device is not None and P.resolve_decode(getattr(data, "decode", "cpu"), device) == "gpu":
        return P.EncodedTrainTransform(fast_train), P.EncodedEvalTransform(fast_eval)
    return fast_train, fast_eval
