"""stitching: cut pretrained image classifiers into stages and join them with trainable adapters.

The Python API (:mod:`stitching.api`; loaded on first use, so ``import stitching`` stays instant):

- ``stitching.create_model(source, destination, source_stage=, destination_stage=, adapter=, ...)``: the
  stitched (or original) ``nn.Module``, built as the trainer builds it;
- ``stitching.cost(model, img_size)``: its MACs, FLOPs, parameters and trainable parameters;
- ``stitching.list_cuts(model_name, img_size)``: a model's stage and block cuts with their shapes;
- ``stitching.train(config, **overrides)``: a run, as ``python -m stitching.train`` does it (the
  :mod:`stitching.train` package is callable);
- ``stitching.load_run(run_dir)``: a finished run's trained model and its result row.

The path of data through the package follows its folders (docs/architecture.md has it module by module):
``config`` (the YAML contract) -> ``validate`` (every subsystem's choices) -> ``models`` (registry: architectures
cut into stages) -> ``stitch`` (shape plan, adapters, the stitched module, cost) -> ``data`` (datasets, loaders)
-> ``train`` (recipe, checkpoints, resume) -> ``rundir`` (the run directory) -> ``results`` (the row of
``result.csv``, collection) -> ``plots`` (the paper's figures and Table 1). Around it: ``kinds`` (run and
adapter kinds), ``sweep`` and ``matrix`` (grids of runs), ``launch`` (local and SLURM launchers).
"""

import importlib

__version__ = "0.1.0"

#: the names :mod:`stitching.api` gives the package (``train`` is the callable subpackage itself)
API = ("create_model", "cost", "list_cuts", "load_run", "train")
__all__ = [*API, "__version__"]


def __getattr__(name: str):
    if name == "train":
        return importlib.import_module("stitching.train")
    if name in API:
        return getattr(importlib.import_module("stitching.api"), name)
    raise AttributeError(f"module 'stitching' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
