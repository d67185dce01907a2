"""Where a sweep stands, read from its run directories: nothing is written or submitted.

Owns the ``--status`` view of ``python -m stitching.sweep`` and ``python -m stitching.matrix``: per group of
runs (a sweep's parts by architecture pair, a matrix's matrices) how many are done, running, preempted,
interrupted (Ctrl-C), killed (gone without saying how), failed or not started
(:func:`stitching.rundir_lock.live_status`), then every failed run's directory and
the last line of its error (:func:`stitching.rundir.error_line`: ``state.json``, else the trainer's output in
``launcher.log`` or the run's SLURM task log), and the exit code (:func:`exit_code`): ``0`` when every run has
finished, ``1`` when any failed, ``75`` when none failed but some have not finished (running, preempted,
interrupted, killed or not started) -- the codes of the local launcher, so a script can wait with
``until python -m stitching.sweep FILE --status; do sleep 600; done`` (stopping at ``1``).
"""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

from stitching import rundir as R
from stitching.rundir_lock import live_status
from stitching.launch.slurm.queue import MARKER_FILE, sweep_dir, task_log

#: the columns, in order: a live status and its heading
COLUMNS = ((R.FINISHED, "done"), (R.RUNNING, "running"), (R.PREEMPTED, "preempted"),
           (R.INTERRUPTED, "interrupted"), (R.KILLED, "killed"), (R.FAILED, "failed"), (R.NEW, "not started"))


def states(runs) -> dict[str, str]:
    """Run directory -> its live status, for every run (``stitching.sweep.spec.Run``)."""
    return {r.config.output.dir: live_status(r.config.output.dir) for r in runs}


def table(runs, state: dict[str, str], groupings: list[tuple[str, callable]]) -> str:
    """The counts per status: for each (title, key[, sort key]) of ``groupings`` a block of rows, one per key value
    (sorted, by the sort key where given; a run whose key is None is not in that block), then the total of every
    run."""
    blocks = []
    for title, key, *order in groupings:
        rows: dict[str, Counter] = {}
        for r in runs:
            if key(r) is not None:
                rows.setdefault(key(r), Counter())[state[r.config.output.dir]] += 1
        blocks.append((title, {k: rows[k] for k in sorted(rows, key=order[0] if order else None)}))
    indent = "  " if len(blocks) > 1 else ""
    width = max([len(indent + k) for _, rows in blocks for k in rows] + [len(t) for t, _ in blocks] + [5]) + 2
    heads = [h for _, h in COLUMNS] + ["total"]
    lines = [" " * width + "".join(f"{h:>{max(len(h), 4) + 2}}" for h in heads)]

    def row(label: str, counts: Counter) -> str:
        cells = [counts[s] for s, _ in COLUMNS] + [sum(counts.values())]
        return f"{label:<{width}}" + "".join(f"{c or '-':>{max(len(h), 4) + 2}}" for c, h in zip(cells, heads))

    for title, rows in blocks:
        if indent:
            lines.append(title)
        lines += [row(indent + label, counts) for label, counts in rows.items()]
    lines.append(row("total", Counter(state[r.config.output.dir] for r in runs)))
    return "\n".join(lines)


def failure(run_dir: str, runs_dir: Path) -> str:
    """The last line of a failed run's error (its SLURM task log too, found through its ``slurm_job`` marker)."""
    logs = []
    try:
        task = (Path(run_dir) / MARKER_FILE).read_text().strip()
        if task:
            logs.append(task_log(sweep_dir(Path(runs_dir).absolute()), task))
    except OSError:
        pass
    return R.error_line(run_dir, tuple(logs))


def exit_code(state: dict[str, str]) -> int:
    """``EXIT_OK`` when every run has finished, ``EXIT_FAILED`` when any failed, else ``EXIT_PREEMPTED``."""
    values = set(state.values())
    if R.FAILED in values:
        return R.EXIT_FAILED
    return R.EXIT_OK if values <= {R.FINISHED} else R.EXIT_PREEMPTED


def report(runs, runs_dir: Path, groupings: list[tuple[str, callable]]) -> int:
    """Print the status table and the failed runs' errors; the exit code (:func:`exit_code`)."""
    state = states(runs)
    print(table(runs, state, groupings))
    failed = [r for r in runs if state[r.config.output.dir] == R.FAILED]
    if failed:
        print(f"\nfailed ({len(failed)}): the run directory, then the last line of its error")
        for r in failed:
            print(f"  {r.config.output.dir}\n    {failure(r.config.output.dir, runs_dir)}")
    code = exit_code(state)
    left = sum(s != R.FINISHED for s in state.values())
    print("\n" + textwrap.fill(f"{len(runs) - left} of {len(runs)} runs done"
          + ("" if not left else f"; {left} not finished: the same command with --launcher instead of --status "
             "resumes the unfinished runs and retries the failed ones") + f" (exit {code})", 120,
                               subsequent_indent="  "))
    return code
