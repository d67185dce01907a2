"""SLURM job-array launcher, tested against a real single-node SLURM.

The session fixture starts munged/slurmctld/slurmd with
scripts/slurm/start_local_slurm.sh (installing slurm-wlm + munge with apt if
needed) and stops them at the end.  With STITCHING_SLURM=1 or CI set, failing
to start the cluster is an error; otherwise the cluster tests are skipped when
SLURM cannot be had (not root, no apt).  STITCHING_SLURM_KEEP=1 leaves the
cluster running after the session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stitching.launch import slurm
from stitching.launch.slurm import SlurmResources

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]

SMALL = dict(cpus_per_task=1, mem="100M", time="00:10:00")   # longer than the default USR1@300 lead




def _wait_until(cond, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _write_script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def _submit(tmp_path: Path, run_dirs: list[Path], command: str, **res) -> str:
    resources = SlurmResources(**{**SMALL, **res})
    task_file = tmp_path / "tasks.txt"
    slurm.write_task_file(task_file, run_dirs)
    script = tmp_path / "array.sbatch"
    script.write_text(
        slurm.render_array_script(
            task_file, len(run_dirs), resources, tmp_path / "logs", "test", command, chdir=tmp_path
        )
    )
    return slurm.submit(script)


def _logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()}" for p in sorted((tmp_path / "logs").glob("*.out"))
    )


def _running(job_id: str, task: int) -> bool:
    return slurm.job_states(job_id).get(task) == "RUNNING"


# ---------------------------------------------------------------------------
# (a) plain array, one-job-per-run-dir bookkeeping
# ---------------------------------------------------------------------------
def test_array_of_three_tasks_completes(slurm_cluster, tmp_path):
    run_dirs = [tmp_path / f"run{i}" for i in range(3)]
    for d in run_dirs:
        d.mkdir()
    command = 'sleep 2; echo "task=$SLURM_ARRAY_TASK_ID dir=$RUN_DIR" > "$RUN_DIR/out.txt"'
    job_id, submitted = slurm.submit_array(
        run_dirs, tmp_path / "sweep", SlurmResources(**SMALL, max_parallel=2), "array3", command
    )
    assert job_id is not None and submitted == [str(d) for d in run_dirs]

    # While queued/running, the run dirs are taken: re-submitting adds nothing.
    assert slurm.pending_or_running(run_dirs[2])
    assert str(run_dirs[0]) in slurm.active_run_dirs()
    again_id, again = slurm.submit_array(
        run_dirs, tmp_path / "sweep", SlurmResources(**SMALL), "array3", command
    )
    assert (again_id, again) == (None, [])

    states = slurm.wait_for(job_id, timeout_s=90, poll_s=0.5, n_tasks=3)
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "COMPLETED"}, _logs(tmp_path / "sweep")
    for i, d in enumerate(run_dirs):
        assert (d / "out.txt").read_text() == f"task={i} dir={d}\n"
        assert (d / slurm.MARKER_FILE).read_text() == f"{job_id}_{i}\n"
    assert not any(slurm.pending_or_running(d) for d in run_dirs)
    logs = sorted(p.name for p in (tmp_path / "sweep" / "logs").glob("*.out"))
    assert logs == [f"{job_id}_{i}.out" for i in range(3)]


# ---------------------------------------------------------------------------
# (b) requeue by the scheduler (scontrol requeue while running)
# ---------------------------------------------------------------------------
def test_scontrol_requeue_restarts_task(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = _write_script(
        tmp_path / "job.sh",
        """\
        #!/bin/bash
        echo start >> "$RUN_DIR/starts"
        if [[ -e "$RUN_DIR/started_once" ]]; then
            echo "restart=${SLURM_RESTART_COUNT:-0}" > "$RUN_DIR/done"
            exit 0
        fi
        touch "$RUN_DIR/started_once"
        sleep 120 & wait
        """,
    )
    job_id = _submit(tmp_path, [run_dir], f"bash {script}")
    _wait_until(lambda: (run_dir / "started_once").exists() and _running(job_id, 0), 30,
                "first start")
    t0 = time.monotonic()
    subprocess.run(["scontrol", "requeue", f"{job_id}_0"], check=True, capture_output=True)
    _wait_until(lambda: (run_dir / "done").exists(), 60, "the second run", poll=0.5)
    restart_s = time.monotonic() - t0
    states = slurm.wait_for(job_id, timeout_s=30, poll_s=0.5)
    assert states == {0: "COMPLETED"}, _logs(tmp_path)
    assert (run_dir / "starts").read_text().count("start") == 2
    assert (run_dir / "done").read_text() == "restart=1\n"
    assert slurm.job_info(job_id)[0]["Restarts"] == "1"
    # --open-mode=append: both runs are in the same log
    assert _logs(tmp_path).count("(restart ") == 2, _logs(tmp_path)
    print(f"requeued task restarted after {restart_s:.1f}s", file=sys.stderr)


# ---------------------------------------------------------------------------
# (c) USR1 to the batch shell -> forwarded -> exit 75 -> self-requeue
# ---------------------------------------------------------------------------
def test_usr1_forwarded_then_exit_75_requeues(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = _write_script(
        tmp_path / "trainer.py",
        """\
        import os, signal, sys, time
        run = os.environ["RUN_DIR"]
        p = lambda name: os.path.join(run, name)
        with open(p("starts"), "a") as f:
            f.write(f"pid={os.getpid()} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\\n")
        if os.path.exists(p("checkpoint")):
            open(p("done"), "w").close()
            sys.exit(0)

        def on_usr1(signum, frame):
            open(p("got_usr1"), "w").write(str(os.getpid()))
            open(p("checkpoint"), "w").close()
            sys.exit(75)  # EX_TEMPFAIL: checkpointed, please requeue

        signal.signal(signal.SIGUSR1, on_usr1)
        open(p("ready"), "w").close()
        time.sleep(120)
        sys.exit(1)
        """,
    )
    command = f'{sys.executable} {trainer}'
    job_id = _submit(tmp_path, [run_dir], command)
    _wait_until(lambda: (run_dir / "ready").exists() and _running(job_id, 0), 30, "trainer ready")

    # What --signal=B:USR1@N does at the deadline: signal the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job_id}_0"], check=True,
                   capture_output=True)
    _wait_until(lambda: (run_dir / "got_usr1").exists(), 15, "the forwarded USR1")
    _wait_until(lambda: (run_dir / "done").exists(), 60, "the requeued run", poll=0.5)
    states = slurm.wait_for(job_id, timeout_s=30, poll_s=0.5)
    logs = _logs(tmp_path)
    assert states == {0: "COMPLETED"}, logs

    starts = (run_dir / "starts").read_text().splitlines()
    assert len(starts) == 2 and starts[1].endswith("restart=1"), starts
    # the trainer process itself got the signal (the bash -c layer exec'ed it)
    assert (run_dir / "got_usr1").read_text() == starts[0].split()[0].removeprefix("pid=")
    assert slurm.job_info(job_id)[0]["Restarts"] == "1"
    assert "caught SIGUSR1" in logs and "status 75" in logs and "scontrol requeue" in logs
    assert not (run_dir / ".requeue_requested").exists()


def test_time_limit_signal_checkpoint_requeue(slurm_cluster, tmp_path):
    """End to end: --signal=B:USR1@110 with a 2-minute limit really fires (slurmctld
    checks every ~30 s, so it comes 10-40 s after the start), the trainer exits 75
    and the task requeues itself long before the TIMEOUT kill."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = _write_script(
        tmp_path / "trainer.py",
        """\
        import os, signal, sys, time
        run = os.environ["RUN_DIR"]
        if os.path.exists(os.path.join(run, "checkpoint")):
            open(os.path.join(run, "done"), "w").close()
            sys.exit(0)

        def on_signal(signum, frame):
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # duplicates: ignore
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with open(os.path.join(run, "signals"), "a") as f:
                f.write(f"{signal.Signals(signum).name}\\n")
            open(os.path.join(run, "checkpoint"), "w").close()
            sys.exit(75)

        signal.signal(signal.SIGUSR1, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        time.sleep(300)
        """,
    )
    t0 = time.monotonic()
    job_id = _submit(tmp_path, [run_dir], f"{sys.executable} {trainer}",
                     time="00:02:00", signal="USR1@110")
    states = slurm.wait_for(job_id, timeout_s=100, poll_s=1)
    elapsed = time.monotonic() - t0
    assert states == {0: "COMPLETED"}, _logs(tmp_path)
    assert (run_dir / "signals").read_text() == "SIGUSR1\n"
    assert (run_dir / "done").exists()
    assert slurm.job_info(job_id)[0]["Restarts"] == "1"
    assert elapsed < 100
    print(f"time-limit signal + requeue + rerun took {elapsed:.1f}s", file=sys.stderr)


def test_no_requeue_leaves_a_preempted_task_failed_with_its_exit_code(slurm_cluster, tmp_path):
    """requeue=False: exit EXIT_PREEMPTED is passed on (a cluster with RequeueExit may still requeue it).
    The multi-process path ($STITCHING_REQUEUE_FILE) is tried with the real trainer under torchrun in
    tests/test_preemption.py."""
    from stitching.rundir import EXIT_PREEMPTED

    run_dir = tmp_path / "noreq"
    run_dir.mkdir()
    command = f'if [[ -e "$RUN_DIR/again" ]]; then exit 0; fi; touch "$RUN_DIR/again"; exit {EXIT_PREEMPTED}'
    job = _submit(tmp_path, [run_dir], command, requeue=False)
    states = slurm.wait_for(job, timeout_s=60, poll_s=0.5)
    assert states == {0: "FAILED"}, _logs(tmp_path)
    info = slurm.job_info(job)[0]
    assert info["Restarts"] == "0" and info["ExitCode"] == f"{EXIT_PREEMPTED}:0"


def test_submit_errors(slurm_cluster, tmp_path, monkeypatch):
    script = tmp_path / "bad.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --partition=no_such_partition\ntrue\n")
    with pytest.raises(RuntimeError, match="(?i)sbatch.*partition"):
        slurm.submit(script)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="'sbatch' not found"):
        slurm.submit(script)


# ---------------------------------------------------------------------------
# (d) rendering and validation (no cluster needed)
# ---------------------------------------------------------------------------
def test_render_multi_gpu_script(tmp_path):
    res = SlurmResources(partition="gpu", gpus_per_task=4, cpus_per_task=16, mem="128G",
                         time="1-00:00:00", max_parallel=3, account="proj", qos="high",
                         extra=["#SBATCH --constraint=a100", "--exclusive"])
    cmd = slurm.train_command("/opt/venv/bin/python", 4)
    assert cmd == ('/opt/venv/bin/python -m torch.distributed.run --standalone '
                   '--nproc_per_node=4 -m stitching.train --run-dir "$RUN_DIR"')
    text = slurm.render_array_script(tmp_path / "tasks.txt", 10, res, tmp_path / "logs",
                                     "sweep1", cmd)
    sbatch = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    for opt in [
        "--job-name=stitching:sweep1", "--array=0-9%3", f"--output={tmp_path}/logs/%A_%a.out",
        "--open-mode=append", "--ntasks=1", "--gpus-per-task=4", "--cpus-per-task=16",
        "--mem=128G", "--time=1-00:00:00", "--partition=gpu", "--account=proj", "--qos=high",
        "--requeue", "--signal=B:USR1@300", "--constraint=a100", "--exclusive",
        f"--comment=stitching-tasks={tmp_path}/tasks.txt",
    ]:
        assert f"#SBATCH {opt}" in sbatch, (opt, sbatch)
    assert "torch.distributed.run" in text and "--nproc_per_node=4" in text
    assert "SIGNAL_CHILDREN=1" in text
    assert "trap 'forward USR1' USR1" in text and "trap 'forward TERM' TERM" in text
    assert 'scontrol requeue "$TASK_ID"' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)

    gres = SlurmResources(gpus_per_task=2, gpu_flag="gres", requeue=False, signal="SIGUSR2@120")
    text = slurm.render_array_script(tmp_path / "t.txt", 1, gres, tmp_path, "x",
                                     slurm.train_command("python", 1))
    assert "#SBATCH --gres=gpu:2" in text and "--gpus-per-task" not in text
    assert "#SBATCH --array=0-0\n" in text and "#SBATCH --no-requeue" in text
    assert "#SBATCH --signal=B:USR2@120" in text and "trap 'forward USR2' USR2" in text
    assert 'python -m stitching.train --run-dir "$RUN_DIR"' in text
    assert "SIGNAL_CHILDREN=0" in text and "#SBATCH --partition" not in text
    assert slurm.train_command("python", 0) == slurm.train_command("python", 1)


def test_resources_from_dict_validation():
    r = SlurmResources.from_dict({"gpus_per_task": 1, "time": 43200, "mem": 2048}, source="a.yaml")
    assert (r.time, r.mem) == ("12:00:00", "2048M")  # YAML 1.1 reads 12:00:00 as 43200
    with pytest.raises(ValueError, match=r"sweep\.yaml.*'gpus'"):
        SlurmResources.from_dict({"gpus": 2}, source="sweep.yaml")
    with pytest.raises(ValueError, match=r"sweep\.yaml.*time"):
        SlurmResources.from_dict({"time": "12h"}, source="sweep.yaml")
    with pytest.raises(ValueError, match="max_parallel"):
        SlurmResources(max_parallel=0)
    with pytest.raises(ValueError, match="signal"):
        SlurmResources(signal="USR1")
    # a lead as long as the time limit would signal every task as soon as it starts
    with pytest.raises(ValueError, match=r"sweep\.yaml.*signal.*as soon as a task starts"):
        SlurmResources.from_dict({"time": "00:05:00", "signal": "USR1@300"}, source="sweep.yaml")
    assert SlurmResources(time="00:05:01", signal="USR1@300").signal_parts() == ("USR1", 300)
    assert SlurmResources(time="1-00:00:00").signal_parts() == ("USR1", 300)
    with pytest.raises(ValueError, match="extra"):
        SlurmResources(extra="--exclusive")
    with pytest.raises(ValueError, match="gpus_per_task"):
        SlurmResources(gpus_per_task=True)


# ---------------------------------------------------------------------------
# (e) a request the cluster can never satisfy is said at once, not left queued
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("override,reason", [
    # accepted by sbatch, then PENDING for ever: more CPUs than the partition's (single) node has
    ("cpus_per_task=4096", r"can never start: SLURM keeps it PENDING with reason PartitionConfig for the request "
                           r"--cpus-per-task=4096 .*partition debug has nodes with at most \d+ CPUs"),
    # refused by sbatch: more memory than any node has
    ("mem=100000G", r"sbatch refused .*Memory specification can not be satisfied.*\(request: .*--mem=100000G"),
    # refused by sbatch: GPUs on a cluster without any
    ("gpus_per_task=1", r"sbatch refused .*Invalid generic resource.*\(request: .*--gpus-per-task=1"),
])
def test_sweep_says_when_slurm_can_never_run_it(slurm_cluster, tmp_path, override, reason):
    import re

    spec = tmp_path / "big.yaml"
    spec.write_text(f"base: {REPO / 'configs' / 'synthetic' / 'tiny.yaml'}\n"
                    "grid: {train.seed: [0]}\nslurm: {cpus_per_task: 1, mem: 100M, time: '00:10:00'}\n")
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stitching.sweep", str(spec), "--launcher", "slurm",
                           "--runs-dir", str(runs), "--slurm", override], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 2 and "1 runs not submitted" in errors[1], proc.stderr
    assert errors[0].startswith("error: slurm resources of block block0 (1 runs): "), errors[0]
    assert re.search(reason, errors[0]), errors[0]
    if "PENDING" in reason:
        job = re.search(r"job (\d+) can never start", errors[0]).group(1)
        assert "cancelled it" in errors[0]
        _wait_until(lambda: slurm.job_states(job).get(0, "CANCELLED") == "CANCELLED", 30, "the job cancelled")
    [run_dir] = [p for p in runs.iterdir() if (p / "config.yaml").is_file()]
    assert not slurm.pending_or_running(run_dir)     # nothing left queued on it: a corrected sweep can go
    print(f"unsatisfiable request ({override}) reported after {time.monotonic() - t0:.1f}s", file=sys.stderr)


# ---------------------------------------------------------------------------
# (f) submissions larger than the cluster's MaxArraySize (issue 20)
# ---------------------------------------------------------------------------
SMALL_ARRAYS = 3      # MaxArraySize of the cluster these tests restart: arrays of at most 3 tasks (indices 0-2)


@pytest.fixture(scope="class")
def small_arrays(slurm_cluster):
    """The local cluster restarted with ``MaxArraySize=3`` (start script option), and with the default again
    afterwards (a changed slurm.conf restarts the daemons: about 5 s each way)."""
    def start(**env):
        proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "start_local_slurm.sh")], text=True,
                              capture_output=True, timeout=300, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-3000:]

    start(SLURM_LOCAL_MAX_ARRAY_SIZE=str(SMALL_ARRAYS))
    assert slurm.max_array_size() == SMALL_ARRAYS
    try:
        yield SMALL_ARRAYS
    finally:
        start()
        assert slurm.max_array_size() == slurm.DEFAULT_MAX_ARRAY_SIZE


def _intervals(run_dirs: list[Path]) -> list[tuple[float, float]]:
    return [(float((d / "start").read_text()), float((d / "end").read_text())) for d in run_dirs]


@pytest.mark.usefixtures("small_arrays")
class TestMoreTasksThanMaxArraySize:
    def test_split_into_arrays_of_max_array_size_with_the_throttle_chained_across_them(self, tmp_path):
        """5 tasks on a cluster taking arrays of 3: two arrays (3 + 2). With ``max_parallel=1`` the second waits
        for the first (afterany) and no two tasks ever overlap (their own start/end times); without a throttle
        the arrays are independent."""
        dirs = [tmp_path / f"run{i}" for i in range(5)]
        for d in dirs:
            d.mkdir()
        command = 'date +%s.%N > "$RUN_DIR/start"; sleep 1; date +%s.%N > "$RUN_DIR/end"'
        arrays = slurm.submit_arrays(dirs, tmp_path / "chained", SlurmResources(**SMALL, max_parallel=1), "chain",
                                     command)
        assert [ds for _, ds in arrays] == [[str(d) for d in dirs[:3]], [str(d) for d in dirs[3:]]]
        (first, _), (second, _) = arrays
        waits = {i: f.get("Dependency") for i, f in slurm.job_info(second).items()}
        assert waits and all(w.startswith(f"afterany:{first}") for w in waits.values()), waits
        script = next((tmp_path / "chained").glob("array-*-2.sbatch")).read_text()
        assert f"#SBATCH --dependency=afterany:{first}\n" in script and "#SBATCH --array=0-1%1\n" in script
        for job, n in ((first, 3), (second, 2)):
            assert slurm.wait_for(job, timeout_s=120, poll_s=0.5, n_tasks=n) == {i: "COMPLETED" for i in range(n)}
        spans = sorted(_intervals(dirs))
        assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), spans         # one at a time, all along
        assert [(d / slurm.MARKER_FILE).read_text() for d in dirs] == \
            [f"{first}_{i}\n" for i in range(3)] + [f"{second}_{i}\n" for i in range(2)]

        free = [tmp_path / f"free{i}" for i in range(4)]
        for d in free:
            d.mkdir()
        arrays = slurm.submit_arrays(free, tmp_path / "free", SlurmResources(**SMALL), "free", command)
        assert [len(ds) for _, ds in arrays] == [3, 1]
        assert not any("--dependency" in p.read_text() for p in (tmp_path / "free").glob("array-*.sbatch"))
        for job, ds in arrays:
            slurm.wait_for(job, timeout_s=120, poll_s=0.5, n_tasks=len(ds))
        assert all((d / "end").is_file() for d in free)

    def test_an_array_larger_than_max_array_size_is_blamed_on_its_size_not_the_request(self, tmp_path):
        resources = SlurmResources(**SMALL)
        (tmp_path / "tasks.txt").write_text("".join(f"{tmp_path}/r{i}\n" for i in range(SMALL_ARRAYS + 1)))
        script = tmp_path / "big.sbatch"
        script.write_text(slurm.render_array_script(tmp_path / "tasks.txt", SMALL_ARRAYS + 1, resources,
                                                    tmp_path / "logs", "big", "true"))
        with pytest.raises(slurm.UnsatisfiableJob) as err:
            slurm.submit(script)
        assert err.value.cause == "array"
        assert (f"the array has {SMALL_ARRAYS + 1} tasks, more than the cluster's MaxArraySize ({SMALL_ARRAYS}) "
                "allows") in str(err.value)
        assert "can never be met" not in slurm.REFUSALS["array"]

    @pytest.mark.slow
    def test_a_sweep_larger_than_max_array_size_is_submitted_and_runs_to_the_end(self, tmp_path):
        """Before: sbatch refused the one array, "4 runs not submitted: their SLURM request can never be met",
        exit 2, none queued. Now the dry run says what the submission becomes, the sweep submits two chained
        arrays, every run finishes, and submitting again finds nothing to do."""
        base = tmp_path / "eval.yaml"
        base.write_text(f"base: {REPO / 'configs' / 'synthetic' / 'tiny.yaml'}\ntrain: {{epochs: 0, device: cpu}}\n")
        spec = tmp_path / "four.yaml"
        spec.write_text(f"base: {base}\ngrid: {{train.seed: [0, 1, 2, 3]}}\n"
                        "slurm: {cpus_per_task: 1, mem: 500M, time: '00:10:00', max_parallel: 2}\n")
        runs = tmp_path / "runs"

        def sweep(*args):
            return subprocess.run([sys.executable, "-m", "stitching.sweep", str(spec), "--launcher", "slurm",
                                   "--runs-dir", str(runs), *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

        dry = sweep("--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert ("slurm: 4 unfinished runs of block0 -> 2 job arrays of 3 + 1 tasks, chained (each waits for the one "
                "before: afterany) so that at most 2 run at once (max_parallel) (MaxArraySize 3: scontrol show "
                "config;") in " ".join(dry.stdout.split()), dry.stdout      # (wrapped at 120 columns)
        proc = sweep()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("slurm: submitted"))
        assert line.startswith("slurm: submitted 2 job arrays of 3 + 1 tasks, chained"), line
        jobs = line.split("job arrays ")[-1].split(", ")
        for job, n in zip(jobs, (3, 1)):
            states = slurm.wait_for(job.strip(), timeout_s=600, poll_s=1, n_tasks=n)
            assert set(states.values()) == {"COMPLETED"}, _logs(runs / "slurm")
        dirs = [p for p in runs.iterdir() if (p / "config.yaml").is_file()]
        assert len(dirs) == 4 and all((d / "result.csv").is_file() for d in dirs), _logs(runs / "slurm")
        assert "nothing to do: every run has finished" in sweep().stdout
