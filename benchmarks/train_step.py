"""Benchmark of one training step of a stitched model: the trainer's own step against the paper's way and full training.

For each stitch (defaults: ResNet-50 1->3 self-stitch and ResNet-50 1 -> Swin-T 3, bottleneck adapters with
bilinear resizing) it times, on synthetic tensors (random-init models, random images and labels):

(a) ``framework``: the trainer's own step -- :func:`stitching.train.step.build_step` (the module from
    :func:`stitching.stitch.fast.prepare_for_training`: frozen BatchNorms folded, channels-last per
    ``--channels-last``, ``--precision``, optional ``--compile``; AdamW over the trainable (adapter)
    parameters with the paper's lr/weight decay, the cosine schedule, the fp16 scaler) and
    :func:`stitching.train.step.train_step` (forward, loss, backward, optimizer and scheduler step, on-device
    metric sums); on CPU glibc's allocator keeps freed memory (:func:`~stitching.stitch.fast.tune_cpu_allocator`);
(b) ``baseline``: what a researcher writes, the way the paper's own code trains: the same modules
    deep-copied, the frozen parameters with ``requires_grad=False``, the *whole* model in train mode (frozen
    BatchNorms re-estimating their statistics), fp32, default (NCHW) layout, default allocator, AdamW over
    the adapters, a plain ``zero_grad / forward / cross_entropy / backward / step`` loop;
(c) ``full``: the whole destination model (random init) trained by the trainer's own step as it trains an
    original model (``build_step`` without folding: (a)'s layout, precision and allocator), AdamW on every
    weight.

Each variant runs in its own worker process (fresh allocator, its own peak memory). The workers are built
one after the other, then their steps are interleaved round-robin (a, b, c, a, b, c, ...): load from other
processes on a shared machine then hits all three alike. It prints ms/step (median over ``--steps`` timed
steps after ``--warmup`` untimed ones), images/s and peak memory for each, the ratios a/b and a/c, and the
share of the machine's dense matmul rate that each variant's work reaches. For (a) that work is the
*useful* work: prefix forward + 3 x adapters + 2 x suffix forward (adapters: forward, input and weight
gradients; suffix: forward and input gradients), in FLOPs (2 x MACs from
:func:`stitching.stitch.cost.count_cost`), times the batch size, per second; for (b) the same useful work,
for (c) 3 x the full model's forward.

The matmul rate is that of an ``N x N @ N x N`` product (``--matmul-sizes``; fp32, bf16 on CUDA with
``--precision bf16``), measured in the same run before the variants and again after every round, the best
seen: on CPU the best of ``torch.mm`` (MKL) and the same product as a 1x1 convolution (oneDNN, NCHW and
channels-last) -- on AMD CPUs MKL runs its AVX2 code and oneDNN's AVX-512 GEMM is about twice as fast, so
``torch.mm`` alone would understate the machine.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated``. On CPU, the worker's peak resident set (``VmHWM``
of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` once the model and optimizer are built;
``ru_maxrss`` where that is unavailable). ``peak_mem_mb`` is the training peak *above* the resident size
before the first step (activations, gradients, optimizer state, workspace); ``peak_total_mb`` the whole
process's peak (with the models themselves: (a) also holds the canonical model next to its folded copies of
the frozen parts).

The output ends with one JSON line: the first stitch's figures at top level (``ms_per_step``,
``images_per_s``, ``peak_mem_mb``, ``peak_total_mb`` with keys a/b/c, ``speedup_vs_baseline`` = b/a,
``speedup_vs_full`` = c/a, ``matmul_share``, ...) and every stitch under ``"stitches"``.

    python benchmarks/train_step.py                          # both default stitches, CPU, fp32
    python benchmarks/train_step.py --pair resnet50-1-3 --steps 10
    python benchmarks/train_step.py --source resnet50 --destination swin_t --source-stage 1 --destination-stage 4
    python benchmarks/train_step.py --device cuda --precision auto --batch-size 64

On CUDA, (a) and (c) get what the trainer sets (:mod:`stitching.train.perf`: cuDNN autotuning, TF32 for fp32
matmuls and convolutions, fused AdamW; ``--precision auto``: bf16 from compute capability 8.0, fp16 with a
gradient scaler below), and so does the reference matmul; (b) keeps torch's defaults, as a researcher's script
does. Each step is timed between two device synchronisations; the warm-up steps (cuDNN autotuning,
``--compile``'s compilation) are not timed.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from stitching import cli  # noqa: E402

PAIRS = {
    "resnet50-1-3": dict(source="resnet50", destination="resnet50", source_stage=1, destination_stage=3),
    "resnet50-swin_t-1-3": dict(source="resnet50", destination="swin_t", source_stage=1, destination_stage=3),
}
VARIANTS = {"a": "framework", "b": "baseline", "c": "full destination"}


def model_cfg(stitch: dict):
    """A config ``model`` section (the defaults otherwise) for a random-init stitch."""
    from stitching.config import ModelConfig

    return ModelConfig(source=stitch["source"], destination=stitch["destination"], source_stage=stitch["source_stage"],
                       destination_stage=stitch["destination_stage"], adapter=stitch["adapter"],
                       resize=stitch["resize"], pretrained=False)


# ------------------------------------------------------------------------------------------ the variants
def recipe(opts: dict):
    """A run config with the paper's recipe (defaults) and the benchmark's device options."""
    from stitching.config import Config

    cfg = Config()
    cfg.train.epochs = 1
    cfg.train.channels_last = opts["channels_last"]
    cfg.train.compile = opts["compile"]
    cfg.train.precision = opts["precision"]
    return cfg


def build_variant(variant: str, stitch: dict, opts: dict, device: torch.device):
    """A function running one optimizer step of variant a, b or c on ``(x, y)``."""
    from stitching.models.weights import load_model
    from stitching.stitch.stitcher import StitchedModel, build_model
    from stitching.kinds import ORIGINAL
    from stitching.train.step import build_step, train_step

    torch.manual_seed(0)
    steps = 10_000  # the schedule's length: far beyond the benchmark's steps
    if variant == "c":  # trained as the framework trains an original model
        model = load_model(stitch["destination"], False, None, 1000).to(device)
        st = build_step(model, recipe(opts), ORIGINAL, device, opts["precision"], 1, steps)
        return (lambda x, y: train_step(st, x, y, 0)), st.channels_last
    built = build_model(model_cfg(stitch), img_size=opts["img_size"])
    model = built.model.to(device)
    if variant == "a":
        st = build_step(model, recipe(opts), built.kind, device, opts["precision"], 1, steps)
        return (lambda x, y: train_step(st, x, y, 0)), st.channels_last
    # (b): as the paper's code trains: frozen weights without gradients, the whole model in train mode, fp32
    base = StitchedModel(copy.deepcopy(model.prefix), copy.deepcopy(model.adapters), copy.deepcopy(model.suffix),
                         frozen=False, plan=model.plan)
    del built, model
    base.prefix.requires_grad_(False)
    base.suffix.requires_grad_(False)
    base.train()
    optimizer = torch.optim.AdamW(base.adapters.parameters(), lr=0.002, weight_decay=0.05)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(base(x.to(device)), y.to(device)).backward()
        optimizer.step()

    return step, False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the training steps (see the module docstring for the method)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.base = (_status_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss"

    def stop(self) -> dict:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "ru_maxrss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        mb = 1024 * 1024
        return {"peak_mem_mb": max(0, peak - self.base) / mb, "peak_total_mb": peak / mb, "mem_method": self.method}


class Trainer:
    """One variant's training step on fixed synthetic tensors (run inside a worker process)."""

    def __init__(self, variant: str, stitch: dict, opts: dict):
        self.device = torch.device(opts["device"])
        self.run_step, self.channels_last = build_variant(variant, stitch, opts, self.device)
        g = torch.Generator().manual_seed(1)
        b, s = opts["batch_size"], opts["img_size"]
        self.x = torch.randn(b, 3, s, s, generator=g).to(self.device)
        self.y = torch.randint(0, 1000, (b,), generator=g).to(self.device)
        if self.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)

    def step(self) -> float:
        """One optimizer step; returns its wall time in ms."""
        t0 = time.perf_counter()
        self.run_step(self.x, self.y)
        _sync(self.device)
        return 1000 * (time.perf_counter() - t0)


def worker(job: dict) -> None:
    """Serve one variant over stdin/stdout: ``step`` -> ms of one step; ``stop`` -> peak memory; exit."""
    trainer = Trainer(job["variant"], job["stitch"], job["opts"])
    memory = PeakMemory(trainer.device)
    memory.start()
    print(json.dumps({"ready": True, "channels_last": trainer.channels_last}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(json.dumps({"ms": trainer.step()}), flush=True)
        else:
            print(json.dumps(memory.stop()), flush=True)
            return


class Worker:
    """The driver's handle on a worker process (a fresh process per variant: clean peak memory)."""

    def __init__(self, variant: str, stitch: dict, opts: dict):
        import tempfile

        self.variant, self.errors = variant, tempfile.TemporaryFile(mode="w+")
        job = json.dumps({"variant": variant, "stitch": stitch, "opts": opts})
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", job], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.errors, text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            raise RuntimeError(f"variant {self.variant} failed:\n{self.errors.read()[-4000:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> dict:
        out = self.ask("stop")
        self.proc.stdin.close()
        self.proc.wait()
        return out


# ---------------------------------------------------------------------------------------- the reference
def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rates(sizes: list[int], device: torch.device, dtype: torch.dtype = torch.float32,
                 repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a dense ``N x N @ N x N`` product (best median over ``sizes``), per implementation.

    ``mm``: ``torch.mm`` (MKL on CPU, cuBLAS on CUDA). On CPU also the same product as a 1x1 convolution of
    an ``N``-channel map with ``N`` pixels, NCHW and channels-last: oneDNN's GEMM, which on some CPUs (AMD)
    beats MKL's. The reference rate is the best of them.
    """
    rates: dict[str, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        found = {"mm": 2 * n ** 3 / _median_seconds(lambda: a @ b, device, repeats)}
        if device.type == "cpu":
            rows = max(1, n // 64)  # an N-channel map of rows x 64 pixels
            w = torch.randn(n, n, 1, 1, dtype=dtype)
            for name, fmt in (("conv1x1_nchw", torch.contiguous_format), ("conv1x1_nhwc", torch.channels_last)):
                x = torch.randn(1, n, rows, 64, dtype=dtype).contiguous(memory_format=fmt)
                wf = w.contiguous(memory_format=fmt)
                found[name] = 2 * n * n * rows * 64 / _median_seconds(lambda: F.conv2d(x, wf), device, repeats)
        for k, v in found.items():
            rates[k] = max(rates.get(k, 0.0), v)
    return rates


def useful_flops(stitch: dict, img_size: int) -> dict:
    """Per-image FLOPs of the parts (2 x MACs from ``count_cost``) and the useful work of one step."""
    from stitching.models.weights import load_model
    from stitching.stitch.cost import count_cost
    from stitching.stitch.stitcher import build_model

    model = build_model(model_cfg(stitch), img_size=img_size).model
    prefix = count_cost(copy.deepcopy(nn.Sequential(model.prefix)), img_size)["flops"]
    upto = count_cost(copy.deepcopy(nn.Sequential(model.prefix, model.adapters)), img_size)["flops"]
    total = count_cost(model, img_size)["flops"]
    full = count_cost(load_model(stitch["destination"], False, None, 1000), img_size)["flops"]
    adapters, suffix = upto - prefix, total - upto
    return {"prefix": prefix, "adapters": adapters, "suffix": suffix, "stitched_forward": total,
            "useful": prefix + 3 * adapters + 2 * suffix, "full_forward": full, "full_step": 3 * full}


# ---------------------------------------------------------------------------------------------- driver
def stitch_name(st: dict) -> str:
    return (f"{st['source']} {st['source_stage']} -> {st['destination']} {st['destination_stage']} "
            f"({st['adapter']}, {st['resize']})")


def bench_stitch(stitch: dict, opts: dict, probe) -> dict:
    """All three variants of one stitch, their steps interleaved round-robin (a, b, c, a, b, c, ...) so
    that load from other processes hits them alike; ``probe()`` (a short matmul-rate measurement) runs
    after every round. ``matmul_share`` is filled in by :func:`add_shares`."""
    flops = useful_flops(stitch, opts["img_size"])
    workers = {}
    for v in VARIANTS:  # built one after the other; idle workers wait on stdin
        workers[v] = Worker(v, stitch, opts)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(opts["warmup"] + opts["steps"]):
        for v, w in workers.items():
            ms = w.ask("step")["ms"]
            if i >= opts["warmup"]:
                times[v].append(ms)
        probe()
    res = {v: {**w.stop(), "channels_last": w.ready["channels_last"],
               "ms_per_step": statistics.median(times[v]), "ms_all": [round(t, 1) for t in times[v]]}
           for v, w in workers.items()}
    b = opts["batch_size"]
    ms = {v: res[v]["ms_per_step"] for v in VARIANTS}
    work = {"a": flops["useful"], "b": flops["useful"], "c": flops["full_step"]}
    rate = {v: work[v] * b / (ms[v] / 1000) for v in VARIANTS}
    return {
        "stitch": stitch_name(stitch), **{k: stitch[k] for k in ("source", "destination", "source_stage",
                                                                  "destination_stage", "adapter", "resize")},
        "ms_per_step": {v: round(ms[v], 1) for v in VARIANTS},
        "images_per_s": {v: round(b / (ms[v] / 1000), 2) for v in VARIANTS},
        "peak_mem_mb": {v: round(res[v]["peak_mem_mb"], 1) for v in VARIANTS},
        "peak_total_mb": {v: round(res[v]["peak_total_mb"], 1) for v in VARIANTS},
        "ms_all": {v: res[v]["ms_all"] for v in VARIANTS},
        "speedup_vs_baseline": round(ms["b"] / ms["a"], 3),
        "speedup_vs_full": round(ms["c"] / ms["a"], 3),
        "ratio_a_over_b": round(ms["a"] / ms["b"], 3),
        "ratio_a_over_c": round(ms["a"] / ms["c"], 3),
        "gflops": {v: round(rate[v] / 1e9, 1) for v in VARIANTS},
        "useful_gflop_per_step": round(flops["useful"] * b / 1e9, 2),
        "gflop_per_image": {k: round(v / 1e9, 4) for k, v in flops.items()},
        "channels_last": res["a"]["channels_last"], "mem_method": res["a"]["mem_method"],
    }


def add_shares(r: dict, rate: float) -> None:
    """The share of the matmul rate ``rate`` (FLOP/s) that each variant's work reaches ((a): useful work)."""
    r["matmul_share_by_variant"] = {v: round(g * 1e9 / rate, 3) for v, g in r["gflops"].items()}
    r["matmul_share"] = r["matmul_share_by_variant"]["a"]


def print_table(r: dict, rate: float) -> None:
    g = r["gflop_per_image"]
    print(f"\n== {r['stitch']}: useful work {r['useful_gflop_per_step']:.1f} GFLOP/step (per image: prefix "
          f"{g['prefix']:.3f}, adapters {g['adapters']:.3f}, suffix {g['suffix']:.3f}; full destination step "
          f"{g['full_step']:.3f})")
    print(f"{'variant':<22}{'ms/step':>10}{'images/s':>10}{'peak MB':>10}{'total MB':>10}"
          f"{'GFLOP/s':>10}{'matmul %':>10}   steps (ms)")
    for v, label in VARIANTS.items():
        print(f"({v}) {label:<18}{r['ms_per_step'][v]:>10.1f}{r['images_per_s'][v]:>10.2f}"
              f"{r['peak_mem_mb'][v]:>10.0f}{r['peak_total_mb'][v]:>10.0f}"
              f"{r['gflops'][v]:>10.1f}{100 * r['matmul_share_by_variant'][v]:>9.1f}%   "
              f"{r['ms_all'][v]}")
    print(f"a/b = {r['ratio_a_over_b']:.3f} (speedup vs baseline {r['speedup_vs_baseline']:.2f}x), "
          f"a/c = {r['ratio_a_over_c']:.3f} (speedup vs full {r['speedup_vs_full']:.2f}x), "
          f"useful work of (a) at {100 * r['matmul_share']:.1f}% of the {rate / 1e9:.1f} GFLOP/s matmul rate")


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("python benchmarks/train_step.py", __doc__, [
        "python benchmarks/train_step.py --pair all",
        "python benchmarks/train_step.py --source resnet18 --destination resnet18 --device cuda"],
        {0: "measured (the last line is the JSON)", 1: "--device cuda without a CUDA device", 2: "bad options"})
    p.add_argument("--pair", choices=["all", *PAIRS], default="all",
                   help="preset stitch(es) when --source is not given (default: all presets)")
    p.add_argument("--source", help="custom stitch: source model (registry name)")
    p.add_argument("--destination", help="custom stitch: destination (default: the source)")
    p.add_argument("--source-stage", type=int, default=1)
    p.add_argument("--destination-stage", type=int, default=3)
    p.add_argument("--adapter", default="bottleneck")
    p.add_argument("--resize", default="bilinear")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32",
                   help="precision of (a) and (c) (the trainer's autocast; auto: what train.precision: auto "
                        "picks on the device, stitching.train.perf.choose_precision); (b) is always fp32")
    p.add_argument("--channels-last", choices=["auto", "true", "false"], default="auto",
                   help="layout of (a) and (c); auto: stitching.stitch.fast.default_channels_last(device)")
    p.add_argument("--compile", action="store_true", help="torch.compile (a) and (c)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        if job["opts"]["threads"]:
            torch.set_num_threads(job["opts"]["threads"])
        worker(job)
        return
    from stitching.stitch.fast import default_channels_last
    from stitching.train import perf

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    device = torch.device(args.device)
    args.precision = perf.resolve_precision(args.precision, device)
    backends = perf.configure_backends(device)      # as the trainer sets them (the reference matmul too)
    channels_last = default_channels_last(device) if args.channels_last == "auto" else args.channels_last == "true"
    opts = {"device": args.device, "precision": args.precision, "channels_last": channels_last,
            "compile": args.compile, "batch_size": args.batch_size, "img_size": args.img_size,
            "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
    common = {"adapter": args.adapter, "resize": args.resize}
    if args.source:
        stitches = [dict(source=args.source, destination=args.destination or args.source,
                         source_stage=args.source_stage, destination_stage=args.destination_stage, **common)]
    else:
        names = list(PAIRS) if args.pair == "all" else [args.pair]
        stitches = [{**PAIRS[n], **common} for n in names]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} threads, precision "
          f"{args.precision}, channels_last {channels_last}, compile {args.compile}, batch {args.batch_size}, "
          f"{args.img_size} px, {args.warmup} warm-up + {args.steps} timed steps"
          + (f"; {', '.join(backends)}" if backends else ""))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32) \
        if device.type == "cuda" else torch.float32
    best = matmul_rates(args.matmul_sizes, device, dtype)
    print("matmul rate before (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in best.items()))

    def probe() -> None:  # the rate again between rounds: the reference is the best seen in the run
        for k, v in matmul_rates(args.matmul_sizes[:1], device, dtype, repeats=3).items():
            best[k] = max(best[k], v)

    results = [bench_stitch(st, opts, probe) for st in stitches]
    rate = max(best.values())
    print(f"reference dense matmul rate: {rate / 1e9:.1f} GFLOP/s ({max(best, key=best.get)}, {dtype}; best of "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in best.items()) + ")")
    for r in results:
        add_shares(r, rate)
        print_table(r, rate)
    first = results[0]
    summary = {k: first[k] for k in ("stitch", "ms_per_step", "images_per_s", "peak_mem_mb", "peak_total_mb",
                                     "speedup_vs_baseline", "speedup_vs_full", "matmul_share")}
    summary.update({"matmul_gflops": round(rate / 1e9, 1),
                    "matmul_gflops_by_kind": {k: round(v / 1e9, 1) for k, v in best.items()},
                    "device": args.device, "device_name": name, "precision": args.precision,
                    "channels_last": channels_last, "compile": args.compile, "batch_size": args.batch_size,
                    "img_size": args.img_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "mem_method": first["mem_method"], "stitches": results})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
