"""Train (or evaluate) the model a config describes into its run directory, resuming where it stopped.

``python -m stitching.train --config FILE [section.key=value ...]`` (or ``--run-dir DIR``): trains (or, with ``train.epochs: 0``, evaluates) the model a config describes into its run directory
(``output.dir``; without one, ``runs/<config name>/<run name>``, named by the run's identity as a sweep names
its runs, and printed first). Overrides are typed by the key they set (a path exactly as typed, ``2e-3``
a number, ``true``/``false``, ``null``; :func:`stitching.config.parse_value`), ``--run-dir`` is a plain
path. Re-running the same command resumes from the last
checkpoint; a finished run is not redone unless ``--force`` (which keeps the old files under
``previous/``); ``--run-dir`` reads the directory's ``config.yaml``, where a key an older version did not
write takes its baseline (:data:`stitching.config.IDENTITY_BASELINE`: the value that run had). Exit codes
(:mod:`stitching.rundir`): done (or already finished), bad config/input (one line on stderr, nothing
computed or overwritten), non-finite loss, run directory held by another trainer, a file that cannot be
written, preempted by SIGTERM/SIGUSR1 or interrupted by Ctrl-C after saving a checkpoint (run it again).
From Python: ``stitching.train(config, **overrides)`` (:func:`stitching.train.train`).
Several processes: ``torchrun --nproc_per_node=N -m stitching.train --config FILE``.
Several runs as one pack (:mod:`stitching.train.pack`: one data pass, the shared source prefix run once, each
run's result the one it has alone): ``--run-dir A --run-dir B ...`` or ``--config`` several times (the
overrides apply to every one); runs that cannot share a pack are refused with the key that keeps them apart.
"""

from __future__ import annotations

from stitching import cli
from stitching.cli import run_cli
from stitching.train import resolve


def main(argv=None) -> int:
    parser = cli.parser("python -m stitching.train", __doc__, [
        "python -m stitching.train --config configs/quickstart.yaml train.lr=0.01",
        "torchrun --nproc_per_node=4 -m stitching.train --config configs/paper/resnet50_1to4_bottleneck.yaml",
        "python -m stitching.train --run-dir runs/paper/<run name>      # a sweep's run, by hand",
        "python -m stitching.train --run-dir runs/p/a --run-dir runs/p/b   # two runs as one pack, one data pass"],
        cli.TRAINER_EXITS)
    parser.add_argument("--config", action="append", default=[],
                        help="run config YAML (several: the runs train as one pack)")
    parser.add_argument("--run-dir", action="append", default=[],
                        help="run directory holding config.yaml, written by stitching.sweep (several: one pack)")
    parser.add_argument("--force", action="store_true", help="redo a finished run (old files kept in previous/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    runs = [(c, None) for c in args.config] + [(None, d) for d in args.run_dir]
    if not runs:
        parser.error("give --config FILE or --run-dir DIR (several of them: the runs train as one pack)")
    cfgs = [resolve(config, run_dir, args.overrides) for config, run_dir in runs]
    if len(cfgs) == 1:
        from stitching.train.loop import run

        return run(cfgs[0], force=args.force, exiting=True)
    from stitching.train.pack import run as run_pack

    return run_pack(cfgs, force=args.force, exiting=True)


if __name__ == "__main__":
    run_cli(main)
