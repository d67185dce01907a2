"""Closed-form stitching matrices: every cell's adapters fitted by least squares and evaluated, no gradient step.

A closed-form cell is the run ``model.init: least_squares`` with ``train.epochs: 0`` -- the one-cell fit of
:mod:`stitching.stitch.lsinit`, then the trainer's evaluation -- and has a run directory like any other
(``config.yaml``, ``result.csv`` with the trainer's columns, ``state.json``). What differs is how it is
computed: all cells of one *group* -- the same sender, receiver, control and seed, i.e. configs that differ
only in their cuts -- are computed together, here (:func:`run_group`):

1. the two networks are loaded once (:func:`stitching.stitch.stitcher.load_networks`, with the config's
   seed, as the trainer loads them) and every cell's adapters assembled on them
   (:func:`~stitching.stitch.stitcher.assemble`, each from the random state the trainer would have);
2. the fit streams the ``model.init_images`` fit images (:func:`stitching.stitch.lsinit.fit_images`) in
   passes: per batch, ONE forward of each frozen network (one in all for a network stitched to itself) gives
   the activation after every block a cell needs, and every cell's :class:`~stitching.stitch.lsinit.LinkFit`
   (pass p fits link p of every chain that long) or :class:`~stitching.stitch.lsinit.ChainMeasure` (a chain
   fitted in the passes before) is fed from them. A matrix of one-adapter cells takes two passes; a chain of
   k links, k + 1 -- as the one-cell fit, whose maths this is (the same objects, fed the same tensors);
3. one pass over the first ``train.similarity_images`` validation images gives every cell's similarity at
   the join before and after the fit (linear CKA, the affine least-squares residual, the MSE;
   :mod:`stitching.stitch.join`'s definitions), and one pass over the validation set every cell's top-1,
   top-5 and loss, the sender's forward shared by all cells, each cell's adapters and receiver suffix its own
   (the trainer's evaluation: folded BatchNorms, channels-last and precision as ``train.*`` say);
4. each cell's ``result.csv`` is written (atomically, :mod:`stitching.rundir`) with the trainer's row
   (``init_residual``: the fit's residual; ``wall_time_s``: the group's wall time shared equally among the
   cells it computed).

Memory: the fit's first pass keeps the activations the later passes read, for every fit batch, while they total
at most :data:`FIT_CACHE_BYTES` (2 GiB; the later passes then run no network); past that, and otherwise, it is
bounded by one batch: the activations of one batch at the blocks the cells read (sender and
receiver), the cells' accumulators (per link being fitted, float64: ``c_in^2 + c_in c_out + c_in + c_out``
numbers; the similarity's per cell: three scalars and the least-squares sums of the destination cut's
channels) and one cell's adapters and suffix at a time in evaluation; beyond the kept activations, nothing grows
with the number of images.

A finished cell (``result.csv``) is left alone, so a group stopped (the trainer's signals,
:mod:`stitching.train.stop`: SIGTERM / SIGUSR1 stop it at the next batch with
:data:`stitching.rundir.EXIT_PREEMPTED`, Ctrl-C with :data:`~stitching.rundir.EXIT_INTERRUPTED`, a second Ctrl-C
at once; nothing is written for its unfinished cells) or killed is computed again for its unfinished cells only;
a cell's numbers do not depend on which other cells share its passes. The group directory
(:meth:`stitching.matrix.spec.Matrix.groups`) holds the cells' run directories; its ``lock`` keeps one process
per group, and its ``state.json`` says how the group's last process ended (what the local launcher reports).

The passes themselves (2 and 3) are :mod:`stitching.matrix.passes`; this module loads and checks a group, runs them
and writes the cells.

Command line (what a SLURM array task runs; ``python -m stitching.matrix FILE --closed-form`` launches it):
``python -m stitching.matrix.closed_form GROUP_DIR [GROUP_DIR ...]``.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import torch

from stitching import cli
from stitching import rundir as R
from stitching.rundir_lock import run_lock
from stitching.cli import run_cli
from stitching.config import CUT_KEYS, IDENTITY, Config, ConfigError
from stitching.results.row import result_row
from stitching.validate import check_files, load_config
from stitching.results.schema import RESULT_COLUMNS
from stitching.stitch import lsinit
from stitching.stitch.stitcher import Networks, assemble, load_networks
from stitching.matrix.passes import Cell, SharedForward, evaluate_cells, fit_cells, parts_of, similarity_cells
from stitching.train.objective import Objective, train_macs
from stitching.train.opening import batch_split, resolve_device
from stitching.train.perf import device_name
from stitching.train.stop import INTERRUPT, NONE, Aborted, StopSignals

#: what a closed-form cell's config says (a cell of a closed-form matrix is exactly this run)
CLOSED_FORM = {"model.init": "least_squares", "train.epochs": 0}
_CUTS = {k for keys in CUT_KEYS.values() for k in keys}


class Preempted(Exception):
    """SIGTERM / SIGUSR1 / SIGINT arrived: the group stops at the next batch, writing nothing more; ``code``:
    :data:`~stitching.rundir.EXIT_INTERRUPTED` after a Ctrl-C, else :data:`~stitching.rundir.EXIT_PREEMPTED`."""

    def __init__(self, code: int):
        super().__init__(R.describe_exit(code))
        self.code = code


def cell_dirs(group_dir: Path) -> list[Path]:
    """The run directories of a group: its sub-folders holding a ``config.yaml``, by name."""
    return sorted(d for d in Path(group_dir).iterdir() if (d / R.CONFIG).is_file())


def _load(d: Path) -> Config:
    return load_config(d / R.CONFIG, updates={"output.dir": str(d)}, run_dir=True)


def check_group(cfgs: list[Config], group_dir: Path) -> None:
    """The cells are closed-form runs (``model.init: least_squares``, ``train.epochs: 0``) and one group: their
    identities differ in the cut keys only. Otherwise a :class:`ConfigError` (one line, exit 2)."""
    for cfg in cfgs:
        for key, want in CLOSED_FORM.items():
            section, name = key.split(".")
            if getattr(getattr(cfg, section), name) != want:
                raise cfg.error(key, f"a closed-form cell is the run {key}={want} (written by python -m "
                                     f"stitching.matrix --closed-form); train it with python -m stitching.train")
    first = cfgs[0].to_dict()
    for cfg in cfgs[1:]:
        differ = [k for k in R.differing_keys(first, cfg.to_dict(), IDENTITY) if k not in _CUTS]
        if differ:
            raise ConfigError("group", str(group_dir), "command line",
                              f"{cfg.output.dir} is not of the same group as {cfgs[0].output.dir} (differs in "
                              f"{', '.join(differ)}; a group's cells differ in their cuts only)")


# ------------------------------------------------------------------------------------------ the passes
class _Stop(StopSignals):
    """The trainer's stop signals (:class:`stitching.train.stop.StopSignals`; its first-Ctrl-C line, which
    promises a checkpoint, is not printed); :meth:`check` raises :class:`Preempted` once one arrived."""

    def __init__(self):
        super().__init__(is_main=False)

    def check(self) -> None:
        if self.level != NONE:
            raise Preempted(R.EXIT_INTERRUPTED if self.level == INTERRUPT else R.EXIT_PREEMPTED)


# ------------------------------------------------------------------------------------------ a group
def run_group(group_dir: str | Path, say=print) -> int:
    """Compute the unfinished cells of the group in ``group_dir`` (see the module docstring); an exit code of
    :mod:`stitching.rundir` (a :class:`ConfigError` for bad cells, before any compute)."""
    group_dir = Path(group_dir)
    if not group_dir.is_dir():
        raise ConfigError("group", str(group_dir), "command line", "no such group directory")
    dirs = cell_dirs(group_dir)
    todo = [d for d in dirs if R.status(d) != R.FINISHED]
    if not dirs:
        raise ConfigError("group", str(group_dir), "command line", f"holds no cell (no sub-folder with a {R.CONFIG})")
    if not todo:
        say(f"{group_dir.name}: all {len(dirs)} cells finished")
        return R.EXIT_OK
    cfgs = [_load(d) for d in todo]
    check_group(cfgs, group_dir)
    for cfg in cfgs:
        check_files(cfg)
    lock = run_lock(group_dir)
    try:
        lock.acquire()
    except R.BusyError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    stop = _Stop()
    group = R.RunDir(group_dir)
    try:
        code = _compute(group_dir, cfgs, len(dirs), stop, say)
        group.write_state(R.FINISHED, code, f"closed form: {len(todo)} cells computed")
        return code
    except (Preempted, Aborted) as err:
        code = err.code if isinstance(err, Preempted) else R.EXIT_INTERRUPTED
        message = f"{R.describe_exit(code)}: its unfinished cells are computed when it runs again"
        say(f"{group_dir.name}: {message}")
        group.write_state(R.status_of_exit(code), code, message)
        return code
    except R.RunDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        stop.restore()
        lock.release()


def build_cells(cfgs: list[Config]) -> tuple[Networks, list[Cell]]:
    """The group's networks, loaded once with its seed, and each cell's stitch assembled on them from the random
    state the trainer's ``build_model`` would assemble it from (so each cell's adapters start as that run's).
    Config errors (unloadable weights, a link without a target) are :class:`ConfigError` s."""
    cfg0 = cfgs[0]
    torch.manual_seed(cfg0.train.seed)          # as the trainer builds a run: the networks, then the adapters
    try:
        nets = load_networks(cfg0.model, cfg0.data.img_size, cfg0.num_classes)
    except (ValueError, FileNotFoundError) as err:
        key = getattr(err, "key", None) or ("model.destination_weights" if "destination" in str(err)
                                            else "model.source_weights")
        raise cfg0.error(key, str(err).splitlines()[0]) from None
    nets.source.eval()              # frozen networks in eval mode throughout (as the one-cell fit runs them)
    nets.destination.eval()
    rng = torch.get_rng_state()
    cells = []
    for cfg in cfgs:
        torch.set_rng_state(rng)
        built = assemble(nets, cfg.model, cfg.train.frozen_bn, cfg.data.normalize)
        lsinit.check_run(cfg, built)
        chain, reinject = lsinit.adapter_chain(built)
        built.model.eval()
        cells.append(Cell(cfg, R.RunDir(cfg.output.dir or "."), built, chain, lsinit.link_points(built),
                          lsinit.source_depth(built), reinject.embedding if reinject is not None else None))
    return nets, cells


def _compute(group_dir: Path, cfgs: list[Config], total: int, stop: _Stop, say) -> int:
    import dataclasses

    from stitching.data.datasets import build_datasets
    from stitching.data.loaders import build_loader
    from stitching.data.pipeline import CpuFloat, batch_to_device
    from stitching.data.transforms import build_transforms
    from stitching.stitch import fast
    from stitching.stitch.cost import count_cost
    from stitching.train import perf as P
    from stitching.train.measure import BATCH

    t0 = time.time()
    cfg0 = cfgs[0]
    device = resolve_device(cfg0)
    nets, cells = build_cells(cfgs)
    for c in cells:
        c.cost = count_cost(c.built.model, cfg0.data.img_size)
    for module in (nets.source, nets.destination, *(c.built.model.adapters for c in cells)):
        module.to(device)
    for c in cells:
        c.minus = None if c.minus is None else c.minus.to(device)
    precision = P.resolve_precision(cfg0.train.precision, device)
    P.configure_backends(device)
    want = cfg0.train.channels_last
    channels_last = fast.default_channels_last(device) if want == "auto" else bool(want)

    canonical = parts_of(nets)
    if cfg0.train.fold_bn:          # the trainer's evaluation copies: each frozen part folded on its own
        def folded(parts):
            stem, blocks, head = parts
            return fast.inference_copy(stem), [fast.inference_copy(b) for b in blocks], fast.inference_copy(head)
        evaluation = (folded(canonical[0]),)
        evaluation += (evaluation[0] if nets.same else folded(canonical[1]),)
    else:
        evaluation = canonical
    if channels_last:               # (as the trainer: before the fit, the adapters too)
        for stem, blocks, head in evaluation:
            for m in (stem, *blocks, head):
                fast.to_channels_last(m)
        for c in cells:
            fast.to_channels_last(c.built.model.adapters)

    # the fit: the trainer's images and batches, every cell fed from one forward per network per batch
    per_device, _ = batch_split(cfg0, 1)
    images, n_fit = lsinit.fit_images(cfg0, cells[0].built, per_device)
    shared = SharedForward(nets, canonical, cells[0].built.destination_input)
    passes = fit_cells(cells, shared, images, device, stop)
    say(f"{group_dir.name}: fitted {len(cells)} cells on {n_fit} training images in {passes} shared passes "
        f"({time.time() - t0:.1f} s)")

    train_tf, eval_tf = build_transforms(nets.data_config, cfg0.data, device)
    try:
        _, val_ds = build_datasets(dataclasses.replace(cfg0.data, num_classes=cfg0.num_classes), train_tf, eval_tf)
    except (FileNotFoundError, ValueError) as err:
        raise cfg0.error("data.root" if cfg0.data.name == "imagefolder" else "data.name", str(err)) from None
    if cfg0.train.similarity_images > 0:
        val_set = CpuFloat(val_ds, val_ds.transform) if hasattr(val_ds, "transform") else val_ds
        n = min(cfg0.train.similarity_images, len(val_set))
        sim_loader = build_loader(torch.utils.data.Subset(val_set, range(n)), min(BATCH, max(n, 1)), False,
                                  cfg0.train.seed, cfg0.data.workers)
        similarity_cells(cells, shared, lambda: (x for x, _ in sim_loader), device, stop)
    loader = build_loader(torch.utils.data.Subset(val_ds, range(len(val_ds))), per_device, False, cfg0.train.seed,
                          cfg0.data.workers, pin_memory=device.type == "cuda")
    evaluate_cells(cells, SharedForward(nets, evaluation), loader, batch_to_device(eval_tf, device), device, precision,
                   channels_last, stop)
    stop.check()
    wall = (time.time() - t0) / len(cells)
    for c in cells:
        row = _row(c, device, precision, channels_last, wall)
        c.rundir.write_rows(R.RESULT, RESULT_COLUMNS, [row])
        c.rundir.write_state(R.FINISHED, R.EXIT_OK, f"closed form: computed with the {len(cells)} cells of group "
                                                    f"{group_dir.name}")
    best = max(cells, key=lambda c: c.evaluation["top1"])
    say(f"{group_dir.name}: wrote {len(cells)} cells ({total - len(cells)} were finished) in "
        f"{time.time() - t0:.1f} s; best {best.built.plan.cut_label} top1 {best.evaluation['top1']:.2f}")
    return R.EXIT_OK


def _row(c: Cell, device, precision: str, channels_last: bool, wall: float) -> dict:
    """The cell's result row (:func:`stitching.results.row.result_row`, as the trainer writes it)."""
    extra = Objective(c.cfg, c.built, device, channels_last).extra_macs(c.cfg.data.img_size)
    return result_row(run_id=c.rundir.path.name, cfg=c.cfg, kind=c.built.kind, plan=c.built.plan,
                      precision=precision, world_size=1, evaluation=c.evaluation, train_loss="",
                      init_residual=c.residual, cost=c.cost,
                      train_macs=train_macs(c.cfg, c.cost["macs"], extra), before=c.before, after=c.after,
                      images_per_s=0.0, wall_time_s=wall, pack="", device=device_name(device))



#: the command computing one group: ``python -m stitching.matrix.closed_form GROUP_DIR``
MODULE = "stitching.matrix.closed_form"


def group_command(python: str = sys.executable) -> str:
    """The shell command (referring to ``"$RUN_DIR"``: the group directory) a SLURM array task runs."""
    return f'{shlex.quote(python)} -m {MODULE} "$RUN_DIR"'


#: what the exit codes of ``python -m stitching.matrix.closed_form`` mean
EXITS = {R.EXIT_OK: "every cell of the groups finished", R.EXIT_FAILED: "an unexpected error (a traceback above it)",
         R.EXIT_CONFIG: "a bad group directory or cell config: one line names it; nothing computed",
         R.EXIT_BUSY: "another process computes the group (named by host and pid)",
         R.EXIT_IO: "a result could not be written; the files already there are intact",
         R.EXIT_PREEMPTED: "preempted (SIGTERM / SIGUSR1): nothing written for the unfinished cells; run it again",
         R.EXIT_INTERRUPTED: "interrupted (Ctrl-C): nothing written for the unfinished cells; run it again"}


def main(argv=None) -> int:
    parser = cli.parser(f"python -m {MODULE}", "Compute closed-form matrix groups (written by ``python -m "
                        "stitching.matrix FILE --closed-form``): every unfinished cell of each group, its adapters "
                        "fitted by least squares in passes shared by the group's cells, then evaluated.",
                        [f"python -m {MODULE} runs/tiny-closed-form/trained.seed0"], EXITS)
    parser.add_argument("groups", nargs="+", help="group directories (each holds its cells' run directories)")
    args = parser.parse_args(argv)
    code = R.EXIT_OK
    for group in args.groups:
        code = run_group(group, say=lambda m: print(m, flush=True))
        if code != R.EXIT_OK:
            break
    return code


if __name__ == "__main__":
    run_cli(main)
