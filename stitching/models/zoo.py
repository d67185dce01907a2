"""The hand-registered architectures: one :func:`register` call per family member.

Any other timm or torchvision classifier is cut by :mod:`stitching.models.derive` from the model itself; these
entries are the paper's networks, and ``tests/test_derive.py`` checks that the derivation agrees with every
one of them (same cuts, same blocks, same stem and head), so they are a check on the derivation as much as
the mechanism for their names.

Families (timm unless noted), with the stitch point of stage s = its first, downsampling block:

- ResNet-18/34/50/101: stem = conv1..maxpool; stages = ``layer1..4`` (``layer{s}.0`` first).
- MobileNetV3-Large/Small: stem = conv_stem, bn1 and the blocks before stride 4; stage 3 and 4 each join
  two timm block groups (Large: ``blocks.3+4`` and ``blocks.5+6``), so their *end* is wider than their
  first block (80 vs 112 and 160 vs 960 channels on Large) -- the fine-tuning baseline cannot join there.
- ViT-Ti/S/B 16x16: 12 blocks cut into four stages of three (``blocks.0/.3/.6/.9`` first), no downsampling;
  tokens keep the class token (``tokens_cls``). The stem resamples the position embedding, so any input
  resolution works.
- Swin-T/S/B (torchvision): ``features.0`` (patch embedding) and the patch-merging layers
  ``features.2/.4/.6`` are the first blocks; tensors are channels-last (``bhwc``).

To add a family the derivation cannot handle: write its ``build``/``split``/``data_config`` (reuse the helpers
here) and call :func:`register` with the cut points you expect -- the registry test checks them against the
real model.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from stitching.models.spec import Cut, ModelSpec, Parts, register

# ----------------------------------------------------------------------------------------- timm helpers
def _timm_build(name: str, tag: str, pretrained: bool, num_classes: int, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(f"{name}.{tag}" if pretrained else name, pretrained=pretrained,
                             num_classes=num_classes, **kwargs)


def _timm_data_config(model: nn.Module) -> dict:
    import timm.data

    return dict(timm.data.resolve_model_data_config(model))


def _cuts(fmt: str, channels, strides) -> tuple[Cut, Cut, Cut, Cut]:
    return tuple(Cut(fmt, c, s) for c, s in zip(channels, strides))  # type: ignore[return-value]


STRIDES = (4, 8, 16, 32)


# ---------------------------------------------------------------------------------------------- ResNet
def _resnet_split(model: nn.Module) -> Parts:
    stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
    stages = [list(getattr(model, f"layer{s}")) for s in range(1, 5)]
    return Parts(stem, stages, nn.Sequential(model.global_pool, model.fc))


for _name, _widths, _tag in [
    ("resnet18", (64, 128, 256, 512), "a1_in1k"),
    ("resnet34", (64, 128, 256, 512), "a1_in1k"),
    ("resnet50", (256, 512, 1024, 2048), "a1_in1k"),
    ("resnet101", (256, 512, 1024, 2048), "a1_in1k"),
]:
    register(ModelSpec(
        name=_name, family="resnet", library="timm", weights=f"{_name}.{_tag}",
        first=_cuts("image", _widths, STRIDES), end=_cuts("image", _widths, STRIDES),
        build=partial(_timm_build, _name, _tag), split=_resnet_split, data_config=_timm_data_config,
    ))


# ----------------------------------------------------------------------------------------- MobileNetV3
def _mobilenet_split(groups: tuple[tuple[int, ...], ...], model: nn.Module) -> Parts:
    """``groups[0]`` are the timm block groups of the stem, ``groups[s]`` those of stage s."""
    stem = nn.Sequential(model.conv_stem, model.bn1, *[model.blocks[g] for g in groups[0]])
    stages = [[blk for g in grp for blk in model.blocks[g]] for grp in groups[1:]]
    head = nn.Sequential(model.global_pool, model.conv_head, model.norm_head, model.act2, model.flatten,
                         nn.Dropout(model.drop_rate) if model.drop_rate > 0 else nn.Identity(),
                         model.classifier)
    return Parts(stem, stages, head)


for _name, _tag, _groups, _first, _end in [
    ("mobilenetv3_large_100", "ra_in1k", ((0,), (1,), (2,), (3, 4), (5, 6)),
     (24, 40, 80, 160), (24, 40, 112, 960)),
    ("mobilenetv3_small_100", "lamb_in1k", ((), (0,), (1,), (2, 3), (4, 5)),
     (16, 24, 40, 96), (16, 24, 48, 576)),
]:
    register(ModelSpec(
        name=_name, family="mobilenetv3", library="timm", weights=f"{_name}.{_tag}",
        first=_cuts("image", _first, STRIDES), end=_cuts("image", _end, STRIDES),
        build=partial(_timm_build, _name, _tag), split=partial(_mobilenet_split, _groups),
        data_config=_timm_data_config,
    ))


# ------------------------------------------------------------------------------------------------- ViT
class ViTStem(nn.Module):
    """Patch embedding, class token and position embedding of a timm ViT (class token, no registers).

    The position embedding is resampled to the input's patch grid, so the stem accepts any resolution
    (what ``dynamic_img_size=True`` does inside timm's own forward).
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        if vit.cls_token is None or getattr(vit, "reg_token", None) is not None or vit.no_embed_class:
            raise ValueError("ViTStem supports class-token ViTs without register tokens")
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.pos_drop, self.patch_drop, self.norm_pre = vit.pos_drop, vit.patch_drop, vit.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed

        x = self.patch_embed(x)  # (B, H, W, C): built with dynamic_img_size
        b, h, w, c = x.shape
        pos = self.pos_embed
        if (h, w) != tuple(self.patch_embed.grid_size):
            pos = resample_abs_pos_embed(pos, new_size=(h, w), old_size=self.patch_embed.grid_size,
                                         num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1) + pos
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class ViTHead(nn.Module):
    """Final norm, class-token pooling and classifier of a timm ViT (``global_pool='token'``)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        if vit.global_pool != "token":
            raise ValueError(f"ViTHead supports global_pool='token', not {vit.global_pool!r}")
        self.norm, self.fc_norm, self.head_drop, self.head = vit.norm, vit.fc_norm, vit.head_drop, vit.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.fc_norm(self.norm(x)[:, 0])))


def _vit_split(model: nn.Module) -> Parts:
    blocks = list(model.blocks)
    return Parts(ViTStem(model), [blocks[i:i + 3] for i in range(0, 12, 3)], ViTHead(model))


for _name, _tag, _dim in [
    ("vit_tiny_patch16_224", "augreg_in21k_ft_in1k", 192),
    ("vit_small_patch16_224", "augreg_in1k", 384),
    ("vit_base_patch16_224", "augreg_in1k", 768),
]:
    register(ModelSpec(
        name=_name, family="vit", library="timm", weights=f"{_name}.{_tag}",
        first=_cuts("tokens_cls", (_dim,) * 4, (16,) * 4), end=_cuts("tokens_cls", (_dim,) * 4, (16,) * 4),
        build=partial(_timm_build, _name, _tag, dynamic_img_size=True), split=_vit_split,
        data_config=_timm_data_config,
    ))


# ---------------------------------------------------------------------------------- Swin (torchvision)
def _swin_build(name: str, pretrained: bool, num_classes: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights="IMAGENET1K_V1" if pretrained else None)
    if num_classes != model.head.out_features:
        model.head = nn.Linear(model.head.in_features, num_classes)
    return model


def _swin_split(model: nn.Module) -> Parts:
    f = model.features
    stages = [[f[2 * s], *f[2 * s + 1]] for s in range(4)]
    head = nn.Sequential(model.norm, model.permute, model.avgpool, model.flatten, model.head)
    return Parts(nn.Identity(), stages, head)


def _swin_data_config(name: str, model: nn.Module) -> dict:
    """The preprocessing of torchvision's ``IMAGENET1K_V1`` weights, as a timm data config."""
    import torchvision

    tf = torchvision.models.get_model_weights(name).IMAGENET1K_V1.transforms()
    crop, resize = tf.crop_size[0], tf.resize_size[0]
    return {"input_size": (3, crop, crop), "interpolation": tf.interpolation.value, "mean": tuple(tf.mean),
            "std": tuple(tf.std), "crop_pct": crop / resize, "crop_mode": "center"}


for _name, _c in [("swin_t", 96), ("swin_s", 96), ("swin_b", 128)]:
    _w = (_c, 2 * _c, 4 * _c, 8 * _c)
    register(ModelSpec(
        name=_name, family="swin", library="torchvision", weights=f"{_name}.IMAGENET1K_V1",
        first=_cuts("bhwc", _w, STRIDES), end=_cuts("bhwc", _w, STRIDES),
        build=partial(_swin_build, _name), split=_swin_split, data_config=partial(_swin_data_config, _name),
    ))
