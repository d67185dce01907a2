"""The model registry: a spec for any name (:func:`get_spec`): its hand entry (:mod:`stitching.models.zoo`),
else one derived from the timm or torchvision model itself (:mod:`stitching.models.derive`).

What a spec is: :mod:`stitching.models.spec`; building a model with its weights: :mod:`stitching.models.weights`;
tracing its cuts and blocks: :mod:`stitching.models.trace`.
"""

from __future__ import annotations

import stitching.models.zoo  # noqa: F401  (its import registers the hand entries)
from stitching.models.derive import derive_spec
from stitching.models.spec import HAND, ModelSpec

_DERIVED: dict[tuple[str, str], ModelSpec] = {}


def available() -> list[str]:
    """The hand-registered names (any timm or torchvision classifier name works too: :func:`get_spec`)."""
    return sorted(HAND)


def get_spec(name: str, kwargs: dict | None = None) -> ModelSpec:
    """The spec of ``name``: its hand entry (without constructor ``kwargs``), else one derived from the model
    (:mod:`stitching.models.derive`, cached). ``KeyError`` for a name no library knows,
    :class:`~stitching.models.derive.SplitError` (one line) for a model that cannot be cut into four stages."""
    if name in HAND and not kwargs:
        return HAND[name]
    key = (name, repr(sorted((kwargs or {}).items())))
    if key not in _DERIVED:
        hand = HAND.get(name)      # a hand entry with constructor arguments: its family and weights
        _DERIVED[key] = derive_spec(name, kwargs, hand and hand.family, hand and hand.weights.partition(".")[2])
    return _DERIVED[key]
