#!/usr/bin/env python
"""The toy study: the whole pipeline on real learned weights, on a laptop CPU.

    python scripts/toy_study.py [--out runs/toy] [--figures docs/figures] [--parallel 2] [--threads N]

1. trains two small models fully on the synthetic data (64 px, 10 classes): ResNet-18
   (``configs/toy/resnet18.yaml``) and ViT-Ti/16 (``configs/toy/vit_tiny.yaml``), into ``OUT/resnet18`` and
   ``OUT/vit_tiny`` with ``python -m stitching.train``;
2. writes the stitching sweep into ``OUT``: ``OUT/toy.yaml`` (a copy of the template
   ``configs/sweeps/toy.yaml``) and the four base configs it names (``OUT/toy_*.yaml``: each builds on
   ``configs/toy/stitch.yaml`` and adds the absolute paths of the trained ``model.safetensors`` as
   ``model.source_weights`` / ``model.destination_weights``);
3. runs it: ``python -m stitching.sweep OUT/toy.yaml --launcher local --runs-dir OUT/sweep``;
4. collects it: ``python -m stitching.collect OUT/sweep -o OUT/results.csv`` (the sweep folder only: the
   originals' reference rows are the sweep's evaluate-only runs, so the training runs would count twice);
5. draws it: ``python scripts/plot_results.py OUT/results.csv --out FIGURES --default-options`` (the figures
   show the runs whose training options are at their defaults) and copies the CSV there;
6. writes ``FIGURES/options.md``: each training option the sweep's extension blocks vary (least-squares
   init, objectives, frozen BatchNorm in train mode, position-embedding re-injection) against its default,
   scenario by scenario (:mod:`stitching.plots.options`);
7. prints the originals' accuracy, the best stitch per gap and the options table.

Every step is a subprocess running the real command-line tools, as a user would. Running the script again
skips what has finished (the trainer and the sweep skip finished runs and resume interrupted ones).
``--parallel N`` runs N processes at a time (the two trainings together, then the sweep's runs), each
with ``OMP_NUM_THREADS`` = CPU cores / N (``--threads`` to choose): on a 2-core CPU shared with other work,
two single-threaded runs are several times faster than one run whose two OpenMP threads fight for the cores.
``--dry-run`` writes the sweep files and shows the sweep's table of runs, and trains nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stitching import rundir  # noqa: E402

TOY_CONFIGS = ROOT / "configs" / "toy"
STITCH_CONFIG = TOY_CONFIGS / "stitch.yaml"
SWEEP_TEMPLATE = ROOT / "configs" / "sweeps" / "toy.yaml"
SWEEP_NAME = "toy.yaml"
OPTIONS_TABLE = "options.md"          # the extension blocks' options against their defaults, in FIGURES

#: registry name -> (run folder under OUT and short name in the written files, training config)
MODELS = {
    "resnet18": ("resnet18", TOY_CONFIGS / "resnet18.yaml"),
    "vit_tiny_patch16_224": ("vit_tiny", TOY_CONFIGS / "vit_tiny.yaml"),
}

if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def weights_path(out: Path, model: str) -> Path:
    """Where the trained ``model`` leaves its weights (native timm keys, loadable as a weights file)."""
    return out / MODELS[model][0] / rundir.MODEL


def base_configs(weights: dict[str, Path]) -> dict[str, dict]:
    """The base configs the sweep template names: file name -> config (as a YAML-able mapping)."""
    r, v = "resnet18", "vit_tiny_patch16_224"

    def config(source: str, destination: str | None = None) -> dict:
        model = {"source": source, "source_weights": str(Path(weights[source]).resolve())}
        if destination is not None:
            model["destination"] = destination
            model["destination_weights"] = str(Path(weights[destination]).resolve())
        return {"base": str(STITCH_CONFIG), "model": model}

    short = {m: MODELS[m][0] for m in MODELS}
    return {
        f"toy_{short[r]}.yaml": config(r),
        f"toy_{short[v]}.yaml": config(v),
        f"toy_{short[r]}_to_{short[v]}.yaml": config(r, v),
        f"toy_{short[v]}_to_{short[r]}.yaml": config(v, r),
    }


def write_sweep(out: str | Path, weights: dict[str, str | Path] | None = None) -> Path:
    """Write the sweep file and its base configs into ``out``; return the sweep file's path.

    ``weights`` maps the registry names of the two models to their weights files (default: where step 1
    puts them under ``out``). Files are rewritten only when their text changes.
    """
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {m: Path(weights[m]) if weights else weights_path(out, m) for m in MODELS}
    header = "# Written by scripts/toy_study.py: the trained models' weights for the sweep in toy.yaml.\n"
    for name, cfg in base_configs(weights).items():
        _write_if_changed(out / name, header + yaml.safe_dump(cfg, sort_keys=False))
    sweep = out / SWEEP_NAME
    text = (f"# Written by scripts/toy_study.py from {SWEEP_TEMPLATE.relative_to(ROOT)}; edit that file.\n"
            + SWEEP_TEMPLATE.read_text())
    _write_if_changed(sweep, text)
    return sweep


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


# ---------------------------------------------------------------------------------------------- steps
def _show(cmd: list) -> str:
    return " ".join(str(c) for c in cmd).replace(sys.executable, "python")


def _run(cmd: list, step: str, env: dict, check: bool = True) -> int:
    print(f"\n=== {step}: {_show(cmd)}", flush=True)
    start = time.time()
    code = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode
    print(f"=== {step}: exit {code} after {_fmt(time.time() - start)}", flush=True)
    if check and code != 0:
        raise SystemExit(f"error: {step} failed (exit {code}): {_show(cmd)}")
    return code


def _train_originals(out: Path, parallel: int, env: dict) -> None:
    """Step 1: both trainings, one after the other, or at the same time (output to OUT/train_<m>.log)."""
    jobs = [(model, [sys.executable, "-m", "stitching.train", "--config", config, f"output.dir={out / folder}"],
             out / f"train_{folder}.log") for model, (folder, config) in MODELS.items()]
    if parallel < 2:
        for model, cmd, _ in jobs:
            _run(cmd, f"train {model}", env)
        return
    start, running = time.time(), []
    for model, cmd, log in jobs:
        print(f"\n=== train {model}: {_show(cmd)} (output in {log})", flush=True)
        handle = open(log, "a")
        running.append((model, cmd, log, handle, subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env,
                                                                   stdout=handle, stderr=subprocess.STDOUT)))
    failed = []
    for model, cmd, log, handle, proc in running:
        code = proc.wait()
        handle.close()
        print(f"=== train {model}: exit {code} after {_fmt(time.time() - start)}", flush=True)
        if code != 0:
            failed.append(f"train {model} failed (exit {code}), see {log}: {_show(cmd)}")
    if failed:
        raise SystemExit("error: " + "; ".join(failed))


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def summary(out: Path, results: Path) -> str:
    """The originals' accuracy (trained and re-evaluated) and the best stitch per gap, as text."""
    import pandas as pd

    from stitching.plots import aggregate, arch_name, prepare

    lines = ["originals (trained here, top-1 % on the synthetic val split, 10 classes, chance 10%):"]
    for model, (folder, _) in MODELS.items():
        result = out / folder / rundir.RESULT
        if result.is_file():
            row = pd.read_csv(result).iloc[0]
            lines.append(f"  {arch_name(model):<22} top1 {row['top1']:5.1f}  top5 {row['top5']:5.1f}  "
                         f"{int(row['epochs'])} epochs in {_fmt(float(row['wall_time_s']))}  "
                         f"{row['macs'] / 1e9:.3f} GMACs")
    if not results.is_file():
        return "\n".join(lines + ["(no results.csv)"])
    df = pd.read_csv(results, dtype={"gap": str})
    if df.empty:
        return "\n".join(lines + ["(no finished sweep runs)"])
    from stitching.plots.options import at_defaults

    agg = aggregate(prepare(at_defaults(df)))
    agg = agg[agg["kind"].isin(["stitched", "finetune"])]
    if agg.empty:
        return "\n".join(lines)
    agg = agg.sort_values("top1_mean", ascending=False, kind="stable")
    best = agg.drop_duplicates(["source", "destination", "source_stage", "destination_stage"])
    best = best.sort_values(["source", "destination", "source_stage", "destination_stage"], kind="stable")
    lines.append("best stitch per gap (mean ± s.e. over seeds; * = fine-tuning baseline):")
    for _, r in best.iterrows():
        pair = f"{arch_name(r['source'])} -> {arch_name(r['destination'])}"
        gap = f"{int(r['source_stage'])}->{int(r['destination_stage'])}"
        err = f" ± {r['top1_se']:.1f}" if r["n"] > 1 else ""
        star = "*" if r["kind"] == "finetune" else ""
        lines.append(f"  {pair:<32} {gap}  top1 {r['top1_mean']:5.1f}{err:<6} n={int(r['n'])}  "
                     f"{r['macs_mean'] / 1e9:.3f} GMACs  {r['method']}{star}")
    return "\n".join(lines)


def write_options(out: Path, results: Path, path: Path) -> str:
    """The extension blocks' options against their defaults (:mod:`stitching.plots.options`) as Markdown in
    ``path``; returns the text ('' without results)."""
    import pandas as pd

    from stitching.plots.options import compare_options, options_markdown

    if not results.is_file():
        return ""
    df = pd.read_csv(results, dtype={"gap": str})
    text = options_markdown(compare_options(df, out / "sweep"))
    _write_if_changed(path, text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/toy_study.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", type=Path, default=Path("runs/toy"), help="runs folder (default: runs/toy)")
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"),
                        help="where the figures, Table 1 and results.csv go (default: docs/figures)")
    parser.add_argument("--parallel", type=int, default=2,
                        help="runs at a time: the two trainings, then the sweep's runs (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS; default: CPU cores / --parallel, at least "
                             "1, unless OMP_NUM_THREADS is set)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the sweep files and print the sweep's runs; train nothing")
    args = parser.parse_args(argv)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    figures = args.figures if args.figures.is_absolute() else Path.cwd() / args.figures
    parallel = max(1, args.parallel)
    env = dict(os.environ)
    if args.threads is not None or "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // parallel))
    py = sys.executable
    start = time.time()

    sweep = write_sweep(out)
    print(f"sweep file: {sweep}")
    if args.dry_run:
        return _run([py, "-m", "stitching.sweep", sweep, "--launcher", "local", "--runs-dir", out / "sweep",
                     "--dry-run"], "sweep (dry run)", env, check=False)

    print(f"{parallel} run(s) at a time, OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each")
    _train_originals(out, parallel, env)
    sweep_code = _run([py, "-m", "stitching.sweep", sweep, "--launcher", "local", "--runs-dir", out / "sweep",
                       "--parallel", parallel], "sweep", env, check=False)
    results = out / "results.csv"
    _run([py, "-m", "stitching.collect", out / "sweep", "-o", results], "collect", env)
    _run([py, ROOT / "scripts" / "plot_results.py", results, "--out", figures, "--default-options"], "plot", env)
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results, figures / "results.csv")
    print(f"copied {results} to {figures / 'results.csv'}")
    options = write_options(out, results, figures / OPTIONS_TABLE)

    print()
    print(summary(out, results))
    if options:
        print(f"\ntraining options against their defaults ({figures / OPTIONS_TABLE}):\n\n{options}")
    print(f"\ntoy study wall time: {_fmt(time.time() - start)} (this invocation; finished runs are skipped)")
    if sweep_code != 0:
        print(f"warning: the sweep exited with {sweep_code}; see the launcher.log of the failed runs in "
              f"{out / 'sweep'}", file=sys.stderr)
    return sweep_code


if __name__ == "__main__":
    sys.exit(main())
