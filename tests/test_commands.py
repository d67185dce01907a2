"""The commands the README, the docs and the docstrings tell a user to type, run as a user runs them.

Each is run through its real command line (a subprocess) in a cheap form -- tiny overrides, ``--dry-run``,
``--help`` -- so that a command nobody else runs cannot break silently (``benchmarks/data.py`` once stayed
broken for a day after a config key was added). Where a command needs what this machine lacks (ImageNet,
pretrained weights, a SLURM controller) it must stop with one line naming the key or the tool, exit 2.

- every ``python -m stitching.<x>`` / ``python scripts/<x>.py`` / ``python benchmarks/<x>.py`` named in the
  docs exists, takes every ``--flag`` the docs give it, and is never shown without its required options;
- every shipped run config loads, every shipped matrix file expands, the README's annotated config validates;
- the quick start trains (1 epoch of 2 steps) into the directory it names and says where its results are;
- the paper's configs train on an ImageFolder of JPEGs (one step at 32 px), and without ImageNet stop with
  one line naming ``data.root``;
- pretrained weights that cannot be fetched (offline node, empty cache) are one line naming
  ``model.pretrained``, for the trainer and for ``summary --similarity``, timm and torchvision alike;
- ``train.device=cuda`` on a machine without CUDA is one line naming the key, exit 2;
- ``--launcher slurm`` without a SLURM client, or with its controller down, is one line, exit 2;
- a sweep whose block's base config is missing (the toy and MNIST templates, run directly) names the sweep
  file and the block, not ``--config``;
- ``scripts/toy_study.py --dry-run`` writes the sweep files and shows the table.
- the committed Table 1 of each study is what ``scripts/plot_results.py`` draws from its committed CSV.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stitching.rundir import EXIT_CONFIG
from tests.conftest import ROOT

DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")),
        "benchmarks/README.md", "scripts/slurm/README.md"]
TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
# "python -m stitching.train ...", "torchrun ... -m stitching.train", "python scripts/x.py ...": the program and
# the rest of the command (up to the end of the code span, table cell or comment)
COMMAND = re.compile(r"(?:python|torchrun[^`\n]*?)\s+(-m\s+stitching(?:\.[a-z_]+)+|scripts/[\w/]+\.py|"
                     r"benchmarks/\w+\.py)([^`\n|#]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def run(*args, env=None, timeout=120, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error a command printed last on stderr (no traceback before it)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


def documented_commands() -> dict[str, dict[str, list[str]]]:
    """program -> {file: the argument strings the file gives it, one per mention}, from the docs, every
    docstring of the code, the configs' comments and the notebook."""
    files = [ROOT / f for f in DOCS] + sorted((ROOT / "stitching").rglob("*.py")) \
        + sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")) \
        + sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "notebooks").glob("*.ipynb"))
    out: dict[str, dict[str, list[str]]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            for m in COMMAND.finditer(line):
                program = m.group(1).removeprefix("-m").strip()
                out.setdefault(program, {}).setdefault(str(path.relative_to(ROOT)), []).append(m.group(2).strip())
    return out


def _command_line(args: str) -> bool:
    """Whether a mention's arguments are a command line to type (they start with a file or a key=value), not a
    bare name in prose, a flag named in prose (``--paper-only``) or the program's name in code."""
    return bool(args) and args[0] not in "-\"')`" and not args.startswith("...") and "--help" not in args


def required_flags(usage: str) -> set[str]:
    """The options argparse's usage line shows outside brackets: those a command cannot run without."""
    usage = usage.split("\n\n")[0]
    while re.search(r"\[[^\[\]]*\]", usage):
        usage = re.sub(r"\[[^\[\]]*\]", "", usage)
    return set(FLAG.findall(usage))


COMMANDS = documented_commands()


def test_the_docs_name_the_commands():
    assert {"stitching.train", "stitching.sweep", "stitching.matrix", "stitching.collect", "stitching.summary",
            "scripts/plot_results.py", "scripts/toy_study.py", "scripts/make_mnist_imagefolder.py",
            "benchmarks/data.py", "benchmarks/train_step.py"} <= set(COMMANDS)
    assert any("--dry-run" in args for args in COMMANDS["stitching.sweep"]["README.md"])
    assert required_flags("usage: python -m stitching.sweep [-h] --launcher {local,slurm} [--runs-dir RUNS_DIR]\n"
                          "     [--paper-only | --extensions] [--slurm KEY=VALUE] sweep\n\nmore") == {"--launcher"}


# "python -m stitching.sweep SWEEP ... --dry-run ...  # ... 1,738 runs ...": a documented dry run and the runs it says
STUDY = re.compile(r"python -m stitching\.sweep (\S+\.yaml)([^#`\n]*--dry-run[^#`\n]*)#[^`\n]*?([\d,]+) runs")


@pytest.mark.slow   # the paper sweep's expansion and its cost: ~30 s
def test_the_documented_study_command_runs_the_runs_the_docs_say(tmp_path):
    """The README said "the study" (1,738 runs) of a command that ran 2,749 (extensions on): every documented
    ``--dry-run`` whose comment counts its runs prints that total, and every documented command on the same sweep
    file switches the same part on or off."""
    found = [(doc, m) for doc in DOCS for m in STUDY.finditer((ROOT / doc).read_text())]
    assert any(doc == "docs/running.md" and m.group(1) == "configs/sweeps/paper.yaml" for doc, m in found)
    for doc, m in found:
        proc = run("-m", "stitching.sweep", m.group(1), *m.group(2).split(), "--runs-dir", tmp_path / "runs",
                   timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"total runs: {int(m.group(3).replace(',', ''))} (" in proc.stdout, (doc, m.group(0))
        part = {"--paper-only", "--extensions"} & set(m.group(2).split())
        for args in COMMANDS["stitching.sweep"][doc]:
            if args.startswith(m.group(1)):
                assert part <= set(args.split()), f"{doc}: {args} (its dry run says {m.group(0)})"


@pytest.mark.parametrize("program", sorted(COMMANDS))
def test_documented_command_exists_and_takes_its_documented_flags(program):
    """Each program answers ``--help``; every ``--flag`` a doc gives it is one it knows, and every mention that
    gives arguments (not a bare name in prose) gives the options it cannot run without."""
    proc = run(*(["-m", program] if not program.endswith(".py") else [program]), "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # plain text (no reStructuredText), an example of its own and what each exit code means (stitching.cli)
    assert "``" not in proc.stdout and ":func:" not in proc.stdout and ":mod:" not in proc.stdout, proc.stdout
    examples = proc.stdout.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
    assert program in examples, proc.stdout
    exits = proc.stdout.split("\nexit codes:\n", 1)[1]
    assert exits.lstrip().startswith("0  "), proc.stdout
    usage = proc.stdout.split("\n\n")[0]     # argparse's usage paragraph lists every option (the description
    known, required = set(FLAG.findall(usage)), required_flags(usage)   # after it may quote the docstring)
    unknown = {f: sorted({flag for args in mentions for flag in FLAG.findall(args)} - known)
               for f, mentions in COMMANDS[program].items()}
    assert not {f: u for f, u in unknown.items() if u}, f"{program}: flags the docs give that --help does not know"
    missing = [f"{f}: {program} {args}" for f, mentions in COMMANDS[program].items() for args in mentions
               if _command_line(args) and required - set(FLAG.findall(args))]
    assert not missing, f"documented without the required {sorted(required)}:\n" + "\n".join(missing)
    own = _program_file(program)        # its own docstring names its options too (``--parallel N``, ...)
    doc = COMMAND.sub("", "\n".join(line for line in (ast.get_docstring(ast.parse(own.read_text())) or "")
                                     .splitlines() if "torchrun" not in line))   # less the commands it quotes
    assert sorted(set(FLAG.findall(doc)) - known) == [], f"{own.relative_to(ROOT)}'s docstring names options " \
                                                         f"{program} --help does not know"


def _program_file(program: str) -> Path:
    if program.endswith(".py"):
        return ROOT / program
    module = ROOT / Path(*program.split("."))
    return module / "__main__.py" if module.is_dir() else module.with_suffix(".py")


def _run_configs() -> list[Path]:
    """Shipped run configs: every YAML under configs/ but the sweeps and the matrix files (a matrix file has no
    config section at the top level)."""
    from stitching.config import SECTIONS

    out = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if "sweeps" not in path.parts and (set(data) & set(SECTIONS) or set(data) == {"base"}):
            out.append(path)
    return out


def test_every_shipped_run_config_loads():
    from stitching.validate import load_config

    configs = _run_configs()
    assert ROOT / "configs" / "quickstart.yaml" in configs and ROOT / "configs" / "matrix" / "resnet50_short.yaml" \
        in configs and len(configs) >= 20
    for path in configs:
        load_config(path)                                   # as shipped (pretrained where it says so)
        load_config(path, ["model.pretrained=false"])       # as the cheap checks here build it


def test_every_shipped_matrix_file_expands(tmp_path):
    from stitching.matrix.spec import load_matrix

    matrices = [p for p in sorted((ROOT / "configs" / "matrix").glob("*.yaml")) if p not in _run_configs()]
    assert {p.name for p in matrices} >= {"tiny.yaml", "resnet50_imagenet.yaml"}
    for path in matrices:
        assert load_matrix(path).name


def test_quickstart_trains_and_says_where_its_results_are(tmp_path):
    """As the README runs it: no output.dir, so the run names its directory under runs/quickstart/ (printed
    first) and says at the end where its results are."""
    proc = run("-m", "stitching.train", "--config", ROOT / "configs" / "quickstart.yaml", "train.epochs=1",
               "train.max_steps_per_epoch=2", "data.val_size=64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [out] = list((tmp_path / "runs" / "quickstart").iterdir())
    assert out.name.startswith("resnet50.1-resnet50.3.bottleneck.bilinear.lr0.002.seed0.")
    assert proc.stdout.startswith(f"run directory: {out} (named by the run's identity")
    assert f"results in {out / 'result.csv'}" in proc.stdout + proc.stderr
    assert (out / "result.csv").is_file() and (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ what this machine lacks
def _offline(tmp_path: Path) -> dict:
    """An environment where no pretrained weights can be had: empty caches, the hub offline, every proxy a
    closed port (so torchvision's download fails at once too, with or without network)."""
    dead = "http://127.0.0.1:9"
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"), "http_proxy": dead, "https_proxy": dead,
            "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "no_proxy": "", "NO_PROXY": ""}


@pytest.mark.parametrize("command,model", [
    (["-m", "stitching.train", "--config", TINY, "model.pretrained=true"], "resnet18"),          # timm, stitched
    (["-m", "stitching.train", "--config", TINY, "model.pretrained=true", "model.source=torchvision:resnet18",
      "model.source_stage=null", "model.destination_stage=null", "train.epochs=0"], "torchvision:resnet18"),
    (["-m", "stitching.summary", "--config", TINY, "--similarity", "8", "model.pretrained=true"], "resnet18"),
], ids=["train-timm", "train-torchvision", "summary-similarity"])
def test_pretrained_weights_that_cannot_be_fetched_are_one_line_naming_the_key(tmp_path, command, model):
    out = tmp_path / "run"
    proc = run(*command, *([f"output.dir={out}"] if "stitching.train" in command else []), env=_offline(tmp_path))
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    line = error_line(proc)
    assert "command line: model.pretrained=True: cannot load the pretrained weights of " + model in line
    assert "model.source_weights" in line           # what to do instead
    assert not out.exists()                         # nothing written


@pytest.mark.parametrize("program,spec", [("stitching.sweep", "configs/sweeps/smoke.yaml"),
                                          ("stitching.matrix", "configs/matrix/tiny.yaml")])
def test_slurm_launcher_without_slurm_is_one_line(tmp_path, program, spec):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run("-m", program, spec, "--launcher", "slurm", "--runs-dir", tmp_path / "runs", env={"PATH": str(empty)})
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    assert "--launcher='slurm': 'squeue' not found on PATH" in error_line(proc)


@pytest.mark.skipif(shutil.which("squeue") is None, reason="no SLURM client installed")
def test_slurm_launcher_with_its_controller_down_is_one_line(tmp_path):
    conf = tmp_path / "slurm.conf"      # a cluster whose controller listens nowhere (port 9: discard, closed)
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=localhost\nSlurmctldPort=9\n"
                    "NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=localhost Default=YES\n")
    proc = run("-m", "stitching.sweep", "configs/sweeps/smoke.yaml", "--launcher", "slurm", "--runs-dir",
               tmp_path / "runs", env={"SLURM_CONF": str(conf)})
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    line = error_line(proc)
    assert "--launcher='slurm': squeue" in line and "failed" in line


@pytest.mark.parametrize("template,block,base", [("toy", "resnet18_self", "toy_resnet18.yaml"),
                                                 ("mnist", "resnet18_self", "mnist_resnet18.yaml")])
def test_a_sweep_whose_base_is_missing_names_the_sweep_file_and_block(template, block, base):
    spec = f"configs/sweeps/{template}.yaml"
    proc = run("-m", "stitching.sweep", spec, "--launcher", "local", "--dry-run", timeout=60)
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    assert error_line(proc).startswith(f"error: {spec}: {block}.base='{base}': file not found")


def test_toy_study_dry_run_writes_the_sweep_files_and_trains_nothing(tmp_path):
    out = tmp_path / "toy"
    proc = run(ROOT / "scripts" / "toy_study.py", "--dry-run", "--out", out, "--figures", tmp_path / "figures")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total runs: 72 (0 finished" in proc.stdout and "dry run: nothing written or submitted" in proc.stdout
    assert (out / "toy.yaml").is_file() and (out / "toy_resnet18.yaml").is_file()
    assert not (out / "resnet18").exists() and not (out / "sweep").exists()


@pytest.mark.parametrize("figures,extra", [("docs/figures", []),
                                           ("docs/figures/mnist", ["--data-label", "MNIST"])])   # before data.label
def test_the_shipped_tables_are_what_plot_results_draws_from_the_shipped_csv(tmp_path, figures, extra):
    """README's figures come from ``scripts/plot_results.py RESULTS --out FIGURES --default-options`` (the
    studies' step 6): drawn again from the committed ``results.csv`` with the current code, Table 1, the
    captions (with the recipe) and the list of runs drawn and left out are the committed ones (a new recipe
    column redraws them)."""
    src = ROOT / figures
    proc = run(ROOT / "scripts" / "plot_results.py", src / "results.csv", "--out", tmp_path, "--default-options",
               *extra, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("table1.md", "table1.tex", "recipe.txt", "captions.md", "selection.md"):
        assert (tmp_path / name).read_text() == (src / name).read_text(), \
            f"{figures}/{name} is out of date: redraw with python scripts/plot_results.py {figures}/results.csv " \
            f"--out {figures} --default-options {' '.join(extra)}"


# ------------------------------------------------------------------------------ the paper's configs on images
@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder of JPEGs (2 classes, 4 train + 2 val images each) in ImageNet's layout."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.JPEG")
    return root


SMALL = ["model.pretrained=false", "data.num_classes=2", "data.img_size=32", "train.epochs=1",
         "train.max_steps_per_epoch=1", "train.batch_size=4", "train.per_device_batch_size=4"]


@pytest.mark.parametrize("config,extra", [
    ("resnet50_1to4_bottleneck", []),                        # README: the paper's recipe (imagenet.yaml)
    ("imagenet_code", ["model.source=resnet18", "model.source_stage=1", "model.destination_stage=3"]),
], ids=["imagenet", "imagenet_code"])
def test_the_papers_configs_train_on_an_imagefolder(tmp_path, jpeg_folder, config, extra):
    """``python -m stitching.train --config configs/paper/... data.root=...`` as the README gives it (AutoAugment,
    RandomResizedCrop, the model's own evaluation preprocessing), at 32 px for one step on JPEGs."""
    out = tmp_path / "run"
    proc = run("-m", "stitching.train", "--config", ROOT / "configs" / "paper" / f"{config}.yaml",
               f"data.root={jpeg_folder}", *SMALL, *extra, f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "result.csv").is_file()


def test_the_papers_config_without_imagenet_is_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run("-m", "stitching.train", "--config", ROOT / "configs" / "paper" / "resnet50_1to4_bottleneck.yaml",
               f"data.root={tmp_path / 'imagenet'}", f"output.dir={out}")
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    assert error_line(proc) == f"error: command line: data.root='{tmp_path / 'imagenet'}': missing folder " \
                               f"{tmp_path / 'imagenet' / 'train'}"
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_train_device_cuda_without_a_gpu_is_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run("-m", "stitching.train", "--config", TINY, "train.device=cuda", f"output.dir={out}")
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    assert error_line(proc).startswith("error: command line: train.device='cuda': no CUDA device is available")
    assert not out.exists()


def test_the_documented_config_contract_is_a_valid_config(tmp_path):
    """docs/config.md's annotated config (every key with its documented value) loads and validates."""
    from stitching.validate import load_config

    text = (ROOT / "docs" / "config.md").read_text()
    text = text[text.index("## The config contract"):]
    start = text.index("```yaml") + len("```yaml")
    block = text[start:text.index("```", start)]
    assert "base: ../paper/imagenet.yaml" in block
    path = tmp_path / "contract.yaml"
    path.write_text(block.replace("../paper/imagenet.yaml", str(ROOT / "configs" / "paper" / "imagenet.yaml")))
    cfg = load_config(path)
    assert (cfg.model.source, cfg.model.destination, cfg.model.destination_stage) == ("resnet50", "swin_t", 3)
