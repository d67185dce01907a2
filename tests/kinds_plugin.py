"""A new adapter kind declared in one place, outside the package: its record and its core (a 1x1 conv then GELU).

:mod:`tests.test_kinds` registers :data:`CONV1X1_GELU` (``stitching.kinds.register``) in its own process and in a
trainer it starts (``python -c`` running ``stitching.train``'s ``__main__`` after the registration, as a user's
launcher script would) and trains it; nothing else in the package is edited.
"""

from __future__ import annotations

from torch import nn

from stitching.kinds import AdapterKind

CONV1X1_GELU = AdapterKind("conv1x1_gelu", "Conv1x1 + GELU", "tab:olive", "tests.kinds_plugin:conv1x1_gelu_core",
                           feature_map=True, outer_norms=True)


def conv1x1_gelu_core(c_in: int, c_out: int, stride: int = 1, tokens: bool = False, pad: int = 0,
                      init: str = "default") -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=True), nn.GELU())
