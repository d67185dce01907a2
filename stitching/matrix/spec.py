"""Matrix files and their expansion into sweep blocks.

Owns: the keys of a matrix file (:data:`MATRIX_KEYS`, checked with a one-line error naming key, value and
file), the cut kinds (:data:`CUT_KINDS`, the config's :data:`~stitching.config.CUT_KEYS`), the
controls (:data:`CONTROLS`, the values of config ``model.random_init`` a matrix is drawn for, and their
names :data:`CONTROL_NAMES`), the cut lists (every stage or block of each model, thinned by ``stride``) and
the translation of a matrix into :class:`stitching.sweep.spec.Block` s -- one per matrix (the trained one,
then each control), its grid the sender cuts x the receiver cuts x the seeds -- which the sweep machinery
expands (impossible cells dropped and counted, duplicates dropped, stable run directories) and launches; the
receiver evaluated alone (:data:`RECEIVER_BLOCK`, the calibrated scores' ceiling); and the groups of a
closed-form matrix (:meth:`Matrix.groups`: a block per control and seed, its cells :data:`CLOSED_FORM_GRID`
runs, in ``<runs dir>/<group name>``).

A matrix file::

    name: resnet18_self          # optional (default: the file's stem); runs go to runs/<name>
    base: ../toy/stitch.yaml      # the run config every cell builds on: models, weights, recipe
    cuts: stages                  # stages | blocks: the cut points a cell joins (default stages)
    stride: 1                     # every stride-th cut of each model (thins large models)
    senders: [1, 3]               # optional: these sender cuts instead (receivers: the same for the receiver);
                                  # a block matrix also takes "stages": the first block of each stage
    controls: [source, destination, both]   # random-init controls, each a full matrix (default: all three)
    seeds: [0]                    # train.seed of every cell (default: the base config's)
    slurm: {cpus_per_task: 2}     # resources for --launcher slurm (stitching.launch.slurm.SlurmResources)

The sender is the base config's ``model.source``, the receiver its ``model.destination`` (the source when
unset). A cell (i, j) is the base config with the sender cut i and the receiver cut j: with ``stages``,
``model.source_stage: i`` and ``model.destination_stage: j`` (the stage convention of ``docs/method.md``,
which stitches forwards only: j >= i); with ``blocks``, ``model.source_block: i`` and
``model.destination_block: j``, any pair, backwards (j earlier than i) included. ``cuts: blocks`` with
``senders: stages`` and ``receivers: stages`` is the stage-granularity matrix with every pair: cut k is the
first block of stage k on either side (the diagonal joins a model to itself at the same point).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stitching.config import CUT_KEYS, ConfigError
from stitching.launch.slurm.resources import SlurmResources
from stitching.validate import load_config

MATRIX_KEYS = ("name", "base", "cuts", "stride", "senders", "receivers", "controls", "seeds", "slurm")
#: ``cuts:`` -- the config's cut kinds; :data:`stitching.config.CUT_KEYS` gives the keys a sender cut and a
#: receiver cut are written to (the result columns drop "model.")
CUT_KINDS = tuple(CUT_KEYS)
#: the matrices drawn: the trained one (``none``) and the random-init controls (config ``model.random_init``)
CONTROLS = ("none", "source", "destination", "both")
CONTROL_NAMES = {"none": "trained", "source": "random sender", "destination": "random receiver",
                 "both": "random sender and receiver"}
STAGES = (1, 2, 3, 4)
#: the sweep block of the receiver evaluated alone (``train.epochs: 0``, its own preprocessing): the accuracy the
#: calibrated scores take as a cell's ceiling (:mod:`stitching.matrix.cells`)
RECEIVER_BLOCK = "receiver"
#: a closed-form matrix's cells: the run with least-squares adapters and no training (:mod:`.closed_form`), no
#: model file kept, the similarity at the join measured (the config default where the base switches it off)
CLOSED_FORM_GRID = {"model.init": "least_squares", "train.epochs": 0, "output.save_model": False}
#: ``senders:`` / ``receivers:`` of a block matrix: the first (downsampling) block of each stage, the stage cut
#: points -- a stage-granularity matrix with every pair, backwards included
STAGE_BLOCKS = "stages"


class MatrixError(ConfigError):
    pass


@dataclass
class Matrix:
    name: str
    path: Path
    base: Path
    cuts: str
    stride: int
    controls: list[str]                  # "none" first, then the chosen controls
    seeds: list[int] | None
    slurm: dict
    sender: str = ""                     # model names (from the base config)
    receiver: str = ""
    base_seed: int = 0                   # the base config's train.seed (the seed when seeds: is not given)
    similarity_images: int = 0           # the base config's train.similarity_images
    sender_cuts: list[int] = field(default_factory=list)
    receiver_cuts: list[int] = field(default_factory=list)

    @property
    def cells(self) -> int:
        """Cells of one matrix (one seed)."""
        return len(self.sender_cuts) * len(self.receiver_cuts)

    def block_name(self, control: str) -> str:
        """The sweep block (and, in tables, the panel) of one matrix."""
        return CONTROL_NAMES[control].replace(" ", "-")

    def _grid(self, control: str) -> dict:
        """The grid of one matrix (one control): every sender cut x every receiver cut."""
        from stitching.config import ModelConfig

        src_key, dst_key = CUT_KEYS[self.cuts]
        # the other kind's keys are cleared: a base config with stage cuts serves a block matrix and vice versa
        other = {k: [None] for kind, keys in CUT_KEYS.items() if kind != self.cuts for k in keys
                 if k.partition(".")[2] in ModelConfig.__dataclass_fields__}
        return {**other, src_key: list(self.sender_cuts), dst_key: list(self.receiver_cuts),
                "model.random_init": [control]}

    def blocks(self):
        """The sweep blocks of the trained matrix: one per control (the trained matrix first), then the
        receiver evaluated alone (:data:`RECEIVER_BLOCK`)."""
        from stitching.sweep.spec import Block

        out = []
        for control in self.controls:
            grid = self._grid(control)
            if self.seeds is not None:
                grid["train.seed"] = list(self.seeds)
            out.append(Block(self.block_name(control), self.base, grid, [], dict(self.slurm)))
        return out + [self.receiver_block()]

    def receiver_block(self):
        """The receiver on its own, evaluated (``train.epochs: 0``) as an original model: with its own
        weights, constructor arguments and evaluation preprocessing."""
        from stitching.sweep.spec import Block

        cfg = load_config(self.base, check=False)
        m = cfg.model
        own = (m.destination or m.source) == m.source and m.destination_args() == m.source_args()
        weights = m.destination_weights or (m.source_weights if own else None)
        grid = {"model.source": [self.receiver], "model.source_kwargs": [m.destination_args()],
                "model.source_weights": [weights], "model.destination": [None], "model.destination_weights": [None],
                "model.destination_kwargs": [None], "model.random_init": ["none"], "model.init": ["default"],
                "model.pos_embed": ["none"], "train.objective": ["task"], "train.epochs": [0],
                **{k: [None] for keys in CUT_KEYS.values() for k in keys}}
        return Block(RECEIVER_BLOCK, self.base, grid, [], dict(self.slurm))

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.base_seed]

    def groups(self) -> list[tuple[str, "object"]]:
        """The closed-form matrix: ``(group name, sweep block)`` per control and seed -- a group's cells share
        their passes (:mod:`stitching.matrix.closed_form`) and live in ``<runs dir>/<group name>/``. The cells
        are the trained matrix's with :data:`CLOSED_FORM_GRID` (and ``train.similarity_images`` at the config
        default where the base config switches it off: the similarity is half of what a closed-form matrix
        reports)."""
        from stitching.config import TrainConfig
        from stitching.sweep.spec import Block

        extra = {k: [v] for k, v in CLOSED_FORM_GRID.items()}
        if self.similarity_images <= 0:
            extra["train.similarity_images"] = [TrainConfig.similarity_images]
        out = []
        for control in self.controls:
            for seed in self.seed_list():
                grid = {**self._grid(control), "train.seed": [seed], **extra}
                out.append((group_name(self.block_name(control), seed),
                            Block(self.block_name(control), self.base, grid, [], dict(self.slurm))))
        return out


def group_name(block: str, seed: int) -> str:
    """The folder of a closed-form group: ``<matrix>.seed<seed>`` (``trained.seed0``, ``random-sender.seed1``)."""
    return f"{block}.seed{seed}"


def load_matrix(path: str | Path) -> Matrix:
    """The matrix file at ``path``, checked; its cut lists resolved from the base config's models."""
    path = Path(path)
    src = str(path)
    from stitching.sweep.spec import read_spec_file

    data = read_spec_file(path, "matrix", MATRIX_KEYS, MatrixError)

    def err(key, message):
        return MatrixError(key, data.get(key), src, message)

    base = data.get("base")
    if not isinstance(base, str):
        raise err("base", "a matrix needs a base run config (a path relative to this file)")
    base_path = path.parent / base
    if not base_path.is_file():
        raise err("base", f"file not found ({base_path})")
    cuts = data.get("cuts", "stages")
    if cuts not in CUT_KINDS:
        raise err("cuts", f"must be one of {', '.join(CUT_KINDS)}")
    stride = data.get("stride", 1)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise err("stride", "must be an integer >= 1 (every stride-th cut)")
    controls = data.get("controls", list(CONTROLS[1:]))
    if not isinstance(controls, list) or any(c not in CONTROLS[1:] for c in controls) \
            or len(set(controls)) != len(controls):
        raise err("controls", f"must be a list of distinct sides built with random weights: "
                              f"{', '.join(CONTROLS[1:])} (or [] for none)")
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                              or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)):
        raise err("seeds", "must be a non-empty list of distinct integers (train.seed of every cell)")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise err("slurm", "must map SLURM resources to values")
    try:
        SlurmResources.from_dict(slurm, source="")
    except (ValueError, TypeError) as error:
        raise err("slurm", str(error).removeprefix(": ")) from None
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise err("name", "must be a non-empty name without '/' (runs go to runs/<name>)")

    cfg = load_config(base_path, check=False)
    if cfg.model.random_init != "none":
        raise MatrixError("model.random_init", cfg.model.random_init, cfg.source_of("model.random_init"),
                          "the matrix sets the random-init controls itself (controls:): remove it from the base")
    m = Matrix(name, path, base_path, cuts, stride, ["none", *controls], seeds, slurm,
               cfg.model.source, cfg.model.destination or cfg.model.source, cfg.train.seed,
               cfg.train.similarity_images)
    all_src = model_cuts(cfg, "source", cuts)
    all_dst = model_cuts(cfg, "destination", cuts)
    m.sender_cuts = _chosen(data, "senders", all_src, stride, src, cfg, "source")
    m.receiver_cuts = _chosen(data, "receivers", all_dst, stride, src, cfg, "destination")
    return m


def _chosen(data: dict, key: str, available: list[int], stride: int, src: str, cfg, role: str) -> list[int]:
    value = data.get(key)
    if value is None:
        return available[::stride]
    if value == STAGE_BLOCKS:
        if data.get("cuts") != "blocks":
            raise MatrixError(key, value, src, "names the stage blocks of a block matrix: needs cuts: blocks")
        return [b.index for b in model_blocks(cfg, role) if b.first]
    if not isinstance(value, list) or not value or len(set(value)) != len(value) \
            or any(v not in available for v in value):
        raise MatrixError(key, value, src, f"must be a non-empty list of distinct cuts of the model: "
                                           f"{_span(available)}" + (" (or stages: the first block of each stage)"
                                                                    if data.get("cuts") == "blocks" else ""))
    return sorted(value)


def _span(cuts: list[int]) -> str:
    return f"{cuts[0]}..{cuts[-1]}" if len(cuts) > 3 else ", ".join(map(str, cuts))


def model_cuts(cfg, role: str, cuts: str) -> list[int]:
    """Every cut of the config's ``source`` or ``destination`` model: the stages 1..4, or the block indices
    0..n-1 of its flat block list."""
    if cuts == "stages":
        return list(STAGES)
    return [b.index for b in model_blocks(cfg, role)]


def model_blocks(cfg, role: str):
    """The flat block list of the config's ``source`` / ``destination`` model (registry ``list_blocks``)."""
    from stitching.validate import model_spec
    from stitching.models.trace import list_blocks

    model_spec(cfg, role)          # an unknown name or bad arguments: the config's one-line error
    m = cfg.model
    name = m.source if role == "source" else (m.destination or m.source)
    try:
        return list_blocks(name, m.source_args() if role == "source" else m.destination_args(), cfg.data.img_size)
    except RuntimeError as err:     # a block that does not output its stage's format: one line
        raise MatrixError("cuts", "blocks", cfg.path or "matrix", str(err)) from None
