"""Paths, run identity and command-line values, tried through the real command lines on a tiny model
(``configs/synthetic/tiny.yaml``):

- a run directory is known by its resolved path before anything is decided (``..`` through a folder that does
  not exist yet, symlinks), and the same-run check is repeated once the trainer holds the directory's lock, so
  a finished run of another config is never overwritten (the two reproductions of issue 20);
- command-line values are typed by the key they set, never parsed as a YAML document: a path is the string as
  typed (``#``, ``: ``, spaces, unicode), ``2e-3`` is a number (a property-based test round-trips arbitrary
  printable strings and numbers through the parser), ``--run-dir`` / ``--runs-dir`` / ``-o`` are plain paths;
- the tail of one-line errors: ``output.dir`` a file or a symlink loop, an unwritable parent (exit 74), a NaN
  number, a non-UTF-8 config, a non-string section key, ``collect -o`` a directory or a run's own
  ``result.csv``;
- a single run without ``output.dir`` names its own directory, as a sweep names its runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stitching import rundir as R
from stitching.config import IDENTITY, ConfigError
from stitching.yamlio import parse_value
from stitching.validate import load_config
from tests.conftest import ROOT, together

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
# 4 optimizer steps (256 images, batch 64), 64 validation images, CPU, no loader workers
COMMON = ["train.device=cpu", "data.train_size=256", "data.val_size=64", "data.workers=0"]
KEPT = (R.CONFIG, R.RESULT, R.MODEL, R.METRICS, R.CHECKPOINT)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args, cwd=ROOT, prefix=(), timeout=600) -> subprocess.CompletedProcess:
    """``python <args>`` as a user runs it (a subprocess; ``prefix``: a command that wraps it)."""
    return subprocess.run([*prefix, sys.executable, *map(str, args)], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def train(*args, **kw) -> subprocess.CompletedProcess:
    return cli("-m", "stitching.train", "--config", TINY, *COMMON, *args, **kw)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def digests(run: Path) -> dict:
    return {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in KEPT if (run / f).is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished seed-0 run (1 epoch): the victim every test below must leave as it is."""
    out = tmp_path_factory.mktemp("finished") / "runs" / "victim"
    proc = train(f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "runs" / "victim"
    shutil.copytree(run, out)
    return out


# ------------------------------------------------------------------------------------- canonical paths
def test_dotdot_through_a_folder_not_yet_there_does_not_touch_a_finished_run(tmp_path, finished):
    """Issue 20's first reproduction: ``output.dir=runs/nothere/../victim`` with another seed on a finished run
    read the victim's config.yaml through the path before ``nothere`` existed, found none, then resumed the
    victim's checkpoint and replaced its config.yaml, result.csv and model.safetensors (exit 0)."""
    victim = _copy(finished, tmp_path)
    before = digests(victim)
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    paths = (tmp_path / "runs" / "nothere" / ".." / "victim", tmp_path / "link" / "victim",
             Path("runs") / "nothere" / ".." / "victim")                  # the last one relative to the cwd
    for proc in together(*(lambda p=p: train("train.seed=5", f"output.dir={p}", cwd=tmp_path) for p in paths)):
        assert proc.returncode == R.EXIT_CONFIG, proc.stderr[-3000:]
        line = error_line(proc)
        assert f"output.dir='{victim}': holds a different run (differs in train.seed)" in line  # the real path
    assert digests(victim) == before and not (victim / "previous").exists() and not (victim / R.LOCK).exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["victim"]      # no "nothere" made either


# A trainer slowed between its model build and taking the run directory's lock (the window a slow model load
# or a large ImageFolder scan opens): it says when it is there, then waits for the test's go.
SLOWED = """\
import pathlib, runpy, sys, time
import stitching.train.opening as opening
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
build = opening.build
def slowed(r):
    out = build(r)
    ready.touch()
    deadline = time.time() + 600
    while not go.exists() and time.time() < deadline:
        time.sleep(0.05)
    return out
opening.build = slowed
sys.argv = ["python -m stitching.train", *sys.argv[3:]]
runpy.run_module("stitching.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_trainer_that_waited_for_the_directory_checks_again_what_it_holds(tmp_path):
    """Issue 20's second reproduction, made deterministic: two trainers pass the same-run check on an empty
    directory; the first trains and finishes while the second is still building. Before, the second then
    took the free lock, resumed the first's checkpoint and overwrote its finished result, both exiting 0. Now
    the second decides again once it holds the lock: another config is refused (exit 2), the same config
    finds its run finished (exit 0); neither writes a byte."""
    wrapper = tmp_path / "slowed.py"
    wrapper.write_text(SLOWED)
    out = tmp_path / "run"
    waiting = {}
    for name, seed in (("other", 5), ("same", 0)):
        ready, go = tmp_path / f"{name}.ready", tmp_path / f"{name}.go"
        waiting[name] = (ready, subprocess.Popen(
            [sys.executable, str(wrapper), str(ready), str(go), "--config", str(TINY), *COMMON,
             f"train.seed={seed}", f"output.dir={out}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 600
        while not all(ready.exists() for ready, _ in waiting.values()):
            assert time.time() < deadline and all(p.poll() is None for _, p in waiting.values()), "never got ready"
            time.sleep(0.1)
        assert not out.exists()                             # both passed the first check on nothing
        first = train(f"output.dir={out}")                  # seed 0 trains and finishes meanwhile
        assert first.returncode == 0, first.stderr[-3000:]
        before = digests(out)
        ends = {}
        for name, (_, p) in waiting.items():        # one after the other (at once, one would find the other's lock)
            (tmp_path / f"{name}.go").touch()
            ends[name] = p.communicate(timeout=600) + (p.returncode,)
    finally:
        for _, p in waiting.values():
            p.kill()
    stdout, stderr, code = ends["other"]
    assert code == R.EXIT_CONFIG, stderr[-3000:]
    assert "holds a different run (differs in train.seed)" in stderr.strip().splitlines()[-1]
    stdout, stderr, code = ends["same"]
    assert code == 0 and "run already finished" in stdout, stderr[-3000:]
    assert digests(out) == before and not (out / R.LOCK).exists() and not (out / "previous").exists()
    assert '"status": "finished"' in (out / R.STATE).read_text()      # the first trainer's word, not theirs


# ---------------------------------------------------------------------------------- command-line values
PRINTABLE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(text=PRINTABLE)
def test_a_string_on_the_command_line_is_taken_as_typed(text):
    """Any printable text (``#``, ``: ``, ``=``, quotes, brackets, leading spaces, unicode) is the value of a
    string key exactly; for a key that may be unset, ``null`` alone means unset."""
    for key in ("data.root", "output.dir", "model.source_weights", "model.source"):
        cfg = load_config(None, [f"{key}={text}"], check=False)
        section, name = key.split(".")
        want = None if text == "null" and key != "model.source" else text
        assert getattr(getattr(cfg, section), name) == want


@settings(max_examples=300, deadline=None)
@given(x=st.floats(allow_nan=False, allow_infinity=False), i=st.integers(-10**30, 10**30))
def test_numbers_on_the_command_line_are_numbers(x, i):
    """A number key reads every way Python prints a float (``repr``: ``2e-05``, ``1e+300``, exponent form), and an
    integer key every integer; both round-trip exactly."""
    for text in (repr(x), f"{x:.17e}", f"{x:.17E}"):
        assert load_config(None, [f"train.lr={text}"], check=False).train.lr == x
    assert load_config(None, [f"train.epochs={i}", f"train.lr={i}"], check=False).train.epochs == i


def test_each_kind_of_value_has_one_syntax():
    cfg = load_config(TINY, ["train.lr=2e-3", "data.hflip=0", "model.pretrained=false", "train.channels_last=true",
                             "data.num_classes=null", "train.max_steps_per_epoch=3",
                             "model.source_kwargs={drop_path_rate: 1e-1, drop_rate: 0}"])
    assert cfg.train.lr == 0.002 and cfg.data.hflip == 0.0 and cfg.model.pretrained is False
    assert cfg.train.channels_last is True and cfg.data.num_classes is None and cfg.train.max_steps_per_epoch == 3
    assert cfg.model.source_kwargs == {"drop_path_rate": 0.1, "drop_rate": 0}
    assert load_config(TINY, ["train.channels_last=auto"]).train.channels_last == "auto"
    for override, key, says in (("train.lr=fast", "train.lr", "must be a number"),
                                ("train.lr=nan", "train.lr", "must be a finite number"),
                                ("train.lr=-inf", "train.lr", "must be a finite number"),
                                ("model.pretrained=yes", "model.pretrained", "must be true or false"),
                                ("train.epochs=2.0", "train.epochs", "must be an integer"),
                                ("train.epochs=null", "train.epochs", "must be an integer"),
                                ("model.source_kwargs=img_size: 32", "model.source_kwargs", "must be a mapping"),
                                ("model.source_kwargs={img_size: [32", "model.source_kwargs", "not a valid")):
        with pytest.raises(ConfigError, match=says) as err:
            load_config(TINY, [override])
        assert err.value.key == key and err.value.source == "command line"
    # --slurm key=value: typed by the resource (a SLURM time stays a string; YAML 1.1 read 12:00:00 as 43200)
    from stitching.launch.slurm import SlurmResources

    hints = typing.get_type_hints(SlurmResources)
    assert [parse_value(hints[k], v, k) for k, v in (("time", "12:00:00"), ("time", "600"), ("mem", "32G"),
                                                     ("requeue", "false"), ("max_parallel", "null"),
                                                     ("extra", "[--x, 'b #c']"))] == \
        ["12:00:00", 600, "32G", False, None, ["--x", "b #c"]]


def test_paths_with_hash_colon_and_spaces_through_the_trainer_and_run_dir(tmp_path):
    """``--run-dir "runs/exp #3/r1"`` reported another directory's result (" #3/r1" was a YAML comment) and
    ``": "`` turned a path into a mapping; ``train.lr=2e-3`` was refused as "must be float". Now: the run is
    trained where it was told, ``--run-dir`` finds it there, and ``runs/exp`` (what the comment left) is never
    touched."""
    out = tmp_path / "runs" / "exp #3: ü x" / "r1"
    proc = train("train.epochs=0", "train.lr=2e-3", f"output.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / R.RESULT).is_file() and load_config(out / R.CONFIG).train.lr == 0.002
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp #3: ü x"]
    proc = cli("-m", "stitching.train", "--run-dir", "runs/exp #3: ü x/r1", cwd=tmp_path)
    assert proc.returncode == 0 and f"run already finished: results in {out / R.RESULT}" in proc.stdout, proc.stderr


def test_a_data_root_with_hash_is_read_as_typed(tmp_path):
    """``data.root=".../good #1"`` silently trained on ``.../good``: here only ``good #1`` exists."""
    from PIL import Image

    root = tmp_path / "good #1"
    for split in ("train", "val"):
        for k, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (60 * k + i, 0, 0)).save(root / split / cls / f"{i}.png")
    out = tmp_path / "run"
    proc = train("train.epochs=0", "data.name=imagefolder", f"data.root={root}", "data.num_classes=2",
                 "train.batch_size=4", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_config(out / R.CONFIG).data.root == str(root)


@pytest.mark.slow
def test_a_sweep_into_a_runs_dir_with_hash(tmp_path):
    """``--runs-dir "runs/sw #1"`` trained run 1 into ``runs/sw`` and failed run 2 (its trainer read ``--run-dir``
    as YAML); both runs now train where the sweep put them."""
    sweep = tmp_path / "sw.yaml"
    sweep.write_text(f"base: {TINY}\ngrid:\n  train.seed: [0, 1]\n  train.epochs: [0]\n  train.device: [cpu]\n"
                     "  data.val_size: [64]\n  data.workers: [0]\n")
    proc = cli("-m", "stitching.sweep", sweep, "--launcher", "local", "--runs-dir", "runs/sw #1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "local: 2 done, 0 preempted, 0 failed" in proc.stdout
    runs = sorted((tmp_path / "runs" / "sw #1").iterdir())
    assert len(runs) == 2 and all((r / R.RESULT).is_file() for r in runs)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sw #1"]


# ------------------------------------------------------------------------------ the tail of one-liners
def _no_dac_override() -> list[str]:
    """A prefix that runs a command without the right to write where permissions say no: nothing for a user,
    ``setpriv`` dropping CAP_DAC_OVERRIDE for root (who otherwise writes anywhere)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be denied")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_output_dir_that_cannot_be_a_directory_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o555)
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [("afile", R.EXIT_CONFIG, f"output.dir='afile': {tmp_path / 'afile'} is a file, not a directory"),
             ("afile/run", R.EXIT_CONFIG, "(a parent) is a file, not a directory"),
             ("loop1/run", R.EXIT_CONFIG, "output.dir='loop1/run': cannot be resolved: a symlink loop"),
             ("locked/run", R.EXIT_IO, f"cannot write {tmp_path / 'locked' / 'run'}: {tmp_path / 'locked'} is "
                                       "not writable (permission denied)")]
    procs = together(*(lambda d=d: train(f"output.dir={d}", cwd=tmp_path, prefix=_no_dac_override())
                       for d, _, _ in cases))
    for (d, code, says), proc in zip(cases, procs):
        assert proc.returncode == code and says in error_line(proc), (d, proc.stderr[-3000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any((tmp_path / "locked").iterdir())


@pytest.mark.parametrize("text,says", [
    (f"base: {TINY}\ntrain:\n  lr: .nan\n", "train.lr=nan: must be a finite number"),
    (f"base: {TINY}\ntrain:\n  weight_decay: .inf\n", "train.weight_decay=inf: must be a finite number"),
    (f"base: {TINY}\nmodel:\n  source: r\xe9snet\n".encode("latin-1"), "not UTF-8 text"),
    (f"base: {TINY}\n1:\n  lr: 0.1\n", "1=None: unknown section"),
], ids=["nan", "inf", "latin-1", "int-section"])
def test_bad_config_files_are_one_line_and_create_nothing(tmp_path, text, says):
    """Before: a ValueError traceback after the run directory was created (lr NaN), UnicodeDecodeError,
    TypeError."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    proc = cli("-m", "stitching.train", "--config", cfg, "output.dir=run", cwd=tmp_path)
    assert proc.returncode == R.EXIT_CONFIG
    assert f"{cfg}: {says}" in error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_collect_refuses_a_directory_and_a_runs_own_files(tmp_path, finished):
    """``collect -o`` an existing directory was an IsADirectoryError traceback; onto a run's own result.csv it
    silently replaced that run's result with the collected table."""
    victim = _copy(finished, tmp_path)
    before = digests(victim)
    runs = tmp_path / "runs"
    for output, says in ((runs, "is a directory"),
                         (victim / R.RESULT, f"is the {R.RESULT} of the run directory {victim}"),
                         (runs / "nothere" / ".." / "victim" / R.CONFIG, f"is the {R.CONFIG} of the run directory")):
        proc = cli("-m", "stitching.collect", runs, "-o", output)
        assert proc.returncode == R.EXIT_CONFIG and says in error_line(proc)
    assert digests(victim) == before and sorted(p.name for p in runs.iterdir()) == ["victim"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = cli("-m", "stitching.collect", runs, "-o", locked / "results.csv", prefix=_no_dac_override())
    assert proc.returncode == R.EXIT_IO and f"cannot write {locked / 'results.csv'}" in error_line(proc)
    proc = cli("-m", "stitching.collect", runs, "-o", tmp_path / "out #1" / "r: 1.csv")
    assert proc.returncode == 0 and (tmp_path / "out #1" / "r: 1.csv").read_text().count("\n") == 2


# ------------------------------------------------------------------------ a run names its own directory
@pytest.mark.slow
def test_a_run_without_output_dir_names_its_own_directory(tmp_path):
    """No output.dir: ``runs/<config name>/<run name>`` (the sweep's name for that run), printed first. The same
    command again finds it finished, another key is another directory beside it, and an earlier version's
    default (``runs/<config name>``, holding this run) is reused."""
    cfg = tmp_path / "tiny.yaml"
    shutil.copy(TINY, cfg)
    args = ["-m", "stitching.train", "--config", cfg, *COMMON, "train.epochs=0"]
    first, other = together(lambda: cli(*args, cwd=tmp_path), lambda: cli(*args, "train.lr=0.01", cwd=tmp_path))
    names = {}
    for key, proc, lr in (("first", first, 0.002), ("other", other, 0.01)):
        assert proc.returncode == 0, proc.stderr[-3000:]
        [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("run directory: ")]
        path = Path(line.split()[2])
        want = R.run_dir_name(load_config(cfg, [*COMMON, "train.epochs=0", f"train.lr={lr}"]), IDENTITY)
        assert path == tmp_path / "runs" / "tiny" / want and (path / R.RESULT).is_file()
        names[key] = path
    assert names["first"] != names["other"] and ".lr0.01." in names["other"].name
    again = cli(*args, "data.workers=1", cwd=tmp_path)          # (an operational key: the same run)
    assert again.returncode == 0 and f"run already finished: results in {names['first'] / R.RESULT}" in again.stdout
    # the directory an earlier version gave this config (runs/<config name>) holds this run: found, not redone
    older = tmp_path / "runs" / "tiny"
    for f in (R.CONFIG, R.RESULT):
        shutil.copy(names["first"] / f, older / f)
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and f"run directory: {older} (an earlier version's default" in again.stdout
    assert "run already finished" in again.stdout
