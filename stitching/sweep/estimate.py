"""What a sweep costs before it runs: each run's compute, the GPU-hours at a stated rate, the wall time.

Owns the estimate that ``python -m stitching.sweep --dry-run`` and ``python -m stitching.matrix --dry-run`` print,
and the table of reference rates it uses (:data:`RATES`). It is an estimate, and says so.

The compute of a run (:func:`estimate_runs`), in MACs (the convention: ``docs/method.md``, "MACs"):

- *training*: one training image's step (:func:`stitching.train.objective.step_macs`: forward and backward of
  what trains -- a frozen prefix forward only, the adapters' forward pass and weight gradients, a frozen suffix's
  forward pass and input gradient; a fine-tuned or trained original model everything) under each epoch's loss,
  times the images an epoch trains on (``len(train) // train.batch_size`` steps of ``train.batch_size`` images,
  capped by ``train.max_steps_per_epoch``);
- *forward-only passes*: the evaluation after every epoch (one evaluation for ``train.epochs: 0``) over the whole
  validation set; the similarity at the join before and after training (``train.similarity_images`` validation
  images through the source's prefix and the destination's own network up to the join, after training the
  adapters too); the least-squares fit (``model.init: least_squares``: adapters + 1 passes of both frozen
  networks over ``model.init_images`` training images, an upper bound).

Image counts come from the data config (:func:`stitching.data.datasets.dataset_sizes`: the synthetic lengths, or
the files of an ImageFolder's ``root/train`` and ``root/val``, counted once per root). Where a root is not on this
machine, ``--images TRAIN,VAL`` gives the counts; without it a 1000-class ImageFolder is taken to be ImageNet-1k
(:data:`IMAGENET`; the output says so) and any other is left out of the sums (the output says how many runs).

GPU-hours: a GPU is quoted by the images per second at which it trains ResNet-50 whole at 224 px (the number
vendors publish and researchers know; ``--rate a100|v100`` takes it from :data:`RATES`, ``--rate N`` is yours).
That rate times ResNet-50's own training MACs per image (:func:`reference_macs`, counted by the same convention)
is the GPU's MACs per second, and every run is assumed to reach it: runs of other networks, small adapters and
attention reach other shares of a GPU, data loading can hold a fast stitched step back (``--loader-rate``
caps the images per second; ``benchmarks/keep_up.py`` measures what a node's loader delivers), and start-up,
checkpoints and requeues are not counted. The wall time (:func:`wall_time`) is the runs' GPU time spread over
the tasks running at once -- a SLURM job array's ``%`` throttle (``slurm.max_parallel``) with each task's GPUs,
or ``--parallel`` local runs -- and at least the longest run: if the cluster grants them. With ``--pack K`` a task
is a pack (:func:`jobs`, :func:`packed`): its runs one after another, less the frozen source prefix it runs once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from stitching.config import ConfigError
from stitching.data.datasets import dataset_sizes
from stitching.kinds import STITCHED
from stitching.stitch.cost import network_cost, stitch_cost
from stitching.sweep.packs import pack_runs, shared_prefix_macs
from stitching.train.objective import objective_at, step_macs

#: Images per second at which one GPU trains ResNet-50 whole (224 px), by the precision a run trains in
#: (``mixed``: ``train.precision`` auto, bf16 or fp16; ``fp32``: TF32 on the A100, as the trainer sets it).
RATES = {
    "a100": {"mixed": 2470.0, "fp32": 938.0},
    "v100": {"mixed": 1200.0, "fp32": 367.0},
}
RATES_SOURCE = ("NVIDIA's published single-GPU training throughput of ResNet-50 v1.5 in PyTorch (NVIDIA "
                "DeepLearningExamples, NGC container pytorch-21.03, batch 256; A100 80GB, V100 16GB)")
DEFAULT_RATE = "a100"
#: ImageNet-1k's training and validation images: the counts taken for a 1000-class ImageFolder not found here
IMAGENET = (1_281_167, 50_000)
#: the reference network of the rate
REFERENCE = "resnet50"


@dataclass(frozen=True)
class Rate:
    """How fast a GPU trains the reference network (ResNet-50 at 224 px), in images per second, by precision."""

    label: str
    images_per_s: dict
    source: str

    def for_run(self, cfg) -> float:
        return self.images_per_s["fp32" if cfg.train.precision == "fp32" else "mixed"]

    def describe(self) -> str:
        per = ", ".join(f"{v:g} {k}" for k, v in self.images_per_s.items()) \
            if len(set(self.images_per_s.values())) > 1 else f"{next(iter(self.images_per_s.values())):g}"
        return f"{self.label}: ResNet-50 (224 px) trains at {per} images/s per GPU ({self.source})"


def parse_rate(text: str | None) -> Rate:
    """``--rate``: a GPU of :data:`RATES` (``a100``, ``v100``) or images per second (a number > 0); ConfigError
    otherwise."""
    text = DEFAULT_RATE if text is None else str(text).strip()
    if text.lower() in RATES:
        return Rate(text.upper(), dict(RATES[text.lower()]), RATES_SOURCE)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ConfigError("--rate", text, "command line", "give a GPU (" + ", ".join(RATES) + ") or the images "
                          "per second at which one GPU trains ResNet-50 at 224 px (a number > 0)")
    return Rate("--rate", {"mixed": value, "fp32": value}, "as given")


def parse_images(text: str | None) -> tuple[int, int] | None:
    """``--images TRAIN,VAL``: the training and validation images of every ImageFolder run; ConfigError if not
    two counts > 0."""
    if text is None:
        return None
    parts = str(text).replace("_", "").split(",")
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise ConfigError("--images", text, "command line", "give the training and validation images as TRAIN,VAL "
                      "(e.g. 1281167,50000)")


def reference_macs() -> int:
    """MACs of one training image of ResNet-50 trained whole at 224 px with 1000 classes (what :class:`Rate`
    is quoted for)."""
    net = network_cost(REFERENCE, None, 224, 1000)
    return net.trained(range(len(net.blocks)))


@dataclass
class Estimate:
    """One run's estimated compute and GPU time. ``known`` is False where its image counts are unknown (an
    ImageFolder not found here, not 1000 classes, no ``--images``): then it is left out of every sum."""

    run: object
    train_images: int = 0          # images trained on, every epoch together
    train_macs: int = 0            # their forward and backward passes
    eval_images: int = 0           # images through forward-only passes (evaluation, similarity, least squares)
    eval_macs: int = 0
    gpu_hours: float = 0.0         # all of it, on one GPU
    known: bool = True
    train_hours: float = 0.0       # the training part of gpu_hours
    compute_hours: float = 0.0     # gpu_hours at the rate alone (no data loading cap)
    loader_hours: float = 0.0      # the images it reads at --loader-rate (0: no cap)
    shared_hours: float = 0.0      # its frozen source prefix's part of compute_hours (a pack runs it once)


@dataclass
class Estimates:
    """Every run's :class:`Estimate`, the rate, and what the output must say about the image counts."""

    runs: list[Estimate]
    rate: Rate
    notes: list[str] = field(default_factory=list)

    @property
    def unknown(self) -> list[Estimate]:
        return [e for e in self.runs if not e.known]


def _sizes(cfg, images: tuple[int, int] | None, cache: dict, notes: dict) -> tuple[int, int] | None:
    d = cfg.data
    if d.name == "imagefolder" and images is not None:
        return images
    key = (d.name, d.root, d.train_size, d.val_size)
    if key not in cache:
        try:
            cache[key] = dataset_sizes(d)
        except (FileNotFoundError, ValueError):
            if cfg.num_classes == 1000:
                notes[f"imagenet:{d.root}"] = (f"data.root={d.root} is not on this machine: its 1000 classes are "
                                               f"taken to be ImageNet-1k ({IMAGENET[0]:,} training / "
                                               f"{IMAGENET[1]:,} validation images; --images TRAIN,VAL says "
                                               "otherwise)")
                cache[key] = IMAGENET
            else:
                notes[f"unknown:{d.root}"] = (f"data.root={d.root} is not on this machine and its image counts are "
                                              "unknown: its runs are left out of the cost (--images TRAIN,VAL "
                                              "gives them)")
                cache[key] = None
    return cache[key]


def estimate_runs(runs, rate: Rate, images: tuple[int, int] | None = None,
                  loader_rate: float | None = None) -> Estimates:
    """The :class:`Estimate` of every run (``stitching.sweep.spec.Run``; each distinct network costed once), at
    ``rate``; ``images`` replaces every ImageFolder's counts; ``loader_rate`` (images/s) caps how fast a run
    can go (the GPU then waits for data)."""
    ref = reference_macs()
    out, cache, notes = [], {}, {}
    for run in runs:
        cfg = run.config
        sizes = _sizes(cfg, images, cache, notes)
        if sizes is None:
            out.append(Estimate(run, known=False))
            continue
        n_train, n_val = sizes
        m, t = cfg.model, cfg.train
        cost = stitch_cost(m, cfg.data.img_size, cfg.num_classes)
        steps = n_train // t.batch_size
        if t.max_steps_per_epoch:
            steps = min(steps, t.max_steps_per_epoch)
        per_epoch = steps * t.batch_size
        train_macs = sum(per_epoch * step_macs(cost, objective_at(cfg, e)) for e in range(t.epochs))
        evals = max(t.epochs, 1)
        eval_images, eval_macs = evals * n_val, evals * n_val * cost.forward
        if cost.kind == STITCHED and t.similarity_images > 0:         # before and after training
            n = min(t.similarity_images, n_val)
            eval_images += 2 * n
            eval_macs += n * (2 * (cost.prefix + cost.target) + cost.adapters.forward)
        if cost.kind == STITCHED and m.init == "least_squares":
            n = min(m.init_images, n_train)
            eval_images += (cost.num_adapters + 1) * n
            eval_macs += (cost.num_adapters + 1) * n * (cost.prefix + cost.target)
        macs_per_s = rate.for_run(cfg) * ref
        train_s, eval_s = train_macs / macs_per_s, eval_macs / macs_per_s
        compute_s = train_s + eval_s
        shared_s = shared_prefix_macs(cfg, cost) * (t.epochs * per_epoch + evals * n_val) / macs_per_s
        if loader_rate:
            train_s, eval_s = max(train_s, t.epochs * per_epoch / loader_rate), max(eval_s, eval_images / loader_rate)
        out.append(Estimate(run, t.epochs * per_epoch, train_macs, eval_images, eval_macs, (train_s + eval_s) / 3600,
                            train_hours=train_s / 3600, compute_hours=compute_s / 3600, shared_hours=shared_s / 3600,
                            loader_hours=(t.epochs * per_epoch + eval_images) / loader_rate / 3600 if loader_rate
                            else 0.0))
    return Estimates(out, rate, list(notes.values()))


def packed(ests: list[Estimate]) -> Estimate:
    """The estimate of a pack of runs (one launcher job, :mod:`stitching.sweep.packs`: one data pass, its runs'
    steps one after another on its GPUs): their compute, less the frozen source prefix that every run but the
    deepest would compute again, and at least the longest of their reading at ``--loader-rate`` (the data is read
    once). Its GPU-hours are what counts; the image and MAC counts are the runs' sums. A pack of one: its run's."""
    if len(ests) == 1 or not all(e.known for e in ests):
        return ests[0] if len(ests) == 1 else Estimate(ests[0].run, known=False)
    shared = [e.shared_hours for e in ests]
    compute = sum(e.compute_hours for e in ests) - (sum(shared) - max(shared))
    return Estimate(ests[0].run, *(sum(getattr(e, k) for e in ests) for k in ("train_images", "train_macs",
                                                                               "eval_images", "eval_macs")),
                    max(compute, *(e.loader_hours for e in ests)), compute_hours=compute,
                    train_hours=sum(e.train_hours for e in ests))


def jobs(ests: list[Estimate], k: int) -> list[Estimate]:
    """The launcher's jobs of ``ests``' runs with ``--pack k`` (:func:`stitching.sweep.packs.pack_runs`), each
    :func:`packed`; ``k`` 1: the runs themselves."""
    if k <= 1:
        return ests
    by_run = {id(e.run): e for e in ests}
    return [packed([by_run[id(r)] for r in pack]) for pack in pack_runs([e.run for e in ests], k)]


@dataclass(frozen=True)
class Wall:
    """The wall time of runs spread over ``tasks`` at a time (None: no throttle) of ``gpus`` GPUs each."""

    hours: float
    tasks: int | None
    gpus: int
    longest: float
    over_limit: int = 0          # runs estimated to outlast their task's time limit (they requeue themselves)
    limit: str = ""


def wall_time(groups: list[tuple[int | None, int, list[Estimate], float | None, str]]) -> Wall | None:
    """The wall time of the estimates in ``groups`` when the groups run side by side. A group is (tasks at a time
    or None, GPUs per task, its estimates, the task time limit in hours or None, that limit as written): one job
    array, or the local launcher. Per group: its runs' GPU-hours over its GPUs per task, spread over its tasks
    at a time, and at least its longest run; the slowest group, with the runs over their limit of every group.
    None without a run."""
    walls, over = [], 0
    for tasks, gpus, ests, limit, limit_text in groups:
        per_task = [e.gpu_hours / max(1, gpus) for e in ests if e.known]
        if not per_task:
            continue
        longest = max(per_task)
        walls.append(Wall(max(sum(per_task) / tasks, longest) if tasks else longest, tasks, max(1, gpus), longest,
                          0, limit_text))
        over += sum(h > limit for h in per_task) if limit else 0
    if not walls:
        return None
    return dataclasses.replace(max(walls, key=lambda w: w.hours), over_limit=over)


# ------------------------------------------------------------------------------------------- printing
def macs(value: float) -> str:
    return f"{value:.2e}" if value else "0"


def hours(value: float) -> str:
    if 0 < value < 0.005:
        return "<0.01"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def duration(h: float) -> str:
    """Hours as the largest sensible unit: ``3.2 days``, ``5.1 h``, ``12 min``."""
    if h >= 48:
        return f"{h / 24:.1f} days"
    if h >= 1:
        return f"{h:.1f} h"
    return f"{h * 60:.0f} min" if h >= 1 / 60 else "<1 min"


COLUMNS = ("runs", "train images", "train MACs", "eval MACs", "GPU-hours")


def _cells(ests: list[Estimate]) -> list[str]:
    known = [e for e in ests if e.known]
    return [f"{len(ests)}", f"{sum(e.train_images for e in known):,}", macs(sum(e.train_macs for e in known)),
            macs(sum(e.eval_macs for e in known)), hours(sum(e.gpu_hours for e in known))]


def cost_table(est: list[Estimate], groupings: list[tuple[str, callable]]) -> str:
    """One table: for each (title, key[, sort key]) of ``groupings`` a block of rows, one per key value (sorted,
    by the sort key where given; a run whose key is None is not in that block), then the total of every run: runs,
    images trained on, training MACs, forward-only MACs, GPU-hours."""
    if not est:
        return "(no runs)"
    indent = "  " if len(groupings) > 1 else ""
    rows: list[tuple[str, list[str] | None]] = []        # (label, cells); cells None: a block's title
    for title, key, *order in groupings:
        block: dict[str, list[Estimate]] = {}
        for e in est:
            if key(e.run) is not None:
                block.setdefault(key(e.run), []).append(e)
        if indent:
            rows.append((title, None))
        rows += [(indent + label, _cells(block[label])) for label in sorted(block, key=order[0] if order else None)]
    rows.append(("total", _cells(est)))
    label = max(len(r[0]) for r in rows) + 1
    widths = [max(len(h), *(len(c[k]) for _, c in rows if c)) + 2 for k, h in enumerate(COLUMNS)]
    lines = [" " * label + "".join(f"{h:>{w}}" for h, w in zip(COLUMNS, widths))]
    lines += [name if cells is None else f"{name:<{label}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths))
              for name, cells in rows]
    return "\n".join(lines)


def add_options(parser) -> None:
    """The cost options of the commands that print an estimate (``--dry-run``)."""
    parser.add_argument("--rate", metavar="GPU|IMAGES_PER_S", default=None,
                        help=f"GPU-hours at this rate: a GPU of the table ({', '.join(RATES)}; default "
                             f"{DEFAULT_RATE}) or the images/s at which your GPU trains ResNet-50 at 224 px")
    parser.add_argument("--images", metavar="TRAIN,VAL", default=None,
                        help="training and validation images of every ImageFolder run (default: counted from its "
                             "data.root; ImageNet-1k's for a 1000-class root that is not here)")
    parser.add_argument("--loader-rate", type=float, metavar="IMAGES_PER_S", default=None,
                        help="images/s a task's data loader delivers at most (default: not counted)")
