"""The fast input pipeline: uint8 images from the loader, float conversion and normalisation on the device.

This module owns ``data.pipeline: fast`` (the default) and ``data.decode: cpu | gpu``:

* :class:`FastTrainTransform` -- the paper's training augmentation with torchvision's own distribution,
  computed cheaply: the RandomResizedCrop box is drawn first (``T.RandomResizedCrop.get_params``, the very
  function torchvision's transform calls), the JPEG is then decoded at a reduced size when the box allows it
  (libjpeg's DCT scaling through PIL's ``Image.draft``: the largest of 1/2, 1/4, 1/8 that still leaves the
  box at least the output resolution on both sides; a full-size decode goes through the optional
  ``simplejpeg`` where installed -- ``pip install 'stitching[fast-jpeg]'`` -- libjpeg-turbo straight into a
  numpy array, the same pixels as Pillow's for ~15% less CPU), only the box is resized (antialiased, uint8, torch's
  vectorised kernel called directly), then the flip and AutoAugment(IMAGENET) run on the uint8 image (torchvision's
  own ``AutoAugment`` on PIL). The random numbers are drawn in torchvision's order (crop box, flip, AutoAugment), so
  under the same seed the same box, flip and AutoAugment operations are chosen as by
  ``transforms.train_transform``; per-sample seeding (``loaders.build_loader``) and exact resume are
  unchanged. The result is an ``(H, W, 3)`` uint8 tensor.
* :class:`FastEvalTransform` -- the source model's evaluation preprocessing (timm's resize / centre crop,
  the very step objects timm builds) on a JPEG decoded at a reduced size where the resize allows it, ending
  in an ``(H, W, 3)`` uint8 tensor.
* :class:`DeviceNormalize` -- on the device: ``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 (channels-last
  memory), ``/255``, ``- mean``, ``/ std`` (the arithmetic of ``ToTensor`` + ``Normalize``).
* ``data.decode: gpu`` -- :class:`EncodedTrainTransform` / :class:`EncodedEvalTransform` draw every random
  number of a sample on the CPU (seeded per sample as above) and return an :class:`EncodedSample` (the
  JPEG's bytes and what to do to them); :func:`collate_encoded` batches them as a list; :class:`GpuDecode`
  decodes a batch with ``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on CUDA) and applies crop,
  resize, flip, AutoAugment and the normalisation there. :func:`resolve_decode` falls back to ``cpu`` with
  one line on the log where CUDA or nvJPEG is not available.
* :func:`batch_to_device` -- what the trainer applies to each batch after the loader: ``.to(device)``, then
  the transform's device stage (identity for ``data.pipeline: torchvision``, which already normalised).
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF   # v2: uint8 antialiased resize without a float copy

from stitching.data.images import BadImageError, to_rgb

try:     # optional (``pip install 'stitching[fast-jpeg]'``): libjpeg-turbo decoding into numpy, ~15% less CPU
    import simplejpeg
except ImportError:  # Pillow decodes instead (the same pixels)
    simplejpeg = None

__all__ = ["PIPELINES", "DECODERS", "FastTrainTransform", "FastEvalTransform", "DeviceNormalize", "EncodedSample",
           "EncodedTrainTransform", "EncodedEvalTransform", "GpuDecode", "collate_encoded", "batch_to_device",
           "resolve_decode", "draft_scale"]

#: ``data.pipeline``: ``fast`` (this module) | ``torchvision`` (``transforms.train_transform``: PIL, float on the CPU)
PIPELINES = ("fast", "torchvision")
#: ``data.decode``: where JPEGs are decoded with ``data.pipeline: fast``
DECODERS = ("cpu", "gpu")
log = logging.getLogger("stitching.train.data")
_DRAFT_SCALES = (8, 4, 2)          # what PIL's Image.draft asks libjpeg for (1/8, 1/4, 1/2)


# --------------------------------------------------------------------------------------- decoding
def draft_scale(crop_hw: Sequence[float], out_hw: Sequence[int]) -> int:
    """The largest DCT scale reduction (8, 4, 2 or 1) that leaves a ``crop_hw`` region at least ``out_hw``."""
    for s in _DRAFT_SCALES:
        if crop_hw[0] / s >= out_hw[0] and crop_hw[1] / s >= out_hw[1]:
            return s
    return 1


def _decode(img: Image.Image, want_wh: Optional[tuple[int, int]]) -> tuple[Image.Image, int]:
    """Decode a lazily opened image to 8-bit RGB (:func:`stitching.data.images.to_rgb`: every mode by its
    range), as a JPEG at a reduced size of at least ``want_wh`` (full size when None); ``(image, scale)`` where
    pixel ``k`` of the result covers original pixels ``[k*s, (k+1)*s)``."""
    scale = 1
    try:
        if want_wh is not None and getattr(img, "format", None) == "JPEG" and getattr(img, "tile", None):
            if img.draft("RGB", want_wh) is not None:
                scale = int(img.decoderconfig[0])
        rgb = to_rgb(img)       # 8-bit RGB by the range of its mode (PIL closes its own file once loaded)
    except Exception as err:  # noqa: BLE001 - a truncated / corrupt file fails here
        raise BadImageError.for_file(getattr(img, "filename", "") or "<image>", err) from None
    return rgb, scale


def _jpeg_bytes(img: Image.Image) -> Optional[bytes]:
    """The file bytes of a lazily opened, not yet decoded RGB or greyscale JPEG when ``simplejpeg`` is
    installed (the image is closed then), else None: such a file is decoded by :func:`_decode_pixels`."""
    if (simplejpeg is None or getattr(img, "format", None) != "JPEG" or img.mode not in ("RGB", "L")
            or not getattr(img, "tile", None) or getattr(img, "fp", None) is None):
        return None
    try:
        img.fp.seek(0)
        data = img.fp.read()
    except Exception:  # noqa: BLE001 - an unreadable stream: PIL's path below reports it
        return None
    img.close()
    return data


def _decode_pixels(img: Image.Image, scale: int) -> tuple["Image.Image | np.ndarray", int]:
    """Decode a lazily opened image to RGB pixels, a JPEG at ``1/scale`` of its size (``scale`` 1, 2, 4 or 8:
    libjpeg's DCT scaling through :func:`_decode`); ``(pixels, scale)``, the pixels an ``(H, W, 3)`` uint8
    array or a PIL RGB image (both read by :func:`_resized_box`).

    A full-size RGB or greyscale JPEG is decoded with the optional ``simplejpeg`` where installed
    (libjpeg-turbo straight into a numpy array: the same IDCT and upsampling as Pillow's libjpeg-turbo, so
    the same pixels, without Pillow's 4-byte-per-pixel buffer and its copies: 0.88 against 1.04 ms for a
    ~500x375 JPEG in ``benchmarks/data.py``). A reduced decode stays with Pillow: its box is fractional and
    PIL's resize, which takes one, would first need the array copied into a PIL image."""
    data = _jpeg_bytes(img) if scale == 1 else None
    if data is None:
        want = (img.size[0] // scale, img.size[1] // scale) if scale > 1 else None
        return _decode(img, want)
    try:
        arr = simplejpeg.decode_jpeg(data, "RGB")
    except Exception as err:  # noqa: BLE001 - a truncated / corrupt file fails here
        raise BadImageError.for_file(getattr(img, "filename", "") or "<image>", err) from None
    if arr.shape[:2] != (img.size[1], img.size[0]):
        raise BadImageError.for_file(getattr(img, "filename", "") or "<image>",
                                     ValueError(f"decoded {arr.shape[:2]} from a {img.size[1]}x{img.size[0]} JPEG"))
    return arr, 1


def _hwc(img: Image.Image) -> torch.Tensor:
    """A PIL RGB image as an ``(H, W, 3)`` uint8 tensor (its own copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


_TORCH_MODES = {InterpolationMode.NEAREST: InterpolationMode.NEAREST_EXACT}  # PIL's nearest = torch's exact
_PIL_MODES = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
              InterpolationMode.BICUBIC: Image.BICUBIC}


def _resized_box(img: "Image.Image | np.ndarray", box: tuple[float, float, float, float], size: tuple[int, int],
                 mode: InterpolationMode) -> torch.Tensor:
    """The region ``box = (top, left, height, width)`` of ``img`` (a PIL RGB image or an ``(H, W, 3)`` uint8
    array) resized to ``size = (h, w)``, antialiased, as an ``(H, W, 3)`` uint8 tensor. Integer boxes go
    through torch's uint8 channels-last kernel; fractional ones (a box mapped onto a reduced decode) through
    PIL's resize, which takes a fractional box."""
    top, left, height, width = box
    if all(float(v).is_integer() for v in box):
        with warnings.catch_warnings():   # np.asarray(PIL image) is read-only; the view is only read here
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)   # (3, H, W) view, channels-last strides
        x = x[None, :, int(top):int(top + height), int(left):int(left + width)]
        # torch's own kernel, called directly (what torchvision's v2 resize calls for uint8 on the CPU, without
        # its per-call dispatch): antialiased bilinear / bicubic, or nearest-exact (PIL's nearest)
        if mode == InterpolationMode.NEAREST:
            out = torch.nn.functional.interpolate(x, size=list(size), mode="nearest-exact")
        else:
            out = torch.nn.functional.interpolate(x, size=list(size), mode=mode.value, antialias=True,
                                                  align_corners=False)
        return out[0].permute(1, 2, 0).contiguous()
    if not isinstance(img, Image.Image):   # (not reached from FastTrainTransform: reduced decodes are PIL's)
        img = Image.fromarray(img)
    out = img.resize((size[1], size[0]), _PIL_MODES[mode], box=(left, top, left + width, top + height))
    return _hwc(out)


class _AutoAugment(T.AutoAugment):
    """torchvision's AutoAugment whose table of operation magnitudes (a pure function of the image size) is
    built once per size instead of on every call; the random draws and the operations are torchvision's."""

    @functools.lru_cache(maxsize=16)
    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]):
        return super()._augmentation_space(num_bins, image_size)


# --------------------------------------------------------------------------------------- on the device
class DeviceNormalize:
    """``(B, H, W, 3)`` uint8 (on any device) -> ``(B, 3, H, W)`` float32, channels-last memory, normalised
    as ``ToTensor`` + ``Normalize(mean, std)`` do: ``(x / 255 - mean) / std``. A float batch passes through
    unchanged (``data.pipeline: torchvision`` normalised it on the CPU)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._consts: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 batch, got {tuple(x.shape)}")
        key = x.device
        if key not in self._consts:
            self._consts[key] = tuple(torch.tensor(v, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
                                      for v in (self.mean, self.std))
        mean, std = self._consts[key]
        x = x.permute(0, 3, 1, 2).float()        # channels-last memory, no copy of the layout
        return x.div_(255.0).sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std})"


# --------------------------------------------------------------------------------------- CPU transforms
class FastTrainTransform:
    """RandomResizedCrop(size, scale, ratio, interpolation) -> RandomHorizontalFlip(hflip) -> AutoAugment(IMAGENET,
    auto_augment_interpolation), with torchvision's distribution and draw order, on a lazily opened image
    (decoded at a reduced size where the crop box allows) or a decoded PIL image; returns ``(H, W, 3)`` uint8
    (``cpu_float``: the normalised ``(3, H, W)`` float tensor, for callers without a device stage).
    :attr:`normalize` is the device stage (:class:`DeviceNormalize`)."""

    decodes = True      # decodes the lazily opened file itself (loaders.build_datasets opens it lazily)

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), interpolation: InterpolationMode = InterpolationMode.BILINEAR,
                 auto_augment: bool = True, auto_augment_interpolation: Optional[InterpolationMode] = None,
                 draft: bool = True, cpu_float: bool = False, hflip: float = 0.5) -> None:
        self.size = (int(size), int(size))
        self.hflip = float(hflip)
        self.cpu_float = cpu_float
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = interpolation
        self.draft = draft
        self.auto_augment = _AutoAugment(T.AutoAugmentPolicy.IMAGENET,
                                         interpolation=auto_augment_interpolation or interpolation) \
            if auto_augment else None
        self.normalize = DeviceNormalize(mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = self.uint8(img)
        return self.normalize(x[None])[0].contiguous() if self.cpu_float else x

    def uint8(self, img: Image.Image) -> torch.Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        s = draft_scale((height, width), self.size) if self.draft else 1
        pixels, s = _decode_pixels(img, s)
        x = _resized_box(pixels, (top / s, left / s, height / s, width / s), self.size, self.interpolation)
        flip = bool(torch.rand(1) < self.hflip)                # RandomHorizontalFlip(hflip)'s draw
        if self.auto_augment is None:
            return x.flip(1).contiguous() if flip else x
        pil = Image.fromarray(x.numpy())
        if flip:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        return _hwc(self.auto_augment(pil))

    def __repr__(self) -> str:
        return (f"FastTrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.value}, hflip={self.hflip}, "
                f"auto_augment={self.auto_augment is not None}, "
                f"{self.normalize})")


def _eval_steps(eval_tf: T.Compose) -> list:
    """The geometric steps of a timm evaluation transform (resize, crop), without ToTensor / Normalize."""
    return [t for t in eval_tf.transforms if not isinstance(t, (T.ToTensor, T.Normalize, T.PILToTensor))
            and type(t).__name__ not in ("MaybeToTensor", "ToNumpy", "MaybePILToTensor")]


def _resize_target(steps: list) -> Optional[tuple[int, int]]:
    """The smallest image ``(w, h)`` the first Resize step needs (for a reduced decode), or None."""
    first = steps[0] if steps else None
    if not isinstance(first, T.Resize):
        return None
    size = first.size if isinstance(first.size, (list, tuple)) else [first.size]
    if len(size) == 2:
        return int(size[1]), int(size[0])
    if first.max_size is not None:
        return None
    return int(size[0]), int(size[0])   # the shorter side -> size: both sides of the reduced image >= size


class FastEvalTransform:
    """A model's evaluation preprocessing (the resize / crop steps of ``eval_tf``, timm's) on an image decoded
    at a reduced size where the resize allows (its shorter side still at least the resize target); returns
    ``(H, W, 3)`` uint8; :attr:`normalize` is the device stage."""

    decodes = True      # decodes the lazily opened file itself (loaders.build_datasets opens it lazily)

    def __init__(self, eval_tf: T.Compose, mean: Sequence[float], std: Sequence[float], draft: bool = True,
                 cpu_float: bool = False) -> None:
        self.steps = _eval_steps(eval_tf)
        self.draft = draft
        self.cpu_float = cpu_float
        self.normalize = DeviceNormalize(mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        want = _resize_target(self.steps) if self.draft else None
        img, _ = _decode(img, want)
        for step in self.steps:
            img = step(img)
        x = _hwc(img)
        return self.normalize(x[None])[0].contiguous() if self.cpu_float else x

    def __repr__(self) -> str:
        return f"FastEvalTransform({self.steps}, {self.normalize})"


# --------------------------------------------------------------------------------------- decode on the GPU
@dataclass
class EncodedSample:
    """One sample for :class:`GpuDecode`: the JPEG's bytes (``data``, uint8) or, for another format, the
    decoded ``(H, W, 3)`` uint8 pixels (``pixels``); the crop box ``(top, left, height, width)`` (train) and
    the flip and AutoAugment operations ``[(name, magnitude), ...]`` drawn for it on the CPU."""

    data: Optional[torch.Tensor] = None
    pixels: Optional[torch.Tensor] = None
    box: Optional[tuple[int, int, int, int]] = None
    flip: bool = False
    ops: list = field(default_factory=list)
    name: str = ""


def _encoded(img: Image.Image) -> EncodedSample:
    path = getattr(img, "filename", "")
    if getattr(img, "format", None) == "JPEG" and path and img.mode in ("RGB", "L"):
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        img.close()
        return EncodedSample(data=data, name=path)
    rgb, _ = _decode(img, None)
    return EncodedSample(pixels=_hwc(rgb), name=path)


class EncodedTrainTransform:
    """The CPU half of ``data.decode: gpu`` for training: draws the crop box, the flip and the AutoAugment
    operations exactly as :class:`FastTrainTransform` does (same order, same functions) and returns an
    :class:`EncodedSample` carrying them with the undecoded JPEG."""

    decodes = True      # decodes the lazily opened file itself (loaders.build_datasets opens it lazily)

    def __init__(self, fast: FastTrainTransform) -> None:
        self.fast = fast

    def __call__(self, img: Image.Image) -> EncodedSample:
        f = self.fast
        box = T.RandomResizedCrop.get_params(img, list(f.scale), list(f.ratio))
        flip = bool(torch.rand(1) < f.hflip)
        ops = []
        if f.auto_augment is not None:
            aa = f.auto_augment
            op_meta = aa._augmentation_space(10, f.size)
            policy, probs, signs = aa.get_params(len(aa.policies))
            for i, (op_name, p, magnitude_id) in enumerate(aa.policies[policy]):
                if probs[i] <= p:
                    magnitudes, signed = op_meta[op_name]
                    magnitude = float(magnitudes[magnitude_id].item()) if magnitude_id is not None else 0.0
                    if signed and signs[i] == 0:
                        magnitude *= -1.0
                    ops.append((op_name, magnitude))
        sample = _encoded(img)
        sample.box, sample.flip, sample.ops = tuple(int(v) for v in box), flip, ops
        return sample


class EncodedEvalTransform:
    """The CPU half of ``data.decode: gpu`` for evaluation: the undecoded JPEG (the resize and crop are
    deterministic and run on the device)."""

    decodes = True      # decodes the lazily opened file itself (loaders.build_datasets opens it lazily)

    def __init__(self, fast: FastEvalTransform) -> None:
        self.fast = fast

    def __call__(self, img: Image.Image) -> EncodedSample:
        return _encoded(img)


def collate_encoded(samples: list) -> list:
    """A batch of :class:`EncodedSample` stays a list (the JPEGs differ in length)."""
    return list(samples)


class GpuDecode:
    """The device half of ``data.decode: gpu``: a list of :class:`EncodedSample` -> a normalised
    ``(B, 3, H, W)`` float batch on ``device``. JPEGs are decoded in one batched
    ``torchvision.io.decode_jpeg(..., device=device)`` call (nvJPEG on CUDA); then per sample the crop box is
    resized (antialiased), flipped and put through its AutoAugment operations (torchvision's own
    ``_apply_op``), or, for evaluation, the evaluation steps run on the tensor; finally :class:`DeviceNormalize`."""

    def __init__(self, transform: Any, device: torch.device) -> None:
        self.train = isinstance(transform, EncodedTrainTransform)
        self.fast = transform.fast
        self.device = torch.device(device)
        self.normalize = self.fast.normalize

    def decode(self, samples: list) -> list:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [i for i, s in enumerate(samples) if s.data is not None]
        images: list = [None] * len(samples)
        if jpegs:
            try:
                decoded = decode_jpeg([samples[i].data for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:            # find the file that failed and name it (one by one: only on error)
                for i in jpegs:
                    try:
                        decode_jpeg(samples[i].data, mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError as err:
                        raise BadImageError.for_file(samples[i].name, err) from None
                raise
            for i, img in zip(jpegs, decoded):
                images[i] = img
        for i, s in enumerate(samples):
            if images[i] is None:
                images[i] = s.pixels.permute(2, 0, 1).to(self.device, non_blocking=True)
        return images

    def __call__(self, samples: list) -> torch.Tensor:
        from torchvision.transforms.autoaugment import _apply_op

        out = []
        for s, img in zip(samples, self.decode(samples)):
            if self.train:
                f = self.fast
                top, left, h, w = s.box
                img = TF.resize(img[:, top:top + h, left:left + w], list(f.size),
                                interpolation=_TORCH_MODES.get(f.interpolation, f.interpolation), antialias=True)
                if s.flip:
                    img = img.flip(-1)
                if f.auto_augment is not None:
                    for op_name, magnitude in s.ops:
                        img = _apply_op(img, op_name, magnitude, interpolation=f.auto_augment.interpolation,
                                        fill=None)
            else:
                for step in self.fast.steps:
                    img = step(img)
            out.append(img.permute(1, 2, 0))
        return self.normalize(torch.stack(out))


def resolve_decode(decode: str, device: torch.device) -> str:
    """``data.decode`` as it can run on ``device``: ``gpu`` needs CUDA and nvJPEG (a tiny JPEG is decoded on
    the device to find out); otherwise ``cpu``, said in one line on the log."""
    if decode != "gpu":
        return decode
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        log.warning("data.decode=gpu: the training device is %s, not CUDA; decoding JPEGs on the CPU "
                    "(data.decode=cpu)", torch.device(device).type)
        return "cpu"
    try:
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG")
        decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device=device)
    except Exception as err:  # noqa: BLE001 - torchvision built without nvJPEG, driver trouble, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("data.decode=gpu: nvJPEG decoding is not available on %s (%s); decoding JPEGs on the CPU "
                    "(data.decode=cpu)", device, reason)
        return "cpu"
    return "gpu"


# --------------------------------------------------------------------------------------- the trainer's side
def batch_to_device(transform: Any, device: torch.device) -> Callable:
    """``prepare(x, y) -> (x, y)`` on ``device`` for batches made with ``transform``: a float batch is moved;
    a uint8 batch is moved and normalised there (:class:`DeviceNormalize`); a list of
    :class:`EncodedSample` is decoded and augmented there (:class:`GpuDecode`)."""
    device = torch.device(device)
    if isinstance(transform, (EncodedTrainTransform, EncodedEvalTransform)):
        stage: Callable = GpuDecode(transform, device)
        return lambda x, y: (stage(x), y.to(device, non_blocking=True))
    normalize = getattr(transform, "normalize", None)
    if normalize is None:
        return lambda x, y: (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    return lambda x, y: (normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))


class CpuFloat(torch.utils.data.Dataset):
    """A dataset made with a fast or undecoded transform, seen as the plain pipeline's: items ``(x, y)`` with
    ``x`` the normalised ``(3, H, W)`` float tensor, finished on the CPU (for readers without a device stage,
    e.g. the similarity measured at the join). Unreadable files skipped by ``bad_images: skip`` stay None."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: Any) -> None:
        self.dataset = dataset
        if isinstance(transform, (EncodedTrainTransform, EncodedEvalTransform)):
            stage = GpuDecode(transform, torch.device("cpu"))
            self.finish = lambda x: stage([x])[0]
        else:
            normalize = getattr(transform, "normalize", None)
            self.finish = (lambda x: normalize(x[None])[0].contiguous()) if normalize else (lambda x: x)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (self.finish(item[0]), item[1])
