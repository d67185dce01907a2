"""Run a list of run directories on this machine, one after another or N at a time.

Each run is ``python -m stitching.train --run-dir DIR`` in its own process, its output appended to
``DIR/launcher.log``. With N > 1 and CUDA devices present, runs are spread over the devices through
``CUDA_VISIBLE_DEVICES``. SIGTERM/SIGINT to the launcher is forwarded to the running trainers (which
checkpoint and exit with 75); nothing new is started afterwards. Re-running the launcher resumes them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_local(run_dirs: list[str | Path], parallel: int = 1, python: str = sys.executable) -> dict[str, int]:
    """Run every directory; returns run dir -> exit code (0 done, 75 preempted, other = failed)."""
    pending = [Path(d) for d in run_dirs]
    running: dict[Path, tuple[subprocess.Popen, object, int | None]] = {}
    codes: dict[str, int] = {}
    stop = {"signal": None}
    gpus = _gpu_count()

    def handle(signum, frame):
        stop["signal"] = signum
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            while pending and len(running) < parallel and stop["signal"] is None:
                d = pending.pop(0)
                slot = _free_slot(running, parallel) if gpus >= parallel > 1 else None
                env = dict(os.environ)
                if parallel > 1 and gpus == 0 and "OMP_NUM_THREADS" not in env:
                    # N CPU runs at once: share the cores instead of oversubscribing them (3-12x slower)
                    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                log = open(d / "launcher.log", "a")
                print(f"[local] start {d}", flush=True)
                proc = subprocess.Popen([python, "-m", "stitching.train", "--run-dir", str(d)], stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
                running[d] = (proc, log, slot)
            if stop["signal"] is not None and not running:
                break
            for d, (proc, log, _) in list(running.items()):
                code = proc.poll()
                if code is not None:
                    log.close()
                    codes[str(d)] = code
                    del running[d]
                    state = {0: "done", 75: "preempted (checkpoint saved)"}.get(code, f"FAILED (exit {code})")
                    print(f"[local] {state}: {d}" + ("" if code in (0, 75) else f" -- see {d / 'launcher.log'}"),
                          flush=True)
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return codes


def _free_slot(running: dict, parallel: int) -> int:
    used = {slot for _, _, slot in running.values()}
    return next(i for i in range(parallel) if i not in used)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA: CPU runs
        return 0
