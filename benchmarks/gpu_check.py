"""The GPU check: every CUDA-only path of the framework exercised, and the GPU figures recorded, in one command.

On a node with a CUDA device, in well under ten minutes (each part has its own time limit, and a part that
fails does not stop the others):

1. ``tests``: ``pytest -m gpu`` -- the tests that need CUDA (tests/test_gpu.py: bf16 and fp16 autocast steps
   with folded BatchNorm and the gradient scaler, ``torch.compile``, fused AdamW written to a checkpoint and
   resumed after SIGTERM, nvJPEG decoding against the CPU's, normalisation on the device, a one-process NCCL
   group with a DDP step, the local launcher's GPU placement);
2. ``quickstart``: the README's quick start trained end to end on ``cuda`` (``train.precision: auto``);
3. ``keep_up``: ``benchmarks/keep_up.py`` on the GPU, which runs ``benchmarks/train_step.py`` (ResNet-50
   1 -> 3 and ResNet-50 1 -> Swin-T 3, bottleneck adapters, and each full destination model, at 224 px in the
   precision ``auto`` picks: bf16 from compute capability 8.0) and ``benchmarks/data.py`` with the trainer's
   default loader workers.

Every figure -- the device's name and capability, the tests' outcomes, the quick start's accuracy and
images/s, images/s stitched vs full and their peak memory, the loader's images/s and whether it keeps up --
goes to one JSON file (``--out``, default ``gpu_check.json``) and a short Markdown table beside it
(``.md``), also printed. Exit code 0 when every part passed, 1 when one failed, 2 for bad arguments.

On a machine without CUDA it checks its arguments, says so in one line and exits 0 (CI runs that).
``STITCHING_GPU_TESTS_ON_CPU=1`` rehearses every part on the CPU instead, at tiny sizes (the GPU tests on the
CPU, the quick start for one epoch, keep_up on ResNet-18 at 64 px): a check of this script's own logic.

    python benchmarks/gpu_check.py                          # on a GPU node
    python benchmarks/gpu_check.py --out /tmp/gpu.json --parts tests,quickstart
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from stitching import cli

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "quickstart", "keep_up")
LIMIT_S = {"tests": 300, "quickstart": 180, "keep_up": 300}     # each part's own time limit
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
REHEARSE = os.environ.get("STITCHING_GPU_TESTS_ON_CPU") == "1"      # every part on the CPU, tiny (see above)
DEVICE = "cpu" if REHEARSE else "cuda"
TINY_QUICKSTART = ["train.epochs=1", "data.train_size=256", "data.val_size=64"]
TINY_KEEP_UP = ["--batch-size", "4", "--img-size", "64", "--rounds", "1", "--source", "resnet18", "--steps", "2",
                "--warmup", "1", "--matmul-sizes", "64"]


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("python benchmarks/gpu_check.py", __doc__, [
        "python benchmarks/gpu_check.py --out gpu_check.json",
        "python benchmarks/gpu_check.py --parts tests,quickstart"],
        {0: "every part passed, or no CUDA device here (one line says so)", 1: "a part failed (the table says which)",
         2: "bad options"})
    p.add_argument("--out", default="gpu_check.json", help="the JSON file of figures (a .md table beside it)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers for keep_up (default: the trainer's default)")
    p.add_argument("--images", type=int, default=1024, help="JPEGs keep_up's loader benchmark generates")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        p.error(f"--parts={args.parts!r}: unknown part {bad[0]!r}" if bad else f"--parts={args.parts!r}: no part")
    args.parts = parts
    out = Path(args.out)
    if not out.parent.resolve().is_dir() or not os.access(out.parent.resolve(), os.W_OK):
        p.error(f"--out={args.out!r}: {out.parent} is not a writable directory")
    if out.is_dir():
        p.error(f"--out={args.out!r}: a directory, not a file")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers={args.workers}: must be >= 0")
    if args.images < 8:
        p.error(f"--images={args.images}: must be >= 8")
    return args


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _run(cmd: list[str], limit_s: int) -> tuple[int, str, float]:
    """``cmd`` in the repository root; (exit code, its output's last 4000 characters, wall seconds). A command
    over its limit is killed and reported with exit code 124."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=limit_s)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code = 124
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        out += f"\n[gpu_check] killed after {limit_s} s"
    return code, out[-4000:], round(time.monotonic() - t0, 1)


# ----------------------------------------------------------------------------------------------- parts
def part_tests(work: Path, args) -> dict:
    xml = work / "gpu-tests.xml"
    code, out, wall = _run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={xml}"], LIMIT_S["tests"])
    cases = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            seconds = float(case.get("time", 0))
            cases.append({"test": case.get("name"), "outcome": outcome, "seconds": round(seconds, 1)})
    passed = sum(c["outcome"] == "passed" for c in cases)
    ok = code == 0 and passed > 0 and passed == len(cases)
    return {"ok": ok, "exit_code": code, "wall_s": wall, "passed": passed, "total": len(cases), "cases": cases,
            **({} if ok else {"output_tail": out})}


def part_quickstart(work: Path, args) -> dict:
    run = work / "quickstart"
    code, out, wall = _run([sys.executable, "-m", "stitching.train", "--config", str(QUICKSTART),
                            f"train.device={DEVICE}", *(TINY_QUICKSTART if REHEARSE else []),
                            f"output.dir={run}"], LIMIT_S["quickstart"])
    result = run / "result.csv"
    row = next(csv.DictReader(result.open()), {}) if result.is_file() else {}
    keep = ("top1", "images_per_s", "wall_time_s", "precision", "device", "macs", "trainable_params")
    ok = code == 0 and bool(row)
    return {"ok": ok, "exit_code": code, "wall_s": wall, **{k: row.get(k) for k in keep},
            **({} if ok else {"output_tail": out})}


def part_keep_up(work: Path, args) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "keep_up.py"), "--device", DEVICE, "--images", str(args.images)]
    cmd += TINY_KEEP_UP if REHEARSE else []
    cmd += ["--workers", str(args.workers)] if args.workers is not None else []
    code, out, wall = _run(cmd, LIMIT_S["keep_up"])
    lines = out.strip().splitlines()
    try:
        summary = json.loads(lines[-1])
        step = json.loads(next(line for line in lines if line.startswith('{"stitch"')))
    except (IndexError, StopIteration, ValueError):
        return {"ok": False, "exit_code": code, "wall_s": wall, "output_tail": out}
    stitches = []
    for st, verdict in zip(step["stitches"], summary["stitches"]):
        stitches.append({"stitch": st["stitch"], "images_per_s": {"stitched": st["images_per_s"]["a"],
                                                                  "full": st["images_per_s"]["c"]},
                         "peak_mem_mb": {"stitched": st["peak_mem_mb"]["a"], "full": st["peak_mem_mb"]["c"]},
                         "speedup_vs_full": st["speedup_vs_full"], "headroom": verdict["headroom"],
                         "keeps_up": verdict["keeps_up"]})
    return {"ok": code == 0, "exit_code": code, "wall_s": wall, "precision": summary["precision"],
            "batch_size": summary["batch_size"], "img_size": summary["img_size"], "workers": summary["workers"],
            "loader_images_per_s": summary["loader_images_per_s"], "stitches": stitches}


RUNNERS = {"tests": part_tests, "quickstart": part_quickstart, "keep_up": part_keep_up}


# ---------------------------------------------------------------------------------------------- report
def table(report: dict) -> str:
    """The figures as a short Markdown table."""
    lines = [f"GPU check on {report['device_name']} (compute capability {report['capability']}), torch "
             f"{report['torch']}, CUDA {report['cuda']}: {'passed' if report['ok'] else 'FAILED'} in "
             f"{report['wall_s']:.0f} s", "", "| part | figure | value |", "| --- | --- | --- |"]
    parts = report["parts"]
    if "tests" in parts:
        t = parts["tests"]
        lines.append(f"| tests | passed (pytest -m gpu) | {t['passed']} of {t['total']} in {t['wall_s']:.0f} s |")
        lines += [f"| tests | {c['test']} | {c['outcome'].upper()} |" for c in t["cases"] if c["outcome"] != "passed"]
    if "quickstart" in parts:
        q = parts["quickstart"]
        lines.append(f"| quickstart | top-1 %, images/s, wall s | {q.get('top1')}, {q.get('images_per_s')}, "
                     f"{q.get('wall_time_s')} ({q.get('precision')}) |")
    if "keep_up" in parts and "stitches" in parts["keep_up"]:
        k = parts["keep_up"]
        loaders = ", ".join(f"{name} {rate:.0f}" for name, rate in k["loader_images_per_s"].items())
        lines.append(f"| loader | images/s at {k['workers']} workers | {loaders} |")
        for st in k["stitches"]:
            ips, mem = st["images_per_s"], st["peak_mem_mb"]
            lines.append(f"| {st['stitch']} | images/s stitched / full ({k['precision']}, batch {k['batch_size']}) "
                         f"| {ips['stitched']:.1f} / {ips['full']:.1f} ({st['speedup_vs_full']:.2f}x) |")
            lines.append(f"| {st['stitch']} | peak memory MB stitched / full | {mem['stitched']:.0f} / "
                         f"{mem['full']:.0f} |")
            lines.append(f"| {st['stitch']} | loader keeps up (framework / torchvision, stitched) | "
                         f"{st['keeps_up']['framework/stitched']} / {st['keeps_up']['torchvision/stitched']} |")
    for name, part in parts.items():
        if not part["ok"]:
            lines.append(f"| {name} | FAILED | exit {part['exit_code']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not REHEARSE:
        print(f"gpu_check: no CUDA device on this machine (torch {torch.__version__}); nothing to check here, "
              "run it on a GPU node")
        return 0
    t0 = time.monotonic()
    cap = (0, 0) if REHEARSE else torch.cuda.get_device_capability(0)
    report = {"device_name": "cpu (rehearsal)" if REHEARSE else torch.cuda.get_device_name(0),
              "capability": f"{cap[0]}.{cap[1]}",
              "torch": torch.__version__, "cuda": torch.version.cuda, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in args.parts:
            print(f"[gpu_check] {name} ...", flush=True)
            report["parts"][name] = part = RUNNERS[name](Path(tmp), args)
            print(f"[gpu_check] {name}: {'ok' if part['ok'] else 'FAILED'} in {part['wall_s']:.0f} s", flush=True)
            if not part["ok"]:
                print(part.get("output_tail", ""), flush=True)
    report["ok"] = all(p["ok"] for p in report["parts"].values())
    report["wall_s"] = round(time.monotonic() - t0, 1)
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = table(report)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(json.dumps({k: report[k] for k in ("device_name", "ok", "wall_s")}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
