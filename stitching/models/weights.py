"""A model built with its weights: pretrained from its library, from a local weights file, or random init;
and weights files checked against the model they are meant for without loading their tensors.
"""

from __future__ import annotations

import itertools
import os
import zipfile

import torch
from torch import nn

from stitching.models.registry import get_spec

class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; one line naming the file, the model and
    the first mismatch. ``key`` (the config key that named the file, set by the caller) drops the file from
    the message, since an error about a config key already shows the key's value."""

    def __init__(self, file: str, model: str, detail: str):
        super().__init__(file, model, detail)
        self.file, self.model, self.detail = file, model, detail
        self.key: str | None = None

    def __str__(self) -> str:
        fits = f"does not fit {self.model}: " if self.model else ""
        if self.key:
            return f"{fits}{self.detail}"
        return f"weights file {self.file} {fits}{self.detail}" if fits else f"weights file {self.file}: {self.detail}"


class PretrainedError(ValueError):
    """Pretrained weights the model's library cannot provide (an offline node with an empty cache, a hub that
    cannot be reached, a tag without weights): one line naming the model and what the library said, reported
    under :attr:`key` (the config key that asked for them)."""

    key = "model.pretrained"

    def __init__(self, name: str, err: BaseException):
        said = (str(err).strip().splitlines() or [""])[0][:200]
        super().__init__(f"cannot load the pretrained weights of {name} ({type(err).__name__}: {said}); "
                         "without network access, fill the timm / torchvision cache, name a local file in "
                         "model.source_weights / model.destination_weights, or set model.pretrained=false "
                         "(offline, HF_HUB_OFFLINE=1 makes timm's hub fail at once instead of retrying)")


def load_model(name: str, pretrained: bool = False, weights_file: str | None = None,
               num_classes: int = 1000, kwargs: dict | None = None) -> nn.Module:
    """Build model ``name``: pretrained from its library, from a local weights file, or random init.

    ``weights_file`` (safetensors or a torch state dict, possibly wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}``) takes precedence over ``pretrained`` and serves offline cluster nodes and models
    trained by this framework (their ``model.safetensors``). Loading is strict: a file that is not a state
    dict, or a key or shape that differs from the model's, is a :class:`WeightsError` naming the file and the
    first mismatch (e.g. ``fc.weight has shape (10, 512), the model expects (1000, 512)``). ``kwargs`` are
    constructor arguments (config ``model.source_kwargs`` / ``destination_kwargs``). Pretrained weights the
    library cannot fetch or find in its cache are a :class:`PretrainedError` (one line).
    """
    spec = get_spec(name, kwargs)
    if weights_file is not None:
        model = spec.build(False, num_classes)
        try:
            state = read_state_dict(weights_file)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever torch/safetensors say about a bad file
            raise WeightsError(weights_file, "", _unreadable(err)) from None
        check_fit(name, model, {k: tuple(v.shape) for k, v in state.items()}, weights_file, num_classes, kwargs)
        model.load_state_dict(state, strict=True)
        return model
    if not pretrained:
        return spec.build(False, num_classes)
    try:
        return spec.build(True, num_classes)
    except (OSError, RuntimeError, ValueError) as err:  # the download or the cache (urllib, huggingface_hub)
        raise PretrainedError(name, err) from None


def _unreadable(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"not a safetensors or torch state-dict file ({type(err).__name__}: {first[:200]})"


def weights_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of the tensors in a weights file, read without loading the tensors (the safetensors
    header; a torch file memory-mapped). None when the shapes cannot be had cheaply (old torch format).
    Raises ``FileNotFoundError`` or :class:`WeightsError` (not a weights file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                if f.read(2) == b"\x80\x02":  # torch's legacy (pre-1.6, pickle) format cannot be mapped
                    return None
            raise ValueError("neither a safetensors file (by its name) nor a torch zip archive")
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001
        raise WeightsError(path, "", _unreadable(err)) from None
    state = _unwrap(obj, path)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_fit(name: str, model: nn.Module, shapes: dict[str, tuple[int, ...]], file: str,
              num_classes: int | None = None, kwargs: dict | None = None) -> None:
    """:class:`WeightsError` naming the first key of ``shapes`` (a weights file's) that does not fit ``model``
    (an instance of registry entry ``name``, possibly on the meta device): a shape mismatch (with the class
    counts when it is the classifier head), a key the model lacks, or one the file lacks."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k in want if k in shapes and shapes[k] != want[k]]
    missing = [k for k in want if k not in shapes]
    extra = sorted((k for k in shapes if k not in want),  # a weight first: the clearest name to show
                   key=lambda k: 0 if k.endswith(".weight") else 2 if k.endswith("num_batches_tracked") else 1)
    more = lambda items, what: f" (and {len(items) - 1} more {what})" if len(items) > 1 else ""  # noqa: E731
    if wrong:
        k = wrong[0]
        detail = f"{k} has shape {_shape(shapes[k])}, the model expects {_shape(want[k])}"
        if k in _head_keys(name, model, kwargs) and shapes[k][:1] != want[k][:1] and num_classes:
            detail += (f": the file's classifier has {shapes[k][0]} classes, the config {num_classes} "
                       "(data.num_classes)")
        raise WeightsError(file, name, detail + more(wrong, "shape mismatches"))
    if missing and len(missing) == len(want):
        raise WeightsError(file, name, f"none of its {len(want)} keys are in the file (the model has e.g. "
                                       f"{missing[0]}, the file {extra[0] if extra else 'nothing'}): "
                                       "weights of another architecture?")
    if missing:
        raise WeightsError(file, name, f"{missing[0]} is missing from the file{more(missing, 'missing keys')}")
    if extra:
        raise WeightsError(file, name, f"{extra[0]} is in the file but not in the model{more(extra, 'extra keys')}")


def check_weights_file(name: str, file: str, num_classes: int = 1000, kwargs: dict | None = None) -> None:
    """Check, without loading its tensors, that ``file`` holds weights that fit model ``name`` (keys and shapes
    from the file's header, against the model built on the meta device): :class:`WeightsError` or
    ``FileNotFoundError`` otherwise. A file whose shapes cannot be read cheaply passes."""
    shapes = weights_shapes(file)
    if shapes is None:
        return
    spec = get_spec(name, kwargs)
    try:
        with torch.device("meta"):
            model = spec.build(False, num_classes)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on meta: build it for real
        model = spec.build(False, num_classes)
    check_fit(name, model, shapes, file, num_classes, kwargs)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _head_keys(name: str, model: nn.Module, kwargs: dict | None = None) -> set[str]:
    """State-dict keys of the classifier head (as the registry splits the model)."""
    try:
        head = {id(m) for m in get_spec(name, kwargs).split(model).head.modules()}
    except Exception:  # noqa: BLE001 - only used to word a message
        return set()
    keys = set()
    for mod_name, mod in model.named_modules():
        if id(mod) in head:
            keys.update(f"{mod_name}.{k}" if mod_name else k for k, _ in
                        itertools.chain(mod.named_parameters(recurse=False), mod.named_buffers(recurse=False)))
    return keys


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch checkpoint (``weights_only`` loading)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(path, "", "holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}
