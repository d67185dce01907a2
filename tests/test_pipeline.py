"""The fast input pipeline (``data.pipeline: fast``, ``data.decode``; stitching/data/pipeline.py) and loader sizing.

- Same seed -> the same crop box, flip and AutoAugment operations as torchvision's pipeline
  (``transforms.train_transform``), pixel for pixel where no reduced decode happens.
- Crop area and aspect-ratio distributions of the fast pipeline and torchvision's, read back from the output
  of a coordinate-coded JPEG, agree (two-sample Kolmogorov-Smirnov), and the same test rejects a pipeline
  drawing from another scale range.
- Reduced-size (DCT-scaled) decoding keeps the crop region.
- Evaluation: uint8 batches normalised on the device equal the float pipeline's output.
- ``data.decode: gpu``: the CPU half (undecoded samples, list batches), the device half run on the CPU, the
  fallback line where CUDA is missing.
- Loader workers default from the job's CPUs; evaluation workers are not persistent; pin_memory as asked.
- The real CLI trains on a generated ImageFolder of JPEGs, with identical numbers for 0 and 2 workers.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from stitching.data import pipeline as P
from stitching.data.datasets import build_datasets
from stitching.data.loaders import build_loader, default_workers
from stitching.data.seeding import set_epoch
from stitching.data.transforms import build_transforms, eval_transform, train_transform
from tests.conftest import ROOT, together

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth photo-like content (low-frequency colour noise plus an edge): resizes are well defined."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    arr = np.asarray(img).copy()
    arr[:, width // 3: width // 3 + 4] = 255
    return Image.fromarray(arr)


def _jpeg(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, quality=kw.pop("quality", 95), **kw)
    return path


def _data(**kw) -> SimpleNamespace:
    base = dict(img_size=64, normalize="model", auto_augment=True, train_interpolation=None, min_crop_scale=0.08,
                auto_augment_interpolation=None, eval_crop_pct=None, eval_interpolation=None, pipeline="fast",
                decode="cpu", hflip=0.5)
    return SimpleNamespace(**{**base, **kw})


def _model_cfg(size: int, interpolation: str = "bicubic") -> dict:
    return {"input_size": (3, size, size), "interpolation": interpolation, "mean": MEAN, "std": STD,
            "crop_pct": 0.875, "crop_mode": "center"}


# ------------------------------------------------------------------------------ same draws as torchvision
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_same_seed_gives_torchvisions_crop_flip_and_autoaugment(tmp_path, interpolation):
    """At 224 px from a 500x375 JPEG no box allows a reduced decode: the fast pipeline's output is
    torchvision's to within two grey levels (uint8 resize vs PIL's rounding) without AutoAugment, and with it
    the random generator is left in the same state (the same draws: box, flip, operations)."""
    path = _jpeg(tmp_path / "a.jpg", _photo(500, 375, 0))
    std = torch.tensor(STD).view(3, 1, 1)
    for auto_augment in (False, True):
        ref = train_transform(224, MEAN, STD, auto_augment=auto_augment, interpolation=interpolation)
        fast = P.FastTrainTransform(224, MEAN, STD, interpolation=InterpolationMode(interpolation),
                                    auto_augment=auto_augment, cpu_float=True)
        mean_diffs = []
        for seed in range(10):
            torch.manual_seed(seed)
            a = ref(Image.open(path).convert("RGB"))
            after_a = torch.rand(1)
            torch.manual_seed(seed)
            b = fast(Image.open(path))
            assert torch.equal(torch.rand(1), after_a)                   # the same random draws
            assert b.shape == a.shape == (3, 224, 224) and b.dtype == torch.float32
            diff = (a - b).abs() * std * 255
            mean_diffs.append(diff.mean().item())
            if not auto_augment:
                assert diff.max() <= 2.01 and diff.mean() < 0.2, (seed, diff.max())   # same box, same flip
        # with AutoAugment a one-level difference can cross a solarize/posterize threshold now and then
        assert np.median(mean_diffs) < 0.5, mean_diffs


def test_hflip_sets_the_flip_probability_with_the_same_draws(tmp_path):
    """data.hflip = 0 never mirrors (digits), 1 always does; both pipelines draw the flip either way, so the
    random stream, and with it every crop box, is the paper's (hflip 0.5) one."""
    path = _coordinate_jpeg(tmp_path / "ramp.jpg", 96, 80)
    for hflip, expect in ((0.0, {False}), (1.0, {True}), (0.5, {False, True})):
        flipped, states = set(), []
        for make in (lambda: P.FastTrainTransform(32, MEAN, STD, auto_augment=False, hflip=hflip),
                     lambda: train_transform(32, MEAN, STD, auto_augment=False, hflip=hflip)):
            tf = make()
            for seed in range(12):
                torch.manual_seed(seed)
                img = tf(Image.open(path).convert("RGB"))
                red = img[:, :, 0] if img.dtype == torch.uint8 else img[0]
                flipped.add(bool(red[:, 0].float().mean() > red[:, -1].float().mean()))
                states.append(torch.rand(1).item())
        assert flipped == expect, hflip
        assert states[:12] == states[12:]                      # the same draws in both pipelines
        if hflip == 0.5:
            reference = states
        else:
            hflip_states = states
    assert reference == hflip_states                           # and for every probability


# ------------------------------------------------------------------------------ the crop distribution
def _coordinate_jpeg(path: Path, width: int, height: int) -> Path:
    """R encodes x, G encodes y (linear ramps), 4:4:4 at quality 100: a crop's box can be read back."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    arr = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    return _jpeg(path, Image.fromarray(arr), quality=100, subsampling=0)


def _boxes(transform, path: Path, seeds: range, width: int, height: int, size: int) -> np.ndarray:
    """(area fraction, aspect ratio w/h) of the crop each seed's output shows (flip undone)."""
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        img = transform(Image.open(path))
        arr = img.numpy().astype(np.float64) if img.dtype == torch.uint8 else None
        if arr is None:                                    # torchvision: (3, H, W) float in [0, 1]
            arr = img.permute(1, 2, 0).numpy() * 255.0
        xs = arr[:, :, 0].mean(0)                          # R along the columns
        ys = arr[:, :, 1].mean(1)                          # G along the rows
        # the ramp's value at the outer pixel centres, extrapolated half a pixel to the box edges
        x0, x1 = sorted((xs[0] - (xs[1] - xs[0]) / 2, xs[-1] + (xs[-1] - xs[-2]) / 2))
        y0, y1 = ys[0] - (ys[1] - ys[0]) / 2, ys[-1] + (ys[-1] - ys[-2]) / 2
        w, h = (x1 - x0) / 255 * (width - 1), (y1 - y0) / 255 * (height - 1)
        out.append((w * h / (width * height), w / h))
    return np.asarray(out)


def _ks(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and the critical value at alpha = 0.001."""
    grid = np.sort(np.concatenate([a, b]))
    d = np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
               - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()
    return float(d), 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


@pytest.mark.slow
def test_crop_area_and_aspect_distributions_match_torchvisions_and_the_test_can_fail(tmp_path):
    width, height, size, n = 640, 480, 64, 1200
    path = _coordinate_jpeg(tmp_path / "coords.jpg", width, height)
    ref = train_transform(size, MEAN, STD, auto_augment=False, interpolation="bilinear")
    ref = type(ref)(ref.transforms[:-2] + [__import__("torchvision").transforms.ToTensor()])   # no Normalize

    def tv(img):
        return ref(img.convert("RGB"))

    fast = P.FastTrainTransform(size, MEAN, STD, auto_augment=False)
    other = P.FastTrainTransform(size, MEAN, STD, auto_augment=False, scale=(0.25, 1.0))
    b = _boxes(tv, path, range(n), width, height, size)
    a = _boxes(fast.uint8, path, range(n, 2 * n), width, height, size)    # independent draws
    c = _boxes(other.uint8, path, range(n, 2 * n), width, height, size)
    # the read-back is right: area fractions within torchvision's scale range, aspect within its ratio range
    assert b[:, 0].min() > 0.07 and b[:, 0].max() < 1.02 and b[:, 1].min() > 0.72 and b[:, 1].max() < 1.38
    for col in (0, 1):                                      # area fraction, aspect ratio
        d, crit = _ks(a[:, col], b[:, col])
        assert d < crit, (col, d, crit)
    d, crit = _ks(c[:, 0], b[:, 0])                          # a scale range of (0.25, 1): rejected
    assert d > 3 * crit, (d, crit)
    # histograms (10 bins of the area fraction) agree too, bin by bin within 3 standard errors
    ha, _ = np.histogram(a[:, 0], bins=10, range=(0.08, 1.0))
    hb, _ = np.histogram(b[:, 0], bins=10, range=(0.08, 1.0))
    assert np.all(np.abs(ha - hb) <= 3 * np.sqrt(ha + hb + 1)), (ha, hb)


def test_reduced_size_decoding_keeps_the_crop_region(tmp_path, monkeypatch):
    width, height, size = 1600, 1200, 96
    coords = _coordinate_jpeg(tmp_path / "coords.jpg", width, height)
    photo = _jpeg(tmp_path / "photo.jpg", _photo(width, height, 1))
    assert P.draft_scale((400, 500), (96, 96)) == 4 and P.draft_scale((150, 900), (96, 96)) == 1
    scales = []
    decode = P._decode_pixels

    def spy(img, scale):
        out = decode(img, scale)
        scales.append(out[1])
        return out

    monkeypatch.setattr(P, "_decode_pixels", spy)
    drafted = P.FastTrainTransform(size, MEAN, STD, auto_augment=False)
    full = P.FastTrainTransform(size, MEAN, STD, auto_augment=False, draft=False)
    seeds = range(40)
    a = _boxes(drafted.uint8, coords, seeds, width, height, size)
    assert sum(s > 1 for s in scales) >= 30 and set(scales) <= {1, 2, 4, 8}     # most decodes were reduced
    b = _boxes(full.uint8, coords, seeds, width, height, size)
    assert np.allclose(a, b, rtol=0.02, atol=0.002), np.abs(a - b).max(0)
    for seed in seeds:                                     # and the pixels of a photo barely change
        torch.manual_seed(seed)
        x = drafted.uint8(Image.open(photo)).float()
        torch.manual_seed(seed)
        y = full.uint8(Image.open(photo)).float()
        assert (x - y).abs().mean() < 2.0


def test_simplejpeg_decodes_the_pixels_pillow_does_and_pillow_stands_in_without_it(tmp_path, monkeypatch):
    """The optional ``simplejpeg`` decoder (``fast-jpeg`` extra) gives Pillow's pixels for full-size RGB and
    greyscale JPEGs, so the training output is the same either way; a truncated JPEG is named; without
    simplejpeg Pillow decodes."""
    simplejpeg = pytest.importorskip("simplejpeg")
    assert P.simplejpeg is simplejpeg
    rgb = _jpeg(tmp_path / "rgb.jpg", _photo(801, 601, 3), quality=90)
    grey = _jpeg(tmp_path / "grey.jpg", _photo(500, 375, 4).convert("L"), quality=90)
    for path in (rgb, grey):
        fast, s = P._decode_pixels(Image.open(path), 1)
        monkeypatch.setattr(P, "simplejpeg", None)
        ref, s_ref = P._decode_pixels(Image.open(path), 1)
        monkeypatch.setattr(P, "simplejpeg", simplejpeg)
        assert isinstance(fast, np.ndarray) and isinstance(ref, Image.Image) and s == s_ref == 1
        ref = np.asarray(ref)
        assert fast.shape == ref.shape and fast.dtype == np.uint8, path
        assert np.abs(fast.astype(int) - ref).max() <= 1, path              # the same IDCT and upsampling
    tf = P.FastTrainTransform(224, MEAN, STD, auto_augment=True)
    for seed in range(3):                                  # the whole transform: the same output either way
        torch.manual_seed(seed)
        a = tf(Image.open(rgb))
        monkeypatch.setattr(P, "simplejpeg", None)
        torch.manual_seed(seed)
        b = tf(Image.open(rgb))
        monkeypatch.setattr(P, "simplejpeg", simplejpeg)
        assert (a.float() - b.float()).abs().mean() < 0.05
    data = rgb.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    from stitching.data.images import BadImageError
    with pytest.raises(BadImageError, match="cut.jpg"):
        tf(Image.open(tmp_path / "cut.jpg"))


# ------------------------------------------------------------------------------ evaluation, on the device
def test_eval_uint8_batches_normalised_on_the_device_equal_the_float_pipeline(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i, (w, h) in enumerate([(500, 375), (333, 500), (640, 427)]):
                _jpeg(root / split / f"c{c}" / f"{i}.jpg", _photo(w, h, 10 * c + i), quality=90)
    data = _data(name="imagefolder", root=str(root), num_classes=2, img_size=224, bad_images="error", seed=0)
    fast_train, fast_eval = build_transforms(_model_cfg(224), data, torch.device("cpu"))
    assert isinstance(fast_eval, P.FastEvalTransform)
    reference = eval_transform(_model_cfg(224))             # timm's, float on the CPU
    _, val = build_datasets(data, fast_train, fast_eval)
    loader = build_loader(val, 3, False, 0, 0, pin_memory=False)
    prepare = P.batch_to_device(fast_eval, torch.device("cpu"))
    got, want = [], []
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape[1:] == (224, 224, 3)
        x, y = prepare(x, y)
        assert x.is_contiguous(memory_format=torch.channels_last)
        got.append(x)
    for path, _ in val.samples:
        want.append(reference(Image.open(path).convert("RGB")))
    torch.testing.assert_close(torch.cat(got), torch.stack(want), atol=1e-5, rtol=1e-5)

    # a large photo is decoded at 1/2 (its shorter side still >= the resize target): nearly the same pixels
    big = _jpeg(tmp_path / "big.jpg", _photo(1200, 900, 3), quality=90)
    x = fast_eval.normalize(fast_eval(Image.open(big))[None])[0]
    ref = reference(Image.open(big).convert("RGB"))
    assert ((x - ref).abs() * torch.tensor(STD).view(3, 1, 1) * 255).mean() < 1.0


def test_synthetic_data_takes_the_uint8_path_and_the_torchvision_pipeline_stays_selectable():
    from stitching.data.synthetic import SyntheticImages

    fast_train, fast_eval = build_transforms(_model_cfg(32), _data(img_size=32), torch.device("cpu"))
    ds = SyntheticImages(num_classes=3, length=8, img_size=32, transform=fast_train)
    x, _ = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (32, 32, 3)
    plain_train, plain_eval = build_transforms(_model_cfg(32), _data(img_size=32, pipeline="torchvision"),
                                               torch.device("cpu"))
    assert plain_train(Image.fromarray(ds.render(0))).dtype == torch.float32
    no_device_train, _ = build_transforms(_model_cfg(32), _data(img_size=32))    # other callers: float out
    assert no_device_train(Image.fromarray(ds.render(0))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="pipeline"):
        build_transforms(_model_cfg(32), _data(pipeline="dali"))


# ------------------------------------------------------------------------------ decode on the GPU (CPU side)
def test_gpu_decode_falls_back_to_the_cpu_in_one_line_without_cuda():
    # a handler on the logger itself, whether or not a trainer run earlier in this process stopped
    # "stitching.train" from propagating to the root logger (its own log file takes the records)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("stitching.train.data")
    logger.addHandler(handler)
    try:
        train, ev = build_transforms(_model_cfg(32), _data(img_size=32, decode="gpu"), torch.device("cpu"))
    finally:
        logger.removeHandler(handler)
    assert isinstance(train, P.FastTrainTransform) and isinstance(ev, P.FastEvalTransform)
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1 and "data.decode=gpu" in lines[0] and "CPU" in lines[0]


def test_undecoded_samples_batch_as_lists_and_decode_on_the_device_like_the_cpu_pipeline(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                _jpeg(root / split / f"c{c}" / f"{i}.jpg", _photo(420 + 20 * i, 320, 10 * c + i), quality=90)
        Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(root / split / "c1" / "x.png")   # not a JPEG
    data = _data(name="imagefolder", root=str(root), num_classes=2, img_size=96, bad_images="error", seed=0)
    fast_train, fast_eval = build_transforms(_model_cfg(96), data, torch.device("cpu"))
    encoded = (P.EncodedTrainTransform(fast_train), P.EncodedEvalTransform(fast_eval))
    train, val = build_datasets(data, *encoded)
    loader = build_loader(train, 7, True, 0, 0)
    set_epoch(loader, 0)
    (samples, labels), = list(loader)
    assert isinstance(samples, list) and len(samples) == 7 and labels.shape == (7,)
    assert all(isinstance(s, P.EncodedSample) for s in samples)
    assert sum(s.data is None for s in samples) == 1                 # the PNG was decoded on the CPU
    x, y = P.batch_to_device(encoded[0], torch.device("cpu"))(samples, labels)   # the device half, on the CPU
    assert x.shape == (7, 3, 96, 96) and x.dtype == torch.float32
    # the same samples through the CPU pipeline (same per-sample seeds): same crops, flips and operations
    cpu_train, _ = build_datasets(data, fast_train, fast_eval)
    cpu_loader = build_loader(cpu_train, 7, True, 0, 0)
    set_epoch(cpu_loader, 0)
    (cx, cy), = list(cpu_loader)
    assert torch.equal(cy, y)
    cx = fast_train.normalize(cx)
    diff = ((cx - x).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255).mean((1, 2, 3))
    assert diff.max() < 4.0, diff                                   # tensor vs PIL ops: a few levels at most
    # evaluation
    vloader = build_loader(val, 7, False, 0, 0)
    (vs, vl), = list(vloader)
    vx, _ = P.batch_to_device(encoded[1], torch.device("cpu"))(vs, vl)
    ref = torch.stack([fast_eval.normalize(fast_eval(Image.open(p))[None])[0] for p, _ in val.samples])
    assert ((vx - ref).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255).mean() < 2.0


# ------------------------------------------------------------------------------ workers sized to the job
def test_workers_default_from_the_jobs_cpus(monkeypatch):
    assert default_workers({"SLURM_CPUS_PER_TASK": "8"}) == 7
    assert default_workers({"SLURM_CPUS_PER_TASK": "16", "LOCAL_WORLD_SIZE": "4"}) == 3
    assert default_workers({}, cpus=1) == 0
    assert default_workers({}) == len(os.sched_getaffinity(0)) - 1
    from stitching.data.synthetic import SyntheticImages

    ds = SyntheticImages(num_classes=2, length=8, img_size=16)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    train = build_loader(ds, 2, True, 0, None, pin_memory=True)
    val = build_loader(ds, 2, False, 0, None, pin_memory=False)
    assert train.num_workers == val.num_workers == 3
    assert train.persistent_workers and not val.persistent_workers
    assert train.pin_memory and not val.pin_memory


def test_pipeline_and_decode_keys_are_validated(tmp_path):
    from stitching.config import ConfigError
    from stitching.validate import load_config

    (tmp_path / "c.yaml").write_text("data:\n  pipeline: dali\n")
    with pytest.raises(ConfigError, match="data.pipeline"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("data:\n  pipeline: torchvision\n  decode: gpu\n")
    with pytest.raises(ConfigError, match="data.decode"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("data:\n  decode: nvjpeg\n")
    with pytest.raises(ConfigError, match="data.decode"):
        load_config(tmp_path / "c.yaml")


# ------------------------------------------------------------------------------ the real CLI on JPEGs
CLI = """\
model:
  source: resnet18
  source_stage: 1
  destination_stage: 3
  adapter: bottleneck
  pretrained: false
data:
  name: imagefolder
  root: {root}
  img_size: 32
  num_classes: 2
train:
  epochs: 1
  batch_size: 8
  log_every: 1
  device: cpu
  similarity_images: 8
"""


@pytest.mark.slow
def test_cli_trains_on_a_generated_imagefolder_of_jpegs_same_numbers_for_any_workers(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 12), ("val", 4)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                _jpeg(root / split / f"c{c}" / f"{i}.jpg", _photo(120 + 10 * i, 90, 100 * c + i), quality=90)
    (tmp_path / "run.yaml").write_text(CLI.format(root=root))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = []
    procs = together(*(lambda workers=workers: subprocess.run(
        [sys.executable, "-m", "stitching.train", "--config", str(tmp_path / "run.yaml"), f"data.workers={workers}",
         f"output.dir={tmp_path / f'run{workers}'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        for workers in (0, 2)))                                     # side by side: independent runs
    for workers, proc in zip((0, 2), procs):
        out = tmp_path / f"run{workers}"
        assert proc.returncode == 0, proc.stderr[-3000:]
        with (out / "metrics.csv").open() as f:
            row = list(csv.DictReader(f))[-1]
        assert float(row["train_loss"]) > 0 and 0 <= float(row["top1"]) <= 100
        metrics.append({k: row[k] for k in ("train_loss", "train_top1", "top1", "val_loss")})
    assert metrics[0] == metrics[1]


def test_a_corrupt_jpeg_decoded_on_the_device_is_named(tmp_path):
    from stitching.data.images import BadImageError

    good = _jpeg(tmp_path / "good.jpg", _photo(200, 150, 0))
    data = good.read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[:200] + bytes(len(data) - 200))          # header intact, scan data zeroed
    fast_train, _ = build_transforms(_model_cfg(64), _data(img_size=64, auto_augment=False), torch.device("cpu"))
    encode = P.EncodedTrainTransform(fast_train)
    samples = [encode(Image.open(good)), encode(Image.open(bad))]
    with pytest.raises(BadImageError, match="bad.jpg"):
        P.GpuDecode(encode, torch.device("cpu"))(samples)
