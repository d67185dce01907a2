"""Bounded inputs: a YAML alias bomb (a 1.7 KB file whose nested aliases expand to 10^8 nodes) is one line and
exit 2 at once wherever a YAML file is read (a config, its run directory's config.yaml, collection), and no
error message quotes more than a few hundred characters of any value (stitching/messages.py)."""

from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from stitching.config import ConfigError
from stitching.yamlio import MAX_YAML_NODES
from stitching.validate import load_config
from stitching.messages import MAX_MESSAGE_CHARS, MAX_VALUE_CHARS, short_repr
from stitching.rundir import EXIT_CONFIG
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
#: what an error line may hold besides the value it quotes: the file's path, the key, the message
LINE_LIMIT = 3 * MAX_VALUE_CHARS + MAX_MESSAGE_CHARS


def bomb(levels: int, where: str = "kwargs") -> str:
    """A config (as the issue's: about 1.7 KB) with ``levels`` levels of 9 aliases each: 9**levels leaves once
    expanded. ``where``: the bomb is the value of a mapping-typed key (``model.source_kwargs``) or of a
    float key (``train.lr``: an alias where a scalar is expected)."""
    anchors = [f"    level_0: &level_0 [{', '.join(['lol-lol-lol'] * 9)}]"]
    anchors += [f"    level_{i}: &level_{i} [{', '.join([f'*level_{i - 1}'] * 9)}]" for i in range(1, levels)]
    text = (f"# an alias bomb: {levels} levels of 9, {9 ** levels:,} leaves once expanded\n"
            "model:\n  source: resnet18\n  source_stage: 1\n  destination_stage: 3\n  adapter: bottleneck\n"
            "  pretrained: false\n  source_kwargs:\n" + "\n".join(anchors) + "\n"
            "data:\n  name: synthetic\n  img_size: 32\n  num_classes: 10\n  train_size: 256\n  val_size: 128\n"
            "train:\n  epochs: 1\n  batch_size: 64\n  device: cpu\n")
    if where == "scalar":
        text += f"  lr: *level_{levels - 1}\n"
    return text


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command's process, with ``cpu_s``: the CPU seconds it used (the bound on its work that does not
    depend on how busy the machine is)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return proc


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[:2000]
    assert len(lines[0]) < LINE_LIMIT, lines[0][:2000]
    return lines[0]


@pytest.mark.parametrize("levels", [8, 10])
@pytest.mark.parametrize("where", ["kwargs", "scalar"])
def test_an_alias_bomb_config_is_one_line_and_exit_2_at_once(tmp_path, levels, where):
    """Before: 15-47 s of CPU, 2.1 GB and a 351 MB error line at 8 levels, a MemoryError traceback at 10. Now the
    loader counts the expanded nodes before building anything: exit 2, one line naming the file, in about half a
    second of CPU (Python's start included; bounded at 5 s)."""
    path = tmp_path / f"bomb{levels}.yaml"
    path.write_text(bomb(levels, where))
    assert 1000 < path.stat().st_size < 2000
    proc = _cli("stitching.train", "--config", str(path), f"output.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == EXIT_CONFIG and proc.cpu_s < 5, (proc.cpu_s, proc.stderr[:2000])
    line = _one_line(proc)
    assert line == (f"error: {path}: its aliases expand to more than {MAX_YAML_NODES:,} nodes (MAX_YAML_NODES; a "
                    "config has a few hundred): not a file this framework reads")
    assert not (tmp_path / "run").exists()


def test_an_alias_where_a_scalar_is_expected_is_a_short_type_error(tmp_path):
    """Under the node limit (3 levels: 729 leaves), an alias to a list where a float belongs is the key's type
    error, quoting a few hundred characters of the value."""
    path = tmp_path / "small.yaml"
    path.write_text(bomb(3, "scalar"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: train.lr=[[['lol-lol-lol', ") and text.endswith(": must be float"), text
    assert len(text) < LINE_LIMIT and "..." in text


@pytest.mark.parametrize("text,why", [
    ("a: &a [*a]\n", "a recursive alias"),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("train:\n  lr: " + "1" * 5000 + "\n", "not valid YAML: Exceeds the limit"),
    ("model:\n  source: " + "x" * (300 * 1024) + "\n", "larger than 256 KiB"),
], ids=["recursive-alias", "deep-nesting", "5000-digit-int", "300-KiB-file"])
def test_other_unbounded_yaml_is_a_one_line_config_error(tmp_path, text, why):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert why in str(err.value) and str(err.value).startswith(f"{path}: ") and len(str(err.value)) < LINE_LIMIT


def test_no_error_quotes_more_than_a_few_hundred_characters_of_a_value():
    from stitching.launch.slurm import SlurmResources

    nested: list = ["x" * 10_000]
    for _ in range(30):
        nested = [nested] * 1000          # 1000**30 leaves: only a bounded part may ever be walked
    for value in (nested, "y" * 1_000_000, {f"k{i}": i for i in range(100_000)}, 10 ** 5000, b"z" * 10**6):
        assert len(short_repr(value)) <= MAX_VALUE_CHARS + 30
        assert len(str(ConfigError("model.source_kwargs", value, "a.yaml", "must be dict"))) < LINE_LIMIT
    long_key = ConfigError("model." + "k" * 100_000, None, "a.yaml", "unknown key; " + "m" * 100_000)
    assert len(str(long_key)) < LINE_LIMIT
    with pytest.raises(ValueError) as err:
        SlurmResources(partition="p q" * 100_000)
    assert len(str(err.value)) < LINE_LIMIT
    with pytest.raises(KeyError) as err:
        from stitching.models.registry import get_spec
        get_spec("m" * 100_000)
    assert len(str(err.value)) < LINE_LIMIT


# ------------------------------------------------------------------------------ a bomb in a run directory
def _finished_run(tmp_path: Path, name: str) -> Path:
    """A finished run directory (the tiny synthetic config, evaluated only: seconds)."""
    out = tmp_path / "runs" / name
    proc = _cli("stitching.train", "--config", str(TINY), f"output.dir={out}", "train.epochs=0",
                "train.device=cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_bomb_in_a_run_directory_is_refused_by_the_trainer_and_skipped_by_collect(tmp_path):
    """A run directory whose config.yaml is an alias bomb: the trainer (``--run-dir``, or a config pointed at
    it) says so in one line (exit 2) instead of hashing it; ``collect`` writes the CSV of the other runs and
    reports it as damaged, with an oversized and a non-UTF-8 one beside it."""
    good = _finished_run(tmp_path, "good")
    damaged = {}
    for name, config, result in (("bomb", bomb(10).encode(), None),
                                 ("not_utf8", b"model: {source: \xff}\n", None),
                                 ("huge_result", None, b"run_id,kind\n" + b"x" * (300 * 1024))):
        d = tmp_path / "runs" / name
        d.mkdir()
        (d / "config.yaml").write_bytes(config if config is not None else (good / "config.yaml").read_bytes())
        (d / "result.csv").write_bytes(result if result is not None else (good / "result.csv").read_bytes())
        damaged[name] = d
    bomb_dir = damaged["bomb"]
    expected = (f"error: {bomb_dir / 'config.yaml'}: its aliases expand to more than ",   # read as the config
                f"error: command line: output.dir='{bomb_dir}': holds a different run (its config.yaml is not a "
                "readable run config: its aliases expand to more than ")                    # the same-run check
    for args, start in zip((["--run-dir", str(bomb_dir)], ["--config", str(TINY), f"output.dir={bomb_dir}"]),
                           expected):
        proc = _cli("stitching.train", *args)
        # the CPU bound leaves room for importing torch (~5 s); walking the bomb took minutes or a MemoryError
        assert proc.returncode == EXIT_CONFIG and proc.cpu_s < 25, (proc.cpu_s, proc.stderr[:2000])
        line = _one_line(proc)
        assert line.startswith(start), line

    out = tmp_path / "results.csv"
    proc = _cli("stitching.collect", str(tmp_path / "runs"), "-o", str(out))
    assert proc.returncode == 0 and proc.cpu_s < 25, (proc.cpu_s, proc.stderr[:2000])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run_dir"] for r in rows] == ["good"]
    assert "damaged:    3" in proc.stdout and len(proc.stdout) < 3000, proc.stdout[:3000]
    for name, why in (("bomb", "config.yaml: its aliases expand to more than"),
                      ("not_utf8", "config.yaml: not UTF-8 text (byte "),
                      ("huge_result", "bytes, larger than a result row can be")):
        assert f"{damaged[name]}  (" in proc.stdout and why in proc.stdout, (name, proc.stdout)
