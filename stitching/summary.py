"""What a config builds and costs (MACs, parameters, shapes at every join), or where a model can be cut.

``python -m stitching.summary --config FILE [section.key=value ...]`` or
``python -m stitching.summary --cuts MODEL [--img-size N]``.

With a config it prints a few lines for people -- the cut, the adapters, MACs (the paper's "FLOPs") and
parameters in G / M / K, and for a stitch both originals' MACs and the stitch's share of each ("1.67 GMACs,
41% of resnet50 (4.09 GMACs)") -- and then one JSON object (``--json``: the JSON alone, for scripts): the
model's kind, MACs, FLOPs (2 x MACs), parameters, trainable parameters, the number of adapters, the tensor
shape at every join and, for a stitch, ``originals`` (the source's and the destination's MACs, FLOPs and
parameters), at the config's ``data.img_size``. Shapes and costs do not depend on weights, so it builds with
random init (no download, no weights loaded) -- a cost estimate before a single GPU-hour is spent. It is also
the cheap check of the weights files the config names (``model.source_weights`` / ``destination_weights``):
each must exist and, read from its header alone (the tensors are never loaded), fit its model's keys and
shapes; otherwise one line naming the key, the file and the first mismatch, and exit code 2.

``--similarity N`` adds ``similarity_before``: for a stitched config, before any training, linear CKA and the
affine least-squares residual between the source's features at the join and the destination's own activation
at the receiving point (:mod:`stitching.stitch.join`), on the first N training images with the evaluation
transforms. This one builds the config's real models (its pretrained weights or weights files).

``--cuts MODEL`` prints the table of :func:`stitching.api.list_cuts` for any registered, timm or torchvision
name at ``--img-size`` (default 224; ``--kwargs`` gives constructor arguments as YAML, as
``model.source_kwargs``): one row per block, the index ``model.source_block`` / ``destination_block`` take,
its module, its stage, the stage cut (``model.source_stage`` / ``destination_stage``) on each stage's first
block, its output format and shape; ``--json`` prints the rows as JSON.
"""

from __future__ import annotations

import dataclasses
import json

import yaml

from stitching import cli
from stitching.cli import run_cli
from stitching.config import CLI, ConfigError
from stitching.kinds import FINETUNE, ORIGINAL
from stitching.validate import check_files, load_config
from stitching.stitch.cost import human, share


def check_weights(cfg) -> None:
    """The config's weights files exist and fit their models (keys and shapes from the files' headers)."""
    from stitching.models.weights import WeightsError, check_weights_file

    check_files(cfg, data=False)
    m = cfg.model
    for key, name, file, kwargs in (
            ("model.source_weights", m.source, m.source_weights, m.source_args()),
            ("model.destination_weights", m.destination or m.source, m.destination_weights, m.destination_args())):
        if file is None:
            continue
        try:
            check_weights_file(name, file, cfg.num_classes, kwargs)
        except WeightsError as err:
            err.key = key
            raise cfg.error(key, str(err)) from None


def summarize(cfg, built=None) -> dict:
    """Kind, cost and joins of ``cfg``'s model: of ``built`` if given, else of the model built with random
    weights (costs and shapes do not depend on them, and no weights file is read)."""
    from stitching.stitch.cost import count_cost
    from stitching.stitch.stitcher import build_model

    if built is None:
        mcfg = dataclasses.replace(cfg.model, pretrained=False, source_weights=None, destination_weights=None)
        built = build_model(mcfg, cfg.data.img_size, cfg.num_classes)
    out = {"kind": built.kind, "source": cfg.model.source, "img_size": cfg.data.img_size,
           "num_classes": cfg.num_classes, **count_cost(built.model, cfg.data.img_size)}
    plan = built.plan
    out["num_adapters"] = plan.num_adapters if plan else 0
    if plan:
        cuts = ({"source_block": plan.source_block, "destination_block": plan.destination_block}
                if plan.source_block is not None else
                {"source_stage": plan.source_stage, "destination_stage": plan.destination_stage})
        out.update(destination=plan.destination, **cuts, gap=plan.cut_label, adapter=plan.adapter,
                   resize=plan.effective_resize, schedule=plan.schedule, joins=plan.joins())
    else:
        out["joins"] = []
    return out


def similarity(cfg, n: int, built) -> dict:
    """``{cka, ls_residual, n}`` at the join of ``built``, the stitched model of ``cfg`` with its real weights
    (:func:`build_stitched`), on the first ``n`` training images (evaluation transforms), before training."""
    import torch

    from stitching.data.datasets import build_datasets
    from stitching.data.loaders import default_workers
    from stitching.data.transforms import build_transforms
    from stitching.stitch.join import similarity_before

    cuda = cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    built.model.to(device)
    built.target.to(device)
    _, eval_tf = build_transforms(built.data_config, cfg.data)
    data = dataclasses.replace(cfg.data, num_classes=cfg.num_classes)
    train_set, _ = build_datasets(data, eval_tf, eval_tf)
    subset = torch.utils.data.Subset(train_set, range(min(n, len(train_set))))
    loader = torch.utils.data.DataLoader(subset, batch_size=min(64, max(n, 1)), shuffle=False,
                                         num_workers=default_workers() if cfg.data.workers is None
                                         else cfg.data.workers)
    return similarity_before(built, (x for x, _ in loader), device)


def build_stitched(cfg):
    """The stitched model of ``cfg`` with its real weights, for ``--similarity`` (one build serves the cost
    too); a config without a join is a one-line error."""
    from stitching.models.weights import PretrainedError
    from stitching.stitch.stitcher import build_model

    check_files(cfg)
    if cfg.is_original or cfg.model.adapter == FINETUNE:
        raise cfg.error("model.source_stage" if cfg.is_original else "model.adapter",
                        "--similarity needs a stitched config (a join between two networks)")
    try:
        return build_model(cfg.model, cfg.data.img_size, cfg.num_classes, normalize=cfg.data.normalize)
    except PretrainedError as err:      # offline, no cache: one line, not the hub's traceback
        raise cfg.error(err.key, str(err)) from None


def originals(cfg) -> dict:
    """``{"source": {...}, "destination": {...}}`` of a stitched (or fine-tuning) config: each original
    model's name, MACs, FLOPs and parameters at ``data.img_size`` (random init: costs do not depend on weights;
    a destination that is the source network is counted once)."""
    from stitching.models.weights import load_model
    from stitching.stitch.cost import count_cost

    m = cfg.model
    out = {}
    for role, name, args in (("source", m.source, m.source_args()),
                             ("destination", m.destination or m.source, m.destination_args())):
        same = out.get("source") if (name, args) == (m.source, m.source_args()) else None
        if same is None:
            cost = count_cost(load_model(name, False, None, cfg.num_classes, args), cfg.data.img_size)
            same = {"model": name, "macs": cost["macs"], "flops": cost["flops"], "params": cost["params"]}
        out[role] = dict(same)
    return out


def describe(out: dict) -> str:
    """The lines for people in front of the JSON of :func:`summarize` (with ``originals`` for a stitch)."""
    at = f"at {out['img_size']} px, {out['num_classes']} classes"
    if out["kind"] == ORIGINAL:
        lines = [f"original {out['source']} {at}"]
    else:
        cut = ((f"block {out['source_block']}", f"block {out['destination_block']}") if "source_block" in out
               else (f"stage {out['source_stage']}", f"stage {out['destination_stage']}"))
        what = ("fine-tuned (every weight trains)" if out["kind"] == FINETUNE else
                f"{out['num_adapters']} {out['adapter']} adapter{'s' * (out['num_adapters'] != 1)}, "
                f"resize {out['resize']}, schedule {out['schedule']}")
        lines = [f"{out['kind']} {out['source']} {cut[0]} -> {out['destination']} {cut[1]} (gap {out['gap']}): "
                 f"{what}, {at}"]
    lines.append(f"  {human(out['macs'], 'MACs')} ({human(out['flops'], 'FLOPs')}), {human(out['params'])} "
                 f"parameters, {human(out['trainable_params'])} trainable")
    origs = out.get("originals") or {}
    shown = []
    for role in ("source", "destination"):
        o = origs.get(role)
        if o and o["model"] not in [s["model"] for s in shown]:
            shown.append(o)
    if shown:
        lines.append("  = " + ", ".join(f"{share(out['macs'], o['macs'])} of {o['model']} "
                                        f"({human(o['macs'], 'MACs')})" for o in shown))
    joins = out.get("joins") or []
    if len(joins) > 1:
        shape = "{}@{}x{}".format
        first, last = shape(*joins[0]["shape"]), shape(*joins[-1]["shape"])
        middle = [j["out"] for j in joins[1:-1] if "out" in j]
        if middle and middle[-1] == last:
            middle.pop()
        lines.append(f"  joins: {first} from {joins[0]['at']} -> " + "".join(f"{m} -> " for m in middle)
                     + f"{last} into {joins[-1]['at']}")
    sim = out.get("similarity_before")
    if sim:
        lines.append(f"  before training, on {sim['n']} images: CKA {sim['cka']:.3f}, least-squares residual "
                     f"{sim['ls_residual']:.3f}")
    return "\n".join(lines)


def cut_table(name: str, img_size: int, kwargs: str | None) -> "object":
    """:func:`stitching.api.list_cuts` of the command line's ``--cuts`` / ``--img-size`` / ``--kwargs``; its
    errors as one line naming the option."""
    from stitching.api import list_cuts

    flags = {"model.source": ("--cuts", name), "data.img_size": ("--img-size", img_size),
             "model.source_kwargs": ("--kwargs", kwargs)}
    try:
        args = yaml.safe_load(kwargs) if kwargs is not None else None
    except yaml.YAMLError:
        args = kwargs
    if args is not None and not isinstance(args, dict):
        raise ConfigError("--kwargs", kwargs, CLI, "must be a YAML mapping of constructor arguments, e.g. "
                          "'{img_size: 64}'")
    try:
        return list_cuts(name, img_size, args)
    except ConfigError as err:
        flag, value = flags.get(err.key, ("--cuts", name))
        raise ConfigError(flag, value, CLI, err.message) from None


def print_cuts(table, name: str, img_size: int) -> None:
    shown = table.assign(stage_cut=table["stage_cut"].astype(object).where(table["stage_cut"].notna(), ""),
                         shape=[f"{c}@{h}x{w}" for c, h, w in zip(table.channels, table.height, table.width)],
                         depth=table["relative_depth"].round(3))
    print(f"{name} at {img_size} px: {len(table)} blocks\n"
          "  block: model.source_block / destination_block (the source runs up to and including it, the "
          "destination receives after it)\n"
          "  stage_cut: model.source_stage / destination_stage (after the stage's first block; a gap s -> s "
          "lands at the end of stage s)")
    print(shown[["block", "module", "stage", "stage_cut", "format", "shape", "depth"]].to_string(index=False))


def main(argv=None) -> int:
    parser = cli.parser("python -m stitching.summary", __doc__, [
        "python -m stitching.summary --config configs/paper/resnet50_1to4_bottleneck.yaml",
        "python -m stitching.summary --config configs/quickstart.yaml --json --similarity 256",
        "python -m stitching.summary --cuts convnext_atto --img-size 64"], cli.SIMPLE_EXITS)
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument("--cuts", metavar="MODEL", help="list MODEL's stage and block cuts instead of a config")
    parser.add_argument("--img-size", type=int, metavar="N", help="--cuts: the input size (default 224)")
    parser.add_argument("--kwargs", metavar="YAML", help="--cuts: constructor arguments, e.g. '{img_size: 64}'")
    parser.add_argument("--json", action="store_true", help="print the JSON only (no lines for people)")
    parser.add_argument("--similarity", type=int, metavar="N", default=0,
                        help="also measure CKA and the least-squares residual at the join on N training images")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.cuts):
        parser.error("give exactly one of --config FILE or --cuts MODEL")
    if args.cuts:
        if args.similarity or args.overrides:
            parser.error("--cuts takes --img-size, --kwargs and --json only")
        size = 224 if args.img_size is None else args.img_size
        table = cut_table(args.cuts, size, args.kwargs)
        if args.json:
            print(json.dumps(json.loads(table.to_json(orient="records")), indent=2))
        else:
            print_cuts(table, args.cuts, size)
        return 0
    if args.img_size is not None or args.kwargs is not None:
        parser.error("--img-size and --kwargs go with --cuts; a config's are data.img_size=N and "
                     "model.source_kwargs=...")
    if args.similarity < 0:
        parser.error("--similarity takes a number of images >= 0")
    cfg = load_config(args.config, args.overrides)
    check_weights(cfg)
    built = build_stitched(cfg) if args.similarity else None
    out = summarize(cfg, built)
    if out["kind"] != ORIGINAL:
        out["originals"] = originals(cfg)
    if args.similarity:
        out["similarity_before"] = similarity(cfg, args.similarity, built)
    if not args.json:
        print(describe(out) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
