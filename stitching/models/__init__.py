"""Models: the registry of architectures cut into stem, four stages and head, and tensor formats."""

from stitching.models.registry import Cut, ModelSpec, Parts, available, get_spec, load_model, split_model

__all__ = ["Cut", "ModelSpec", "Parts", "available", "get_spec", "load_model", "split_model"]
