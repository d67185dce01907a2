"""The paper's names for methods and architectures, their legend order and their line styles.

Owns: ``method`` labels ("Downsample, Bottleneck", "Fine-Tuning", ...), short architecture names
("ResNet-50", "Swin-T", ...), and the line style (resize mode) of each method (its colour: the adapter kind's
record), so a
method looks the same in every figure.
"""

from __future__ import annotations

import re

import pandas as pd

from stitching.kinds import ADAPTER_KINDS, FINETUNE, ORIGINAL, RUN_KINDS, STITCHED, adapter_kind

ARCH_NAMES = {
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "resnet152": "ResNet-152",
    "mobilenetv3_large_100": "MobileNetV3-L",
    "mobilenetv3_small_100": "MobileNetV3-S",
    "vit_tiny_patch16_224": "ViT-Ti",
    "vit_small_patch16_224": "ViT-S",
    "vit_base_patch16_224": "ViT-B",
    "vit_base_patch16_224": "ViT-B",
    "swin_t": "Swin-T",
    "swin_s": "Swin-S",
    "swin_b": "Swin-B",
    "swin_tiny_patch4_window7_224": "Swin-T",
}

RESIZE_LABELS = {"none": "No Downsample", "bilinear": "Downsample", "strided": "Integrated Downsample"}
FINETUNE_LABEL = "Fine-Tuning"
ORIGINAL_LABEL = "Original"

#: line style per resize mode (an adapter kind's label and colour are its record's: :mod:`stitching.kinds`)
RESIZE_STYLES = {"none": ":", "bilinear": "-", "strided": "--"}
RESIZE_MARKERS = {"none": "v", "bilinear": "o", "strided": "s"}
ORIGINAL_COLOR = "0.45"


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value)) and value is not pd.NA \
        and str(value).strip() != ""


def arch_name(name) -> str:
    """Short name of an architecture (``resnet50`` -> ``ResNet-50``); unknown names come back unchanged.

    A timm pretrained tag is ignored (``resnet50.a1_in1k`` -> ``ResNet-50``).
    """
    if not _present(name):
        return ""
    raw = str(name)
    base = raw.split(".", 1)[0]
    if base in ARCH_NAMES:
        return ARCH_NAMES[base]
    match = re.fullmatch(r"resnet(\d+)", base)
    if match:
        return f"ResNet-{match.group(1)}"
    return raw


def gap_label(source_name: str, s, destination_name: str, t) -> str:
    """``"ResNet-50 Stage 1 → 4"`` for a self-stitch, ``"ResNet-50 Stage 1 → Swin-T Stage 4"`` otherwise."""
    if source_name == destination_name:
        return f"{source_name} Stage {int(s)} → {int(t)}"
    return f"{source_name} Stage {int(s)} → {destination_name} Stage {int(t)}"


def method_label(kind, adapter=None, resize=None) -> str:
    """The paper's legend label: ``"Downsample, Bottleneck"``, ``"Fine-Tuning"``, ``"Original"``."""
    if kind == FINETUNE:
        return FINETUNE_LABEL
    if kind == ORIGINAL:
        return ORIGINAL_LABEL
    record = adapter_kind(str(adapter))
    adapter_label = (record.label if record else str(adapter)) if _present(adapter) else "?"
    if not _present(resize):
        return adapter_label
    return f"{RESIZE_LABELS.get(str(resize), str(resize))}, {adapter_label}"


def add_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of ``df`` with a ``method`` column (see :func:`method_label`).

    When the stitched rows use more than one adapter-shape ``schedule``, the schedule is appended
    (``"Downsample, Bottleneck (destination)"``) so different schedules are never averaged together.
    """
    out = df.copy()
    methods = [method_label(k, a, r) for k, a, r in zip(out["kind"], out["adapter"], out["resize"])]
    out["method"] = methods
    if "schedule" in out.columns:
        stitched = out["kind"] == STITCHED
        schedules = out.loc[stitched, "schedule"].dropna().astype(str).unique()
        if len(schedules) > 1:
            suffix = out["schedule"].where(out["schedule"].notna(), "?").astype(str)
            out.loc[stitched, "method"] = out.loc[stitched, "method"] + " (" + suffix[stitched] + ")"
    return out


def method_sort_key(kind, adapter, resize) -> tuple:
    """Legend order: stitched methods by resize mode then adapter, fine-tuning last."""
    resizes = list(RESIZE_LABELS)
    adapters = list(ADAPTER_KINDS)
    return (
        RUN_KINDS.index(kind) if kind in RUN_KINDS else len(RUN_KINDS),
        resizes.index(resize) if resize in resizes else len(resizes),
        adapters.index(adapter) if adapter in adapters else len(adapters),
        str(adapter),
    )


def method_style(kind, adapter, resize) -> dict:
    """Matplotlib ``color``/``linestyle``/``marker`` of a method (same in every figure)."""
    if kind == FINETUNE:
        return {"color": "black", "linestyle": "-", "marker": "D"}
    return {
        "color": getattr(adapter_kind(str(adapter)), "color", "tab:brown"),
        "linestyle": RESIZE_STYLES.get(str(resize), "-."),
        "marker": RESIZE_MARKERS.get(str(resize), "^"),
    }
