"""Specs derived from the model itself: any timm or torchvision classifier cut into stem, four stages and head.

:func:`derive_spec` builds the named network once (random init, CPU), reads how it is put together and
returns a :class:`~stitching.models.spec.ModelSpec` whose ``split`` re-applies the same layout (module
paths) to any instance, pretrained or not. Two layouts:

- **trunk** (hierarchical networks: ResNet, ConvNeXt, EfficientNet, RegNet, DenseNet, Swin, MaxViT, ...):
  the forward is the chain of the model's top-level children, with the container that holds the stages
  (``stages``, ``blocks``, ``layers``, ``features``, ...) expanded into its children. Where each stage ends
  comes from timm's ``feature_info`` (the last module at each of the four deepest reductions); for
  torchvision, which has no ``feature_info``, from the traced reduction after each trunk module (4, 8,
  16, 32). Stage 1 starts after the module of the level below (parameter-free pooling joins the stem);
  with no such level, stage 1 is the one module that ends it. Each trunk module of a stage is cut into
  blocks where that reproduces it exactly (checked numerically): a ``downsample`` + ``blocks`` stage, or a
  sequence of composite blocks (single layers such as a conv and its norm stay together). The first block
  of a stage is its first (downsampling) block. Everything after stage 4 is the head (a flatten is inserted
  before a final linear layer where torchvision's forward flattens).
- **column** (ViT-like timm models: ``patch_embed``, ``_pos_embed``, ``blocks`` all at one reduction,
  e.g. ViT, DeiT, ViT with registers, EVA): the blocks, of any depth divisible by four, split into four
  equal stages. The stem is the model's own patch embedding and ``_pos_embed`` (class, distillation and
  register tokens, position embedding), the head its final norm and ``forward_head``; the cut format
  carries the prefix-token count (:func:`~stitching.models.formats.token_format`).

Cut formats and shapes are traced (``image`` or ``bhwc`` from where the channels sit; token sequences);
the chained parts must reproduce the model's forward exactly (else :class:`SplitError`). A network that
cannot be cut into four stages raises :class:`SplitError`, one line saying why; such a family gets a hand
entry in :mod:`stitching.models.zoo`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from stitching.messages import short_repr
from stitching.models.formats import token_format
from stitching.models.spec import Cut, ModelSpec, Parts

FLATTEN = "<flatten>"   # a head entry: torch.flatten(x, 1), where torchvision's forward flattens
TORCHVISION = "torchvision:"   # name prefix selecting torchvision (e.g. torchvision:resnet18)
LEVELS = (4, 8, 16, 32)


class SplitError(ValueError):
    """A model that the derivation cannot cut into stem, four stages and head (one line: the model and why)."""


class ArgumentsError(SplitError):
    """The model's constructor refuses the given constructor arguments (config ``model.*_kwargs``)."""


@dataclass(frozen=True)
class PartPaths:
    """Module paths of each part. ``column``: stem and head are the model's own embedding / head code."""

    form: str                                   # trunk | column
    stem: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]


# --------------------------------------------------------------------------------------- column parts
class _Owned(nn.Module):
    """Runs code of the model it was cut from; registers only the modules/parameters that code uses, and keeps
    the model itself unregistered (so its blocks are not also parameters of the stem or head)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        object.__setattr__(self, "owner", model)
        for n in names:
            value = getattr(model, n)
            if isinstance(value, nn.Parameter):
                self.register_parameter(n, value)
            elif isinstance(value, nn.Module):
                self.add_module(n, value)


class ColumnStem(_Owned):
    """Patch embedding, prefix tokens (class / distillation / registers) and position embedding of a timm
    ViT-like model: its own ``patch_embed`` -> ``_pos_embed`` -> ``patch_drop`` -> ``norm_pre``."""

    def __init__(self, model: nn.Module):
        names = [n for n, _ in model.named_parameters(recurse=False)]
        names += [n for n, _ in model.named_children() if n in
                  ("patch_embed", "pos_drop", "patch_drop", "norm_pre", "rope", "pos_embed")]
        super().__init__(model, names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.owner
        x = m._pos_embed(m.patch_embed(x))
        if isinstance(x, tuple):                 # EVA: (tokens, rotary embedding); the blocks recompute the latter
            x = x[0]
        if getattr(m, "patch_drop", None) is not None:
            x = m.patch_drop(x)
        return m.norm_pre(x)


class ColumnHead(_Owned):
    """Final norm and the model's own ``forward_head`` (pooling of its kind, e.g. class token, average, the
    mean of DeiT's class and distillation heads)."""

    def __init__(self, model: nn.Module):
        children = [n for n, _ in model.named_children()]
        super().__init__(model, children[children.index("blocks") + 1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.forward_head(self.owner.norm(x))


class RopeBlock(nn.Module):
    """A block of a model with rotary position embedding (EVA): the embedding for the sequence's grid is
    computed as the model's ``_pos_embed`` does and passed to the block."""

    def __init__(self, model: nn.Module, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "owner", model)
        self.block, self.rope = block, model.rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.owner
        if m.dynamic_img_size:
            side = int(round((x.shape[1] - m.num_prefix_tokens) ** 0.5))
            rope = self.rope.get_embed(shape=(side, side))
        elif hasattr(self.rope, "feat_shape"):
            rope = self.rope.get_embed()
        else:
            rope = self.rope.get_embed(shape=m.patch_embed.grid_size)
        return self.block(x, rope=rope)


# ----------------------------------------------------------------------------------------- applying
def apply_layout(layout: PartPaths, model: nn.Module):
    """The :class:`~stitching.models.spec.Parts` of ``model`` (modules shared with it)."""
    get = model.get_submodule
    if layout.form == "column":
        rope = getattr(model, "rope", None) is not None
        wrap = (lambda b: RopeBlock(model, b)) if rope else (lambda b: b)
        return Parts(ColumnStem(model), [[wrap(get(p)) for p in st] for st in layout.stages], ColumnHead(model))
    head = [nn.Flatten(1) if p == FLATTEN else get(p) for p in layout.head]
    return Parts(nn.Sequential(*[get(p) for p in layout.stem]), [[get(p) for p in st] for st in layout.stages],
                 nn.Sequential(*head))


# --------------------------------------------------------------------------------------- derivation
def _params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def _split_module(path: str, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Block paths of trunk module ``m`` (input ``x``, output ``y``): its blocks where chaining them is exactly
    ``m``, else ``m`` itself."""
    candidates = []
    blocks = getattr(m, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        down = getattr(m, "downsample", None)
        pre = [] if down is None or isinstance(down, nn.Identity) else ["downsample"]
        candidates.append(pre + [f"blocks.{n}" for n, _ in blocks.named_children()])
    kids = list(m.named_children())
    if kids and all(_params(k) and not isinstance(k, _LAYERS) for _, k in kids):
        candidates.append([n for n, _ in kids])
    for names in candidates:
        try:
            z = x
            for n in names:
                z = m.get_submodule(n)(z)
        except Exception:  # noqa: BLE001 - not a chain of these children
            continue
        if isinstance(z, torch.Tensor) and z.shape == y.shape and torch.equal(z, y):
            return [f"{path}.{n}" for n in names]
    return [path]


def _trunk_paths(model: nn.Module, expand: set[str]) -> list[str]:
    out = []
    for name, child in model.named_children():
        if name in expand and isinstance(child, nn.Sequential):
            out += [f"{name}.{n}" for n, _ in child.named_children()]
        else:
            out.append(name)
    return out


def _run_trunk(model: nn.Module, paths: list[str], x: torch.Tensor):
    """Chain the trunk modules; (inputs, outputs) of each, with FLATTEN entries inserted before a final
    linear classifier that receives a (B, C, 1, 1) map."""
    ins, outs, used = [], [], []
    for p in paths:
        m = model.get_submodule(p)
        first = next((c for c in (m if isinstance(m, nn.Sequential) else [m]) if not isinstance(c, nn.Dropout)), m)
        if isinstance(first, nn.Linear) and x.ndim == 4 and x.shape[2:] == (1, 1):
            used.append(FLATTEN), ins.append(x)
            x = torch.flatten(x, 1)
            outs.append(x)
        ins.append(x)
        x = m(x)
        if not isinstance(x, torch.Tensor):
            raise SplitError(f"trunk module {p} returns {type(x).__name__}, not a tensor")
        outs.append(x)
        used.append(p)
    return used, ins, outs


def _cut(t: torch.Tensor, channels: int | None, img: int, prefix: int = 0):
    """(format, channels, stride) of a traced tensor; ``channels`` (if known) tells NCHW from NHWC, ``prefix``
    is the number of prefix tokens of a sequence."""
    if t.ndim == 3:
        n = t.shape[1] - prefix
        g = int(round(n ** 0.5)) if n > 0 else 0
        if g * g != n or g == 0:
            raise SplitError(f"a sequence of {t.shape[1]} tokens ({prefix} prefix) is not a square grid")
        return token_format(prefix), t.shape[2], img // g
    if t.ndim != 4:
        raise SplitError(f"a stage gives a {t.ndim}-d tensor")
    _, d1, d2, d3 = t.shape
    if channels:
        nhwc = d3 == channels and not (d1 == channels and d2 == d3)
    else:
        nhwc = d1 == d2 and d3 != d1
    return ("bhwc", d3, img // d1) if nhwc else ("image", d1, img // d2)


def _reduction(t: torch.Tensor, img: int) -> int | None:
    if t.ndim != 4:
        return None
    _, d1, d2, d3 = t.shape
    side = d2 if d2 == d3 else d1 if d1 == d2 else None
    return img // side if side else None


def _derive_trunk(name: str, model: nn.Module, img: int, feature_info: list[dict] | None) -> tuple[PartPaths, list]:
    x = torch.randn(1, 3, img, img, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    if feature_info is not None:
        expand = {f["module"].split(".")[0] for f in feature_info if "." in f["module"]}
    else:
        expand = {n for n, c in model.named_children() if isinstance(c, nn.Sequential) and len(c) > 2}
    paths = _trunk_paths(model, expand)
    with torch.no_grad():
        try:
            used, ins, outs = _run_trunk(model, paths, x)
        except SplitError as err:
            raise SplitError(f"{name}: its forward is not a chain of its modules ({err})") from None
        except Exception as err:  # noqa: BLE001
            raise SplitError(f"{name}: its forward is not a chain of its modules "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    if outs[-1].shape != want.shape or not torch.equal(outs[-1], want):
        raise SplitError(f"{name}: chaining its modules ({', '.join(paths[:3])}, ...) does not reproduce its "
                         "forward")

    def index_of(module_path: str) -> int:
        for i, p in enumerate(used):
            if module_path == p or module_path.startswith(p + "."):
                return i
        raise SplitError(f"{name}: feature module {module_path} is not on the chain of its modules")

    if feature_info is not None:
        last = {}
        for f in feature_info:
            last[f["reduction"]] = (index_of(f["module"]), f["num_chs"])
        levels = sorted(last)
    else:
        last = {}
        inside = [i for i, p in enumerate(used) if "." in p]     # the expanded container(s) hold the stages
        for i, t in enumerate(outs[: inside[-1] + 1 if inside else None]):
            r = _reduction(t, img)
            if r is not None and used[i] != FLATTEN:
                last[r] = (i, None)
        levels = sorted(r for r in last if r <= LEVELS[-1] and r >= 2)
    if len(levels) < 4:
        raise SplitError(f"{name}: {len(levels)} levels of reduction ({', '.join(map(str, levels))}), "
                         "cannot split into four stages")
    stage_levels, below = levels[-4:], levels[:-4]
    ends = [last[r][0] for r in stage_levels]
    if below:
        start = last[below[-1]][0] + 1
        while start < ends[0] and not _params(model.get_submodule(used[start])):
            start += 1                           # parameter-free pooling joins the stem
    else:
        start = ends[0]
        if feature_info is None:                 # torchvision: stage 1 starts at the first module at its level
            while start > 0 and _reduction(outs[start - 1], img) == stage_levels[0]:
                start -= 1
            while start < ends[0] and not _params(model.get_submodule(used[start])):
                start += 1
    if not start <= ends[0] < ends[1] < ends[2] < ends[3]:
        raise SplitError(f"{name}: stage ends {[used[e] for e in ends]} are not in order on its chain")
    bounds = [start] + [e + 1 for e in ends]
    stages = []
    for s in range(4):
        blocks = []
        for i in range(bounds[s], bounds[s + 1]):
            if used[i] == FLATTEN:
                raise SplitError(f"{name}: stage {s + 1} flattens its input")
            blocks += _split_module(used[i], model.get_submodule(used[i]), ins[i], outs[i])
        stages.append(tuple(blocks))
    layout = PartPaths("trunk", tuple(used[:start]), tuple(stages), tuple(used[ends[3] + 1:]))
    chans = [last[r][1] for r in stage_levels]
    return layout, chans, x, want


def _is_column(model: nn.Module, feature_info: list[dict] | None) -> bool:
    return (feature_info is not None and len({f["reduction"] for f in feature_info}) == 1
            and hasattr(model, "blocks") and hasattr(model, "_pos_embed") and hasattr(model, "patch_embed")
            and hasattr(model, "forward_head"))


def _derive_column(name: str, model: nn.Module) -> PartPaths:
    depth = len(model.blocks)
    if depth < 4 or depth % 4:
        raise SplitError(f"{name}: {depth} blocks cannot be split into four equal stages")
    if getattr(model, "rope_mixed", False):
        raise SplitError(f"{name}: depth-dependent rotary embeddings (rope_mixed) are not supported")
    k = depth // 4
    return PartPaths("column", (), tuple(tuple(f"blocks.{i}" for i in range(s * k, s * k + k)) for s in range(4)), ())


@torch.no_grad()
def _trace_parts(name, parts, img: int, channels: list[int | None], prefix: int, x, want):
    """(first, end) cuts of traced parts (a first block has the layout of its stage's end); the parts must
    give ``want`` (the model's output) for ``x``."""
    x = parts.stem(x)
    first, end = [], []
    for stage in parts.stages:
        for i, block in enumerate(stage):
            x = block(x)
            if i == 0:
                first.append(x)
        end.append(x)
    if not torch.equal(parts.head(x), want):
        raise SplitError(f"{name}: stem, blocks and head do not reproduce its forward")
    ends = [Cut(*_cut(t, c, img, prefix)) for t, c in zip(end, channels)]
    firsts = [Cut("bhwc", t.shape[3], img // t.shape[1]) if e.format == "bhwc" and t.ndim == 4
              else Cut(*_cut(t, None, img, prefix)) for t, e in zip(first, ends)]
    return tuple(firsts), tuple(ends)


# ------------------------------------------------------------------------------------------- builders
def split_name(name: str) -> tuple[str, str, str | None]:
    """(library, architecture, tag) of a model name: ``convnext_tiny.fb_in1k`` -> timm, ``convnext_tiny``,
    ``fb_in1k``; ``torchvision:resnet50.IMAGENET1K_V2`` -> torchvision, ``resnet50``, ``IMAGENET1K_V2``; a bare
    name timm does not know but torchvision does -> torchvision. ``KeyError`` for a name neither knows."""
    import timm

    if name.startswith(TORCHVISION):
        arch, _, tag = name[len(TORCHVISION):].partition(".")
        if arch not in _torchvision_names():
            raise KeyError(f"unknown model {short_repr(name)}: torchvision has no classifier {short_repr(arch)}")
        return "torchvision", arch, tag or None
    arch, _, tag = name.partition(".")
    if timm.is_model(arch):
        return "timm", arch, tag or None
    if arch in _torchvision_names():
        return "torchvision", arch, tag or None
    raise KeyError(f"unknown model {short_repr(name)}: not registered, not a timm model, not a torchvision "
                   "classifier")


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def timm_build(arch: str, tag: str | None, kwargs: dict, pretrained: bool, num_classes: int) -> nn.Module:
    import timm

    full = f"{arch}.{tag}" if tag else arch
    return timm.create_model(full, pretrained=pretrained, num_classes=num_classes, **kwargs)


def torchvision_build(arch: str, tag: str | None, kwargs: dict, pretrained: bool, num_classes: int) -> nn.Module:
    import torchvision

    weights = (tag or "DEFAULT") if pretrained else None
    if pretrained:
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
        _replace_classifier(model, num_classes)
        return model
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Pretrained torchvision weights come with 1000 classes: a new last linear layer for another count."""
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last or last[-1][1].out_features == num_classes:
        return
    path, lin = last[-1]
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Linear(lin.in_features, num_classes))


def timm_data_config(model: nn.Module) -> dict:
    import timm.data

    return dict(timm.data.resolve_model_data_config(model))


def torchvision_data_config(arch: str, tag: str | None, model: nn.Module) -> dict:
    """The preprocessing of the torchvision weights (``tag``, else the default ones), as a timm data config."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    tf = (enum[tag] if tag else enum.DEFAULT).transforms()
    crop, resize = tf.crop_size[0], tf.resize_size[0]
    return {"input_size": (3, crop, crop), "interpolation": tf.interpolation.value, "mean": tuple(tf.mean),
            "std": tuple(tf.std), "crop_pct": crop / resize, "crop_mode": "center"}


def _native_size(model: nn.Module, data_config: Callable[[nn.Module], dict]) -> int:
    size = data_config(model).get("input_size", (3, 224, 224))
    return int(size[-1])


def derive_spec(name: str, kwargs: dict | None = None, family: str | None = None, tag: str | None = None):
    """The :class:`~stitching.models.spec.ModelSpec` of ``name`` (constructor ``kwargs``; ``tag``: the
    pretrained weights when the name has none), derived from the model. ``KeyError`` for an unknown name;
    :class:`SplitError` (one line) where it cannot be cut."""
    library, arch, own_tag = split_name(name)
    try:
        return _derive(name, library, arch, own_tag or tag, dict(kwargs or {}), family)
    except SplitError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the library says, as one line
        first = (str(err).strip().splitlines() or [""])[0][:200]
        cls = ArgumentsError if kwargs else SplitError
        raise cls(f"{name}: building and tracing it failed ({type(err).__name__}: {first})") from None


def _derive(name: str, library: str, arch: str, tag: str | None, kwargs: dict, family: str | None):
    if library == "timm":
        build = functools.partial(timm_build, arch, tag, kwargs)
        data_config = timm_data_config
    else:
        build = functools.partial(torchvision_build, arch, tag, kwargs)
        data_config = functools.partial(torchvision_data_config, arch, tag)
    try:
        model = build(False, 1000).eval()
    except TypeError as err:
        raise ArgumentsError(f"{name}: the constructor refuses them ({str(err).splitlines()[0]})") from None
    if library == "timm" and getattr(model, "dynamic_img_size", None) is False and not (
            {"dynamic_img_size", "img_size"} & set(kwargs)):
        kwargs["dynamic_img_size"] = True        # any input resolution (position embedding resampled), as
        build = functools.partial(timm_build, arch, tag, kwargs)   # the registered ViTs are built
        model = build(False, 1000).eval()
    native = kwargs.get("img_size") or _native_size(model, data_config)
    native = int(native if isinstance(native, int) else native[-1])
    info = getattr(model, "feature_info", None) if library == "timm" else None
    info = [dict(f) for f in info] if info else None
    if library == "timm" and info is None:
        raise SplitError(f"{name}: the timm model has no feature_info to find its stages in")
    if library == "timm" and _is_column(model, info):
        layout, chans = _derive_column(name, model), [None] * 4
        x = torch.randn(1, 3, native, native, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = model(x)
    else:
        layout, chans, x, want = _derive_trunk(name, model, native, info)
    parts = apply_layout(layout, model)
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if layout.form == "column" else 0
    try:
        first, end = _trace_parts(name, parts, native, chans, prefix, x, want)
    except SplitError as err:
        raise SplitError(str(err) if str(err).startswith(name) else f"{name}: {err}") from None
    if library == "timm":
        pretrained_name = f"{arch}.{tag or model.pretrained_cfg.get('tag') or 'default'}"
    else:
        import torchvision

        pretrained_name = f"{TORCHVISION}{arch}.{tag or torchvision.models.get_model_weights(arch).DEFAULT.name}"
    return ModelSpec(
        name=name, family=family or arch, library=library, weights=pretrained_name, first=first, end=end,
        build=build, split=functools.partial(apply_layout, layout), data_config=data_config,
        kwargs=tuple(sorted(kwargs.items())), layout=layout,
    )
