#!/usr/bin/env python
"""What the paper code's departures cost on the MNIST study: accuracy deltas with standard errors over seeds.

    python scripts/mnist_quirks.py [--out runs/mnist] [--parallel 2] [--threads N] [--dry-run]

Uses the trained models of the MNIST study (``scripts/toy_study.py``, its mnist data: ``OUT/resnet18``,
``OUT/vit_tiny``; trained here first, as the study trains them, where missing) and its ImageFolder
(``OUT/data``), then, each step a real command-line tool:

1. writes the study's base configs into ``OUT`` (as ``toy_study.py`` does) and copies the sweep
   ``configs/sweeps/mnist_quirks.yaml`` next to them;
2. runs it: ``python -m stitching.sweep OUT/mnist_quirks.yaml --launcher local --runs-dir OUT/quirks``;
3. collects it: ``python -m stitching.collect OUT/quirks -o OUT/quirks/results.csv``;
4. prints, and writes to ``OUT/quirks/deltas.md``, one table per comparison (:data:`COMPARISONS`): the code's
   network (``model.code_quirks``) against the corrected one, frozen BatchNorm in train mode against eval
   mode, PyTorch's adapter initialisation against the code's. Each line is one stitch (pair, gap, adapter,
   resize, epochs) with both accuracies and their delta, mean over the seeds with the standard error of the
   paired per-seed differences; the last line of each table pools every stitch's per-seed differences.

``--dry-run`` writes the files and shows the sweep's runs; it trains nothing.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stitching import cli, rundir  # noqa: E402
from stitching.kinds import STITCHED  # noqa: E402

SWEEP = ROOT / "configs" / "sweeps" / "mnist_quirks.yaml"
RUNS = "quirks"                 # the runs folder under OUT
DELTAS = "deltas.md"
#: comparison -> (result column, the value compared against, the other value, the columns that must be at their
#: reference value for a row to count: every other comparison's column)
COMPARISONS = {
    "the paper code's network (model.code_quirks) vs the corrected one": ("adapter_style", "code", "code+quirks"),
    "frozen BatchNorm in train mode (train.frozen_bn) vs eval mode": ("frozen_bn", "eval", "train"),
    "PyTorch's adapter initialisation (model.init: pytorch) vs the code's (default)": ("init", "default", "pytorch"),
}
SCENARIO = ["source", "destination", "gap", "adapter", "resize", "epochs"]


def _toy_study():
    spec = importlib.util.spec_from_file_location("toy_study", ROOT / "scripts" / "toy_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired_deltas(df, column: str, reference: str, other: str):
    """One row per scenario in which ``column`` takes both values (the other comparisons' columns at their
    reference values), then a pooled row: ``n`` seeds paired, the two mean top-1s and the mean delta
    (other - reference) with the standard error of the per-seed differences."""
    import pandas as pd

    rows = df[df["kind"] == STITCHED].copy()
    for col, ref, _ in COMPARISONS.values():
        rows[col] = rows[col].astype(str)
        if col != column:
            rows = rows[rows[col] == ref]
    rows = rows[rows[column].isin([reference, other])]
    wide = rows.pivot_table(index=SCENARIO + ["seed"], columns=column, values="top1", aggfunc="mean")
    if reference not in wide or other not in wide:
        return pd.DataFrame()
    wide = wide[[reference, other]].dropna()
    wide["delta"] = wide[other] - wide[reference]

    def summary(group) -> dict:
        n = len(group)
        se = group["delta"].std(ddof=1) / n ** 0.5 if n > 1 else float("nan")
        return {"n": n, reference: group[reference].mean(), other: group[other].mean(),
                "delta": group["delta"].mean(), "se": se}

    out = [{**dict(zip(SCENARIO, key)), **summary(g)} for key, g in wide.groupby(SCENARIO, sort=True)]
    if out:
        out.append({**{k: "" for k in SCENARIO}, "source": "all stitches, every seed", **summary(wide)})
    return pd.DataFrame(out)


def deltas_markdown(df) -> str:
    from stitching.plots.labels import arch_name

    parts = []
    for title, (column, reference, other) in COMPARISONS.items():
        table = paired_deltas(df, column, reference, other)
        if table.empty:
            continue
        lines = [f"**{title}** (top-1 %, mean over seeds; delta ± s.e. of the paired differences)", "",
                 f"| stitch | gap | method | epochs | seeds | {reference} | {other} | delta |",
                 "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in table.to_dict("records"):
            pair = r["source"] if not r["destination"] else \
                f"{arch_name(r['source'])} -> {arch_name(r['destination'])}"
            se = "" if r["se"] != r["se"] else f" ± {r['se']:.1f}"
            method = f"{r['adapter']}/{r['resize']}" if r["adapter"] else ""
            lines.append(f"| {pair} | {r['gap']} | {method} | {r['epochs']} | {r['n']} | {r[reference]:.1f} | "
                         f"{r[other]:.1f} | {r['delta']:+.1f}{se} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts) or "(no comparison has both values in these results)\n"


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python scripts/mnist_quirks.py", __doc__, [
        "python scripts/mnist_quirks.py                # tables in runs/mnist/quirks/deltas.md",
        "python scripts/mnist_quirks.py --dry-run      # write the sweep files, list its runs, train nothing"],
        {rundir.EXIT_OK: "every run finished and the tables were written (run it again: finished runs are skipped)",
         rundir.EXIT_FAILED: "a step failed (the last line names it and its command), or a run of the sweep failed "
                             "(listed; the tables of the runs that finished are written)",
         rundir.EXIT_CONFIG: "bad options, or the sweep refused its file (one line says which)",
         rundir.EXIT_PREEMPTED: "runs are left to resume (preempted, stopped by SIGTERM): the same command resumes",
         rundir.EXIT_INTERRUPTED: "interrupted (Ctrl-C): the running step stopped itself (runs checkpointed); the "
                                  "same command resumes"})
    parser.add_argument("--out", type=Path, default=Path("runs/mnist"),
                        help="the MNIST study's folder (default: runs/mnist)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS; default: CPU cores / --parallel)")
    parser.add_argument("--dry-run", action="store_true", help="write the files, show the runs, train nothing")
    args = parser.parse_args(argv)
    toy = _toy_study()
    out = args.out.absolute()
    data_root = out / "data"
    parallel = max(1, args.parallel)
    env, solo = toy.thread_envs(args.threads, parallel)
    py = sys.executable

    toy.write_sweep(out, study="mnist", data_root=data_root)
    sweep = out / SWEEP.name
    shutil.copyfile(SWEEP, sweep)
    runs = out / RUNS
    if args.dry_run:
        return toy._run([py, "-m", "stitching.sweep", sweep, "--launcher", "local", "--runs-dir", runs,
                         "--dry-run"], "sweep (dry run)", env, check=False)
    if not (data_root / "train").is_dir():
        toy._run([py, toy.MNIST_SCRIPT, data_root], "write the MNIST ImageFolder", env)
    toy._train_originals(out, solo, "mnist", data_root)       # finished trainings are skipped
    code = toy._run([py, "-m", "stitching.sweep", sweep, "--launcher", "local", "--runs-dir", runs, "--parallel",
                     parallel], "sweep", env, check=False)
    if code == rundir.EXIT_CONFIG:      # the sweep refused its file (its one line above): nothing ran
        return code
    results = runs / "results.csv"
    toy._run([py, "-m", "stitching.collect", runs, "-o", results], "collect", env)
    import pandas as pd

    text = deltas_markdown(pd.read_csv(results, dtype={"gap": str}))
    (runs / DELTAS).write_text(text)
    print(f"\n{text}\nwritten to {runs / DELTAS}")
    return code


if __name__ == "__main__":
    sys.exit(main())
