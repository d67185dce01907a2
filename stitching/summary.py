"""``python -m stitching.summary --config FILE [section.key=value ...]``: what a config builds and costs.

Prints one JSON object: the model's kind, MACs (the paper's "FLOPs"), FLOPs (2 x MACs), parameters,
trainable parameters, the number of adapters and the tensor shape at every join, at the config's
``data.img_size``. Shapes and costs do not depend on weights, so it builds with random init (no download,
no weights loaded) -- a cost estimate before a single GPU-hour is spent. It is also the cheap check of the
weights files the config names (``model.source_weights`` / ``destination_weights``): each must exist and,
read from its header alone (the tensors are never loaded), fit its model's keys and shapes; otherwise one
line naming the key, the file and the first mismatch, and exit code 2.

``--similarity N`` adds ``similarity_before``: for a stitched config, before any training, linear CKA and the
affine least-squares residual between the source's features at the join and the destination's own activation
at the receiving point (:mod:`stitching.stitch.join`), on the first N training images with the evaluation
transforms. This one builds the config's real models (its pretrained weights or weights files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from stitching.config import check_files, load_config, run_cli


def check_weights(cfg) -> None:
    """The config's weights files exist and fit their models (keys and shapes from the files' headers)."""
    from stitching.models.registry import WeightsError, check_weights_file

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

    from stitching.data.loaders import build_datasets, default_workers
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
    from stitching.models.registry import PretrainedError
    from stitching.stitch.stitcher import build_model

    check_files(cfg)
    if cfg.is_original or cfg.model.adapter == "finetune":
        raise cfg.error("model.source_stage" if cfg.is_original else "model.adapter",
                        "--similarity needs a stitched config (a join between two networks)")
    try:
        return build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
    except PretrainedError as err:      # offline, no cache: one line, not the hub's traceback
        raise cfg.error(err.key, str(err)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitching.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--similarity", type=int, metavar="N", default=0,
                        help="also measure CKA and the least-squares residual at the join on N training images")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if args.similarity < 0:
        parser.error("--similarity takes a number of images >= 0")
    cfg = load_config(args.config, args.overrides)
    check_weights(cfg)
    built = build_stitched(cfg) if args.similarity else None
    out = summarize(cfg, built)
    if args.similarity:
        out["similarity_before"] = similarity(cfg, args.similarity, built)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
