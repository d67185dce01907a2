"""``python -m stitching.train --config FILE [section.key=value ...]`` (or ``--run-dir DIR``).

Trains (or, with ``train.epochs: 0``, evaluates) the model a config describes into its run directory
(``output.dir``, default ``runs/<config name>``). Re-running the same command resumes from the last
checkpoint; a finished run is not redone unless ``--force`` (which keeps the old files under
``previous/``); ``--run-dir`` reads the directory's ``config.yaml``, where a key an older version did not
write takes its baseline (:data:`stitching.config.IDENTITY_BASELINE`: the value that run had). Exit codes
(:mod:`stitching.rundir`): done (or already finished), bad config/input (one line on stderr, nothing
computed or overwritten), non-finite loss, run directory held by another trainer, a file that cannot be
written, preempted by SIGTERM/SIGUSR1 after saving a checkpoint (run it again).
Several processes: ``torchrun --nproc_per_node=N -m stitching.train --config FILE``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stitching.config import ConfigError, load_config, run_cli
from stitching.rundir import CONFIG


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitching.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument("--run-dir", help="run directory holding config.yaml (written by stitching.sweep)")
    parser.add_argument("--force", action="store_true", help="redo a finished run (old files kept in previous/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.run_dir):
        parser.error("give exactly one of --config FILE or --run-dir DIR")
    if args.run_dir:
        config = Path(args.run_dir) / CONFIG
        if not config.is_file():
            raise ConfigError("--run-dir", args.run_dir, "command line", f"no {CONFIG} in it")
        # the path quoted: an override's value is YAML, where ' #' starts a comment
        cfg = load_config(config, [*args.overrides, f"output.dir={json.dumps(args.run_dir)}"], run_dir=True)
    else:
        cfg = load_config(args.config, args.overrides)
    from stitching.train.loop import run

    return run(cfg, force=args.force)


if __name__ == "__main__":
    run_cli(main)
