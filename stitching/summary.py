"""``python -m stitching.summary --config FILE [section.key=value ...]``: what a config builds and costs.

Prints one JSON object: the model's kind, MACs (the paper's "FLOPs"), FLOPs (2 x MACs), parameters,
trainable parameters, the number of adapters and the tensor shape at every join, at the config's
``data.img_size``. Shapes and costs do not depend on weights, so it builds with random init (no download,
no weights loaded) -- a cost estimate before a single GPU-hour is spent. It is also the cheap check of the
weights files the config names (``model.source_weights`` / ``destination_weights``): each must exist and,
read from its header alone (the tensors are never loaded), fit its model's keys and shapes; otherwise one
line naming the key, the file and the first mismatch, and exit code 2.
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


def summarize(cfg) -> dict:
    from stitching.stitch.cost import count_cost
    from stitching.stitch.stitcher import build_model

    mcfg = dataclasses.replace(cfg.model, pretrained=False, source_weights=None, destination_weights=None)
    built = build_model(mcfg, cfg.data.img_size, cfg.num_classes)
    out = {"kind": built.kind, "source": cfg.model.source, "img_size": cfg.data.img_size,
           "num_classes": cfg.num_classes, **count_cost(built.model, cfg.data.img_size)}
    plan = built.plan
    out["num_adapters"] = plan.num_adapters if plan else 0
    if plan:
        out.update(destination=plan.destination, source_stage=plan.source_stage,
                   destination_stage=plan.destination_stage, adapter=plan.adapter,
                   resize=plan.effective_resize, schedule=plan.schedule, joins=plan.joins())
    else:
        out["joins"] = []
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitching.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_weights(cfg)
    print(json.dumps(summarize(cfg), indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
