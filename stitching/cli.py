"""What every command's ``--help`` shows: a plain-text description, examples and the exit codes.

Every command of the project (the ``python -m stitching.*`` programs, ``scripts/`` and ``benchmarks/``) builds
its parser with :func:`parser`, so each help reads the same way: what the command does (its docstring's first
paragraph without reStructuredText markup), its options, a few example command lines and what each exit code
means. The codes themselves are spelled in :mod:`stitching.rundir`; :data:`TRAINER_EXITS` says what the
trainer's mean, and the launchers, which run trainers, say how a trainer's code becomes theirs. :func:`run_cli`
runs a command's ``main``: a config error becomes one line and exit code 2, a Ctrl-C one line.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import typing

from stitching import rundir as R
from stitching.config import ConfigError

#: ``x``, :func:`x`, :mod:`~x.y`, `x` -> x
_MARKUP = re.compile(r"``([^`]*)``|:[a-z]+:`~?([^`]*)`|`([^`]*)`")
WIDTH = 100

#: what the trainer's exit codes mean (``python -m stitching.train``, and each run a launcher starts)
TRAINER_EXITS = {
    R.EXIT_OK: "done, or the run had finished already (nothing redone without --force)",
    R.EXIT_FAILED: "an unexpected error (a traceback above it)",
    R.EXIT_CONFIG: "bad config or input: one line names the key, the value and the file; nothing computed or "
                   "overwritten",
    R.EXIT_NONFINITE: "the loss became NaN/Inf: no result, the last good checkpoint kept",
    R.EXIT_BUSY: "another trainer holds the run directory (named by host and pid)",
    R.EXIT_IO: "a file could not be written (disk full, permissions); the files already there are intact",
    R.EXIT_PREEMPTED: "preempted (SIGTERM / SIGUSR1): a checkpoint was saved; the same command resumes",
    R.EXIT_INTERRUPTED: "interrupted (Ctrl-C): a checkpoint saved at the next step (a second Ctrl-C, or one "
                        "while starting: the last complete one kept, if any); the same command resumes",
}

#: what a launcher's exit codes mean (``stitching.sweep``, ``stitching.matrix``): its runs' codes summed up
LAUNCHER_EXITS = {
    R.EXIT_OK: "every run finished (or was submitted to SLURM; or a dry run); --status: every run has finished",
    R.EXIT_FAILED: "local: a run failed (each is listed with its directory and exit code); --status: a run has "
                   "failed (listed with its directory and last error line)",
    R.EXIT_CONFIG: "bad sweep / matrix file, run config or option, or SLURM refused a job array: one line says "
                   "which; nothing was submitted for it",
    R.EXIT_PREEMPTED: "local: runs are left to resume or start (preempted, stopped by SIGTERM); the same "
                      "command resumes them; --status: none failed, some are still to finish (running, preempted, "
                      "interrupted, killed or not started)",
    R.EXIT_INTERRUPTED: "local: stopped by Ctrl-C (each run's ending is listed); the same command resumes",
}

#: a command that reads its input, writes its output and stops: argparse's own code for bad options too
SIMPLE_EXITS = {R.EXIT_OK: "done", R.EXIT_CONFIG: "bad options or input (one line says which)"}


def plain(text: str) -> str:
    """``text`` without reStructuredText markup, for a terminal."""
    return _MARKUP.sub(lambda m: next(g for g in m.groups() if g is not None), text)


def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph, plain and wrapped to :data:`WIDTH` columns."""
    para = (doc or "").strip().split("\n\n", 1)[0]
    return textwrap.fill(" ".join(plain(para).split()), WIDTH)


def parser(prog: str | None, doc: str | None, examples: list[str], exits: dict[int, str],
           **kwargs) -> argparse.ArgumentParser:
    """An ``argparse`` parser whose help is ``doc``'s first paragraph, the options, ``examples`` (command
    lines, each optionally followed by ``  # why``) and ``exits`` (code -> meaning)."""
    lines = ["examples:", *(f"  {e}" for e in examples), "", "exit codes:"]
    for code, meaning in sorted(exits.items()):
        lines += textwrap.wrap(meaning, WIDTH, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7)
    return argparse.ArgumentParser(prog=prog, description=first_paragraph(doc), epilog="\n".join(lines),
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def run_cli(main: typing.Callable[[], int | None]) -> typing.NoReturn:
    """Run a command's ``main``; a :class:`ConfigError` becomes one line on stderr and exit code 2, a Ctrl-C
    that ``main`` does not handle itself one line and ``R.EXIT_INTERRUPTED`` (no traceback)."""
    try:
        code = main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(R.EXIT_CONFIG)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(R.EXIT_INTERRUPTED)
    sys.exit(code or 0)
