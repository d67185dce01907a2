"""stitching: cut pretrained image classifiers into stages and join them with trainable adapters.

The path of data through the package follows its folders:
``config`` (YAML contract) -> ``models`` (registry: architectures cut into stages) -> ``stitch``
(formats, adapters, the stitched module, cost) -> ``train`` (recipe, run directory, resume) ->
``results`` (tidy CSV rows, collection) -> ``plots`` (the paper's figures and Table 1).
"""

__version__ = "0.1.0"
