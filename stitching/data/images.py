"""Image files -> 8-bit RGB pixels: the one module that opens image files and converts their modes.

Owns:

* :class:`BadImageError` -- a file that cannot be read, decoded or converted to 8-bit RGB; its
  :attr:`~BadImageError.message` is one line naming the file (``data.bad_images: error`` stops the run with it,
  ``skip`` leaves the file out and counts it: :mod:`stitching.data.bad_images`).
* :func:`to_rgb` -- any Pillow image -> an 8-bit RGB image by the value range of its mode, never by clipping
  (Pillow's own ``convert("RGB")`` saturates 16-bit and 32-bit modes: a 16-bit PNG becomes nearly white).
  Both input pipelines call it on every file they decode (``data.pipeline: fast`` through
  :mod:`stitching.data.pipeline`, ``torchvision`` through :func:`load_image`), so training, evaluation, the
  least-squares initialisation and the similarity at the join all see the same pixels.
* :func:`open_image` (lazily, for the fast pipeline's reduced-size decoding) and :func:`load_image` (decoded
  and converted, for torchvision's).

The conversion, mode by mode (Pillow's names):

==========================  ==================================================================================
``RGB``                     as it is
``1``, ``L``                1-bit: 0 / 255; grey copied to the three channels
``P``, ``PA``               the palette's colours (through ``RGBA``, so a palette with transparency converts
                            without Pillow's warning); the transparency is dropped
``LA``, ``RGBA``            the colour channels as stored, alpha dropped (what torchvision's ImageFolder
                            loader gives, so pretrained models see the pixels they were evaluated on)
``La``, ``RGBa``            premultiplied alpha: un-premultiplied (as ``LA`` / ``RGBA``), then alpha dropped
``CMYK``, ``YCbCr``,        Pillow's conversions of these 8-bit modes (CMYK: ``R = (255 - C)(255 - K) / 255``)
``LAB``, ``HSV``, ``RGBX``
``I;16``, ``I;16L``,        16-bit: ``round(v / 257)``, so 0 -> 0 and 65535 -> 255 (a 16-bit greyscale PNG or
``I;16B``, ``I;16N``        TIFF; 16-bit *colour* PNGs Pillow itself opens as ``RGB``, keeping the high byte)
``I``                       32-bit integer pixels, which Pillow's decoders fill with 16-bit data (16-bit PGM,
                            some TIFFs): the range is 0..65535, divided by 257 like ``I;16``; a value outside it
                            (negative, or above 65535) has no range the file states: a :class:`BadImageError`
``F``                       32-bit float pixels: the range is 0..1 (float TIFF / PFM), ``round(v * 255)``; a
                            value outside it, or NaN, is a :class:`BadImageError` naming the range found
==========================  ==================================================================================

Any other mode goes through Pillow's ``convert("RGB")``; a mode Pillow cannot convert is a
:class:`BadImageError`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["BadImageError", "to_rgb", "open_image", "load_image", "SIXTEEN_BIT_MODES"]

#: Pillow's 16-bit greyscale modes (unsigned, any byte order)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}       # premultiplied alpha -> Pillow un-premultiplies into these
_I_RANGE = 65535                                    # mode I: Pillow's decoders fill it with 16-bit data


class BadImageError(ValueError):
    """An image file that cannot be read, decoded or converted to 8-bit RGB; :attr:`message` is one line naming
    the file.

    Raised in a DataLoader worker, it reaches the main process re-created by PyTorch from a text holding the
    worker's whole traceback; the constructor recovers the original one-line message from that text.
    """

    _PREFIX = "unreadable image file "

    def __init__(self, message: str):
        super().__init__(message)
        lines = [line for line in str(message).splitlines() if self._PREFIX in line]
        line = lines[-1] if lines else (str(message).strip().splitlines() or [""])[-1]
        line = line.split("BadImageError: ", 1)[-1]  # the worker traceback's last line names the class
        self.message = line[line.find(self._PREFIX):] if self._PREFIX in line else line

    @classmethod
    def for_file(cls, path: str, err: BaseException) -> "BadImageError":
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return cls(f"{cls._PREFIX}{path} ({type(err).__name__}: {reason})")


def _grey(values: np.ndarray) -> Image.Image:
    """An ``(H, W)`` uint8 array as an RGB image (grey in all three channels)."""
    return Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8)).convert("RGB")


def _scaled(values: np.ndarray, top: float, mode: str) -> Image.Image:
    """Pixels ``values`` of a mode whose range is ``0..top`` as 8-bit grey RGB (``round(v * 255 / top)``);
    ValueError naming the range found when a value lies outside (or is NaN)."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (0 <= lo and hi <= top):           # (NaN fails both comparisons)
        raise ValueError(f"mode {mode} pixel values span [{lo:g}, {hi:g}], outside its range 0..{top:g}: cannot "
                         "be scaled to 8 bits (convert the file to 8-bit or 16-bit first)")
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        v = values.astype(np.uint32)
        return _grey((v + 128) // 257)        # round(v / 257), in integers
    return _grey(np.rint(values.astype(np.float64) * (255.0 / top)))


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (decoded now if it was opened lazily) as an 8-bit RGB image, each mode scaled by its range (the
    table in the module docstring); ``img`` itself when it is RGB already. ValueError (or Pillow's error) when it
    cannot be converted; the callers name the file (:class:`BadImageError`)."""
    mode = img.mode
    if mode == "RGB":
        img.load()
        return img
    if mode in SIXTEEN_BIT_MODES:
        return _scaled(np.asarray(img), 65535, mode)
    if mode == "I":
        return _scaled(np.asarray(img), _I_RANGE, mode)
    if mode == "F":
        return _scaled(np.asarray(img), 1.0, mode)
    if mode in ("P", "PA"):
        return img.convert("RGBA").convert("RGB")
    if mode in _PREMULTIPLIED:
        return img.convert(_PREMULTIPLIED[mode]).convert("RGB")
    return img.convert("RGB")


def open_image(path: str) -> Image.Image:
    """``path`` opened lazily (header read, pixels not decoded) so the transform can decode it at a reduced
    size (and then convert it with :func:`to_rgb`); :class:`BadImageError` naming the file when it is no image."""
    try:
        return Image.open(path)
    except Exception as err:  # noqa: BLE001 - whatever PIL raises for a bad file
        raise BadImageError.for_file(path, err) from None


def load_image(path: str) -> Image.Image:
    """``path`` decoded whole and converted to 8-bit RGB (:func:`to_rgb`); :class:`BadImageError` naming the file
    when it cannot be read, decoded (a truncated file fails here, not later) or converted."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except Exception as err:  # noqa: BLE001 - whatever PIL raises for a bad file (OSError, SyntaxError, ...)
        raise BadImageError.for_file(path, err) from None
