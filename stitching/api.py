"""The Python API: what a notebook calls, each a thin front of the code the command-line tools run.

Owns nothing but the translation of Python arguments into a config and back: :func:`create_model` builds with
:func:`stitching.stitch.stitcher.build_model` (the trainer's builder) after the config's checks, :func:`cost` is
:func:`stitching.stitch.cost.count_cost`, :func:`list_cuts` tabulates :func:`stitching.models.trace.list_blocks`,
:func:`load_run` is :func:`stitching.train.saved.load_trained` plus the run's result row as
:mod:`stitching.results.collect` reads it, and :func:`train` is the callable :mod:`stitching.train` package.
Errors are :class:`~stitching.config.ConfigError` (a ``ValueError``): the one line a config error prints,
naming the key, the value and the call it came from.

>>> import stitching
>>> model = stitching.create_model("resnet18", "resnet18", source_stage=1, destination_stage=3,
...                                adapter="linear", pretrained=False, img_size=64, num_classes=10)
>>> type(model).__name__, model.plan.cut_label
('StitchedModel', '1->3')
>>> c = stitching.cost(model, img_size=64)
>>> c["trainable_params"] == sum(p.numel() for p in model.adapters.parameters()) < c["params"]
True
>>> cuts = stitching.list_cuts("resnet18", img_size=64)
>>> cuts.loc[cuts.stage_cut.notna(), ["block", "module", "channels", "height"]].values.tolist()
[[0, 'layer1.0', 64, 16], [2, 'layer2.0', 128, 8], [4, 'layer3.0', 256, 4], [6, 'layer4.0', 512, 2]]
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from torch import nn

from stitching import rundir as R
from stitching.validate import check_files, load_config, model_spec
from stitching.models.trace import list_blocks
from stitching.models.weights import PretrainedError, WeightsError
from stitching.results.collect import normalize_columns, read_result
from stitching.stitch.cost import count_cost as cost
from stitching.stitch.stitcher import build_model
from stitching.train import RunFailed, train
from stitching.train.saved import load_trained

__all__ = ["create_model", "cost", "list_cuts", "load_run", "train", "RunFailed", "CUT_COLUMNS"]

#: the columns of :func:`list_cuts`'s table, one row per block (a block cut; the first block of each stage is
#: also its stage cut)
CUT_COLUMNS = ["block", "module", "stage", "stage_cut", "format", "channels", "height", "width", "relative_depth"]


def create_model(source: str, destination: str | None = None, source_stage: int | None = None,
                 destination_stage: int | None = None, adapter: str = "bottleneck", pretrained: bool = True,
                 img_size: int = 224, num_classes: int = 1000, **options) -> nn.Module:
    """The network a config's ``model`` section describes, built as the trainer builds it.

    ``source`` alone (no cut): the original model, as its library builds it. With ``source_stage`` and
    ``destination_stage`` (or the block cuts ``source_block=i, destination_block=j``, indices of
    :func:`list_cuts`): a :class:`~stitching.stitch.stitcher.StitchedModel` -- ``prefix`` (the source up to the
    cut), ``adapters``, ``suffix`` (the destination from the receiving point on) -- whose frozen parts have
    ``requires_grad=False`` and stay in eval mode, so only the adapters train (``adapter=finetune``, the
    fine-tuning baseline, trains everything). ``destination`` defaults to ``source``.

    ``options`` are any other ``model.*`` config key (``resize``, ``schedule``, ``adapter_style``,
    ``pos_embed``, ``random_init``, ``source_weights``, ``source_kwargs``, ...: docs/config.md, "The config
    contract"); ``img_size`` and ``num_classes`` are ``data.img_size`` and ``data.num_classes`` (the traced
    shapes the stitch is planned on; the classifier head). Everything is checked first, as a config is: a bad
    key, value or combination raises :class:`~stitching.config.ConfigError` (a ``ValueError``) naming it,
    before any model is built. ``pretrained=True`` fetches the weights through timm / torchvision (or their
    cache). ``model.init: least_squares`` is refused: it fits the adapters on training images when a run
    starts (:func:`train`). :func:`cost` gives the result's MACs and parameters."""
    where = "stitching.create_model()"
    updates = {"model.source": source, "model.destination": destination, "model.source_stage": source_stage,
               "model.destination_stage": destination_stage, "model.adapter": adapter,
               "model.pretrained": pretrained, "data.img_size": img_size, "data.num_classes": num_classes,
               **{f"model.{key}": value for key, value in options.items()}}
    cfg = load_config(None, updates=updates, updates_source=where)
    if cfg.model.init != "default":
        raise cfg.error("model.init", "create_model builds the adapters with their default init; the least-squares "
                        "fit runs on training images when a run starts (stitching.train)")
    check_files(cfg, data=False)
    try:
        return build_model(cfg.model, img_size, num_classes).model
    except (PretrainedError, WeightsError) as err:      # offline without a cache, a file that does not fit
        raise cfg.error(err.key or "model.pretrained", str(err)) from None


def list_cuts(model_name: str, img_size: int = 224, kwargs: dict | None = None) -> pd.DataFrame:
    """Every cut point of ``model_name`` (a hand-registered name or any timm / torchvision classifier) at
    ``img_size``: one row per block (:data:`CUT_COLUMNS`).

    ``block`` is the index ``model.source_block`` / ``destination_block`` take (the source runs up to and
    including it; the destination receives after it); ``module`` its path in the model; ``stage`` the stage
    holding it; ``stage_cut`` is s on the first (downsampling) block of stage s -- where ``model.source_stage:
    s`` cuts and ``model.destination_stage: s`` receives (a gap s -> s lands at the end of stage s instead) --
    and empty elsewhere; ``format`` the tensor format (``nchw``, ``nhwc``, ``tokens+1``, ...) and ``channels``,
    ``height``, ``width`` the block's output (traced on a random-init model, no weights read);
    ``relative_depth`` = (block + 1) / blocks.

    A DataFrame rather than a list of records: it prints as a table in a notebook, filters and joins in one
    line (``cuts[cuts.stage_cut.notna()]``), and is the table ``python -m stitching.summary --cuts`` prints.
    ``kwargs`` are constructor arguments, as ``model.source_kwargs`` takes them (a model with a fixed input
    size, such as Swin V2, needs ``{"img_size": img_size}`` there too: not a ``**`` argument, since
    ``img_size`` is this function's own). An unknown name or a model that cannot be cut raises
    :class:`~stitching.config.ConfigError` naming it."""
    where = "stitching.list_cuts()"
    cfg = load_config(None, updates={"model.source": model_name, "model.source_kwargs": kwargs,
                                     "data.img_size": img_size}, updates_source=where, check=False)
    spec = model_spec(cfg, "source")
    if img_size < spec.min_img_size:
        raise cfg.error("data.img_size", f"must be at least {spec.min_img_size} for {model_name}")
    try:
        blocks = list_blocks(model_name, kwargs, img_size)
    except RuntimeError as err:             # a block that does not output its stage's format
        raise cfg.error("model.source", str(err).splitlines()[0]) from None
    rows = [{"block": b.index, "module": b.name, "stage": b.stage, "stage_cut": b.stage if b.first else None,
             "format": b.format, "channels": b.channels, "height": b.height, "width": b.width,
             "relative_depth": b.relative_depth} for b in blocks]
    table = pd.DataFrame(rows, columns=CUT_COLUMNS)
    table["stage_cut"] = table["stage_cut"].astype("Int64")
    return table


def load_run(run_dir: str | os.PathLike) -> tuple[nn.Module, pd.Series]:
    """A finished run's trained model (rebuilt from its ``model.safetensors``, in eval mode) and its result row
    (``result.csv`` with the column types of ``python -m stitching.collect``'s table).

    ``ValueError`` naming the directory when it holds no finished run (its status: new, started, preempted,
    failed) or no model (``output.save_model: false``)."""
    d = R.RunDir(run_dir)
    if not d.config.is_file() and not d.result.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no {R.CONFIG})")
    if not d.finished:
        raise ValueError(f"{run_dir}: the run is {d.status()}, not finished (no {R.RESULT})")
    if not d.file(R.MODEL).is_file():
        raise ValueError(f"{run_dir}: no {R.MODEL} (the run had output.save_model: false)")
    row = normalize_columns(read_result(d.result)).iloc[0]
    return load_trained(Path(run_dir)), row

