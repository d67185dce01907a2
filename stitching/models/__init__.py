"""Models: architectures cut into stem, four stages and head (:mod:`.spec`, hand entries in :mod:`.zoo`, any
other timm / torchvision classifier derived by :mod:`.derive`, looked up by :mod:`.registry`), built with their
weights (:mod:`.weights`), their cuts traced (:mod:`.trace`), and tensor formats (:mod:`.formats`)."""

from stitching.models.registry import available, get_spec
from stitching.models.spec import Cut, ModelSpec, Parts
from stitching.models.trace import split_model
from stitching.models.weights import load_model

__all__ = ["Cut", "ModelSpec", "Parts", "available", "get_spec", "load_model", "split_model"]
