"""The trainer's entry points: :func:`resolve` (the checked config of a run, from a YAML file, a mapping or a run
directory, with overrides) and :func:`train` (``stitching.train(...)`` from Python: a config trained into its run
directory, :class:`RunFailed` when it ends without a result). ``python -m stitching.train`` resolves its command
line here too. The package :mod:`stitching.train` re-exports these names and is callable as :func:`train`.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

from stitching import rundir as R
from stitching.config import CLI, SECTIONS, Config, ConfigError, read_config

#: where the keys given to :func:`train` come from, in error messages
API = "stitching.train()"


class RunFailed(RuntimeError):
    """A run that ended without its result (:func:`train`): :attr:`exit_code` is the code ``python -m
    stitching.train`` would have exited with (:mod:`stitching.rundir`), :attr:`status` the run's status
    (``preempted`` or ``interrupted``: call again to resume; ``failed``), :attr:`run_dir` its directory."""

    def __init__(self, run_dir: Path, exit_code: int):
        self.run_dir, self.exit_code, self.status = Path(run_dir), exit_code, R.status_of_exit(exit_code)
        said = R.RunDir(run_dir).read_state().get("message") or R.describe_exit(exit_code)
        super().__init__(f"{run_dir}: {said} (exit code {exit_code}, status {self.status})")


def resolve(config: str | os.PathLike | typing.Mapping | None = None, run_dir: str | os.PathLike | None = None,
            overrides: typing.Sequence[str] = (), updates: typing.Mapping | None = None,
            source: str = CLI) -> Config:
    """The checked config of a run: ``config`` (a YAML file, or its sections as a mapping) or the ``config.yaml``
    of ``run_dir`` (keys an older version did not write take their baseline), then ``updates`` (dotted key ->
    value, attributed to ``source``) and ``overrides`` (``section.key=value`` strings). With ``run_dir`` the run
    trains in that directory (``output.dir``: naming another one as well is an error)."""
    if (config is None) == (run_dir is None):
        raise ConfigError("--config" if source == CLI else "config", config, source,
                          "give exactly one of a config or a run directory (--config FILE or --run-dir DIR)")
    if run_dir is None:
        return _checked(read_config(config, overrides, updates=updates, updates_source=source))
    file = Path(run_dir) / R.CONFIG
    if not file.is_file():
        raise ConfigError("--run-dir" if source == CLI else "run_dir", str(run_dir), source, f"no {R.CONFIG} in it")
    given = {**{k: v for k, _, v in (o.partition("=") for o in overrides)}, **(updates or {})}
    if "output.dir" in given:
        raise ConfigError("output.dir", given["output.dir"], source, f"the run trains in its run directory "
                          f"{run_dir}: leave output.dir out")
    return _checked(read_config(file, overrides, updates={**(updates or {}), "output.dir": str(run_dir)},
                                updates_source=source, run_dir=True))


def _checked(cfg: Config) -> Config:
    """``cfg`` validated (:func:`stitching.validate.validate`). Imported here, once the file has been read: the
    check imports torch and every subsystem (seconds), and a file that cannot be read (a YAML alias bomb, an
    unknown key) is one line at once without them."""
    from stitching.validate import validate

    validate(cfg)
    return cfg


def train(config: str | os.PathLike | typing.Mapping | None = None, *, run_dir: str | os.PathLike | None = None,
          force: bool = False, **overrides) -> Path:
    """Train (or, with ``train.epochs: 0``, evaluate) a config, as ``python -m stitching.train`` does, and return
    its run directory (``result.csv``, ``model.safetensors``, ...: :func:`stitching.load_run` reads them back).

    ``config``: a YAML file or its sections as a mapping (``{"base": "configs/toy/stitch.yaml", "train": {...}}``;
    ``base`` relative to the working directory); or ``run_dir=``, a run directory holding ``config.yaml``
    (``--run-dir``). ``overrides``: dotted keys (``**{"train.lr": 0.01}``) or whole sections
    (``train={"lr": 0.01, "epochs": 1}``), applied as the command line's ``section.key=value`` are. ``force``
    redoes a finished run (``--force``). A finished run of the same config is not redone.

    Raises :class:`~stitching.config.ConfigError` (a ``ValueError``: key, value and where it came from; nothing
    computed or written) for a bad config, and :class:`RunFailed` when the run ends without a result
    (preempted, interrupted by Ctrl-C -- the notebook's interrupt too --, non-finite loss, directory held by
    another trainer, a file that cannot be written). Ctrl-C and SIGTERM are handled during training (when called
    from the main thread) and the process's own handlers put back afterwards.

    >>> import stitching
    >>> run = stitching.train("configs/synthetic/tiny.yaml", train={"epochs": 1, "max_steps_per_epoch": 2},
    ...                       output={"dir": "runs/doctest_tiny"}, force=True)     # doctest: +SKIP
    """
    cfg = resolve(config, run_dir, updates=_dotted(overrides), source=API)
    from stitching.train.loop import run as run_config      # torch and the trainer: loaded once the config holds

    code = run_config(cfg, force=force)
    if code != R.EXIT_OK:
        raise RunFailed(Path(cfg.output.dir), code)
    return Path(cfg.output.dir)


def _dotted(overrides: typing.Mapping) -> dict:
    """``train()``'s keyword overrides as dotted keys: ``section={key: value}`` or ``**{"section.key": value}``."""
    out = {}
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, typing.Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif "." in key:
            out[key] = value
        else:
            raise ConfigError(key, value, API, "give a dotted key (**{'train.lr': 0.01}) or a section's keys "
                              f"(train={{'lr': 0.01}}; sections: {', '.join(SECTIONS)})")
    return out
