"""Image files of every Pillow mode become 8-bit RGB by the range of their mode (stitching/data/images.py),
through both input pipelines, the trainer's CLI included; a file that cannot be converted is named in one line."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from stitching.data import pipeline as P
from stitching.data.images import BadImageError, load_image, open_image, to_rgb
from stitching.data.datasets import build_datasets
from stitching.data.loaders import build_loader
from stitching.data.seeding import set_epoch
from stitching.data.transforms import build_transforms
from stitching.rundir import EXIT_CONFIG
from tests.conftest import ROOT, together

H, W = 24, 40
RNG = np.random.default_rng(20)
U16 = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
U16[0, :6] = [0, 128, 129, 385, 386, 65535]     # round(v / 257) edges: 0, 0, 1, 1, 2, 255
U8 = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
UNIT = RNG.random((H, W)).astype(np.float32)
UNIT[0, :3] = [0.0, 1.0, 0.5]
PALETTE = RNG.integers(0, 256, (256, 3)).astype(np.uint8)


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(a, np.uint8)[..., None], 3, axis=2)


def _saved(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


def _palette_png(path: Path, transparency: bool) -> Path:
    img = Image.frombytes("P", (W, H), U8[..., 0].tobytes())   # indices: the first channel
    img.putpalette(PALETTE.reshape(-1).tolist())
    kw = {"transparency": bytes(RNG.integers(0, 256, 256).astype(np.uint8))} if transparency else {}
    return _saved(path, img, **kw)


def _pgm16(path: Path) -> Path:
    """A 16-bit PGM: Pillow opens it as mode I (32-bit integers holding 16-bit values)."""
    path.write_bytes(f"P5\n{W} {H}\n65535\n".encode() + U16.astype(">u2").tobytes())
    return path


def _unpremultiply(v: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Premultiplied colour -> straight colour (Pillow's arithmetic: floor(255 v / a), clipped; alpha 0 and 255
    keep v)."""
    v, a = v.astype(np.int64), a.astype(np.int64)[..., None] if v.ndim == 3 else a.astype(np.int64)
    out = np.where((a == 0) | (a == 255), v, np.minimum(255, 255 * v // np.maximum(a, 1)))
    return out.astype(np.uint8)


def _cmyk(c: np.ndarray) -> np.ndarray:
    """CMYK -> RGB: R = (255 - C)(255 - K) / 255, rounded (no ties: 255 is odd)."""
    c = c.astype(np.int64)
    return np.rint((255 - c[..., :3]) * (255 - c[..., 3:4]) / 255).astype(np.uint8)


SIXTEEN = np.rint(U16 / 257).astype(np.uint8)

# mode -> (make the file (or the image) under a folder, the expected 8-bit RGB pixels)
CASES = {
    "I;16 (16-bit PNG)": (lambda d: _saved(d / "a.png", Image.fromarray(U16)), lambda: _grey(SIXTEEN)),
    "I;16 (TIFF)": (lambda d: _saved(d / "a.tif", Image.fromarray(U16)), lambda: _grey(SIXTEEN)),
    "I;16B (TIFF)": (lambda d: _saved(d / "a.tif", Image.frombytes("I;16B", (W, H), U16.astype(">u2").tobytes())),
                     lambda: _grey(SIXTEEN)),
    "I;16L": (lambda d: Image.frombytes("I;16L", (W, H), U16.astype("<u2").tobytes()), lambda: _grey(SIXTEEN)),
    "I;16N": (lambda d: Image.frombytes("I;16N", (W, H), U16.astype("=u2").tobytes()), lambda: _grey(SIXTEEN)),
    "I (16-bit PGM)": (lambda d: _pgm16(d / "a.pgm"), lambda: _grey(SIXTEEN)),
    "I (TIFF)": (lambda d: _saved(d / "a.tif", Image.fromarray(U16.astype(np.int32))), lambda: _grey(SIXTEEN)),
    "F (float TIFF)": (lambda d: _saved(d / "a.tif", Image.fromarray(UNIT)),
                       lambda: _grey(np.rint(UNIT.astype(np.float64) * 255))),
    "P (palette PNG)": (lambda d: _palette_png(d / "a.png", False), lambda: PALETTE[U8[..., 0]]),
    "P (palette PNG with transparency)": (lambda d: _palette_png(d / "a.png", True), lambda: PALETTE[U8[..., 0]]),
    "CMYK (TIFF)": (lambda d: _saved(d / "a.tif", Image.frombytes("CMYK", (W, H), U8.tobytes())), lambda: _cmyk(U8)),
    "LA (PNG)": (lambda d: _saved(d / "a.png", Image.fromarray(U8[..., :2])), lambda: _grey(U8[..., 0])),
    "RGBA (PNG)": (lambda d: _saved(d / "a.png", Image.fromarray(U8)), lambda: U8[..., :3]),
    "La": (lambda d: Image.frombytes("La", (W, H), U8[..., :2].tobytes()),
           lambda: _grey(_unpremultiply(U8[..., 0], U8[..., 1]))),
    "RGBa": (lambda d: Image.frombytes("RGBa", (W, H), U8.tobytes()), lambda: _unpremultiply(U8[..., :3], U8[..., 3])),
    "1 (1-bit PNG)": (lambda d: _saved(d / "a.png", Image.fromarray(U8[..., 0] > 127)),
                      lambda: _grey(np.where(U8[..., 0] > 127, 255, 0))),
    "L (PNG)": (lambda d: _saved(d / "a.png", Image.fromarray(U8[..., 0])), lambda: _grey(U8[..., 0])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_becomes_the_expected_8bit_rgb_image(tmp_path, case):
    """Each mode, opened as each pipeline opens it (torchvision's loader decodes and converts; the fast pipeline
    opens lazily and decodes itself), gives exactly the expected 8-bit RGB pixels, without a warning."""
    make, expected = CASES[case]
    made = make(tmp_path)
    mode = case.split()[0]
    want = expected()
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # e.g. Pillow's "Palette images with Transparency ..." is not wanted
        if isinstance(made, Path):
            with Image.open(made) as opened:
                assert opened.mode == mode, "the file does not open in the mode this case is about"
            got = {"torchvision (load_image)": load_image(str(made)),
                   "fast (open_image + decode)": P._decode(open_image(str(made)), None)[0]}
        else:                              # a mode no file format Pillow writes opens as
            assert made.mode == mode
            got = {"to_rgb": to_rgb(made)}
    for where, img in got.items():
        assert img.mode == "RGB", where
        arr = np.asarray(img)
        assert arr.shape == want.shape and arr.dtype == np.uint8, where
        np.testing.assert_array_equal(arr, want, err_msg=f"{case} via {where}")


def test_a_mode_i_or_f_image_outside_its_range_is_a_named_error_not_clipped(tmp_path):
    floats = _saved(tmp_path / "floats0to255.tif", Image.fromarray((UNIT * 255).astype(np.float32)))
    nan = UNIT.copy()
    nan[3, 3] = np.nan
    nans = _saved(tmp_path / "nan.tif", Image.fromarray(nan))
    negative = _saved(tmp_path / "negative.tif", Image.fromarray(U16.astype(np.int32) - 5))
    for path, found in ((floats, r"mode F pixel values span \[0, 25\d(\.\d+)?\], outside its range 0\.\.1"),
                        (nans, r"mode F pixel values span .*nan.*, outside its range 0\.\.1"),
                        (negative, r"mode I pixel values span \[-5, \d+\], outside its range 0\.\.65535")):
        for opener in (load_image, lambda p: P._decode(open_image(p), None)):
            with pytest.raises(BadImageError) as err:
                opener(str(path))
            assert err.value.message.startswith(f"unreadable image file {path} (ValueError: "), err.value.message
            assert "\n" not in err.value.message
            assert re.search(found, err.value.message), err.value.message


# ------------------------------------------------------------------------------------ both pipelines
def _data(root: Path, **kw) -> SimpleNamespace:
    base = dict(name="imagefolder", root=str(root), num_classes=2, img_size=32, normalize="model", auto_augment=True,
                train_interpolation=None, min_crop_scale=0.08, auto_augment_interpolation=None, eval_crop_pct=None,
                eval_interpolation=None, pipeline="fast", decode="cpu", hflip=0.5, bad_images="error", seed=0)
    return SimpleNamespace(**{**base, **kw})


MODEL_CFG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
             "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
FOLDER_MODES = ["I;16 (16-bit PNG)", "I;16B (TIFF)", "I (16-bit PGM)", "F (float TIFF)",
                "P (palette PNG with transparency)", "CMYK (TIFF)", "RGBA (PNG)", "1 (1-bit PNG)"]


def _folders(tmp_path: Path, modes: list[str]) -> tuple[Path, Path]:
    """An ImageFolder of files in ``modes`` and its twin holding each file's expected 8-bit RGB pixels as a PNG
    (the same file names, so the same order and labels)."""
    odd, twin = tmp_path / "odd", tmp_path / "twin"
    for split in ("train", "val"):
        for c in range(2):
            for root in (odd, twin):
                (root / split / f"c{c}").mkdir(parents=True)
            for i, case in enumerate(modes):
                make, expected = CASES[case]
                made = make(tmp_path)
                name = f"{i:02d}{made.suffix}"
                made.rename(odd / split / f"c{c}" / name)
                Image.fromarray(expected()).save(twin / split / f"c{c}" / f"{name}.png")
    return odd, twin


def _batches(root: Path, pipeline: str, decode: str = "cpu") -> list[torch.Tensor]:
    """Every batch of one training epoch and of the evaluation pass, as normalised floats on the CPU."""
    data = _data(root, pipeline=pipeline, decode=decode)
    train_tf, eval_tf = build_transforms(MODEL_CFG, data, torch.device("cpu"))
    if decode == "gpu":        # the device half of data.decode: gpu, run on the CPU (no GPU needed to test it)
        train_tf, eval_tf = P.EncodedTrainTransform(train_tf), P.EncodedEvalTransform(eval_tf)
    train, val = build_datasets(data, train_tf, eval_tf)
    out = []
    for ds, tf, is_train in ((train, train_tf, True), (val, eval_tf, False)):
        loader = build_loader(ds, 4, is_train, 0, 0, pin_memory=False)
        set_epoch(loader, 0)
        prepare = P.batch_to_device(tf, torch.device("cpu"))
        out += [prepare(x, y)[0] for x, y in loader]
    return out


@pytest.mark.parametrize("pipeline,decode", [("fast", "cpu"), ("fast", "gpu"), ("torchvision", "cpu")])
def test_both_pipelines_see_odd_modes_as_their_8bit_rgb_twins(tmp_path, pipeline, decode):
    """Training (crop, flip, AutoAugment) and evaluation batches of an ImageFolder of 16-bit, float, palette,
    CMYK, RGBA and 1-bit files equal those of the same folder holding the expected 8-bit RGB PNGs, in the fast
    pipeline (CPU decoding and the device-decoding path) and in torchvision's."""
    odd, twin = _folders(tmp_path, FOLDER_MODES)
    got, want = _batches(odd, pipeline, decode), _batches(twin, pipeline, decode)
    assert len(got) == len(want) == 8          # 16 training and 16 validation images, batches of 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------------------------ the trainer's CLI
CLI = """\
model:
  source: resnet18
  source_stage: 1
  destination_stage: 3
  adapter: linear
  pretrained: false
data:
  name: imagefolder
  root: {root}
  img_size: 32
  num_classes: 2
  workers: 0
train:
  epochs: 1
  batch_size: 8
  device: cpu
  similarity_images: 8
"""


def _train(tmp_path: Path, root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"{out.name}.yaml"
    cfg.write_text(CLI.format(root=root))
    return subprocess.run([sys.executable, "-m", "stitching.train", "--config", str(cfg), f"output.dir={out}",
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _sixteen_bit_folders(tmp_path: Path) -> tuple[Path, Path]:
    """An ImageFolder of 16-bit greyscale PNGs (each its own content) and its twin of 8-bit RGB PNGs holding
    round(v / 257) of each."""
    odd, twin = tmp_path / "odd", tmp_path / "twin"
    rng = np.random.default_rng(7)
    for split in ("train", "val"):
        for c in range(2):
            for i in range(8):
                small = rng.integers(0, 65536, (4, 4)).astype(np.float64)
                v = np.asarray(Image.fromarray(small.astype(np.float32)).resize((W, H), Image.BILINEAR))
                v = np.clip(v + c * 9000, 0, 65535).astype(np.uint16)     # the classes differ in brightness
                for root, img in ((odd, Image.fromarray(v)), (twin, Image.fromarray(_grey(np.rint(v / 257))))):
                    (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
                    img.save(root / split / f"c{c}" / f"{i}.png")
    return odd, twin


@pytest.mark.slow
def test_cli_trains_on_16bit_pngs_as_on_their_8bit_twins_and_names_a_file_it_cannot_convert(tmp_path):
    """``python -m stitching.train`` on an ImageFolder of 16-bit greyscale PNGs gives the very numbers of the
    same folder converted to 8-bit, training, evaluation and the similarity at the join (before: Pillow's
    convert saturated them to white and the run exited 0); a float TIFF in 0..255 stops the run with one line
    naming the file and its range (exit 2)."""
    odd, twin = _sixteen_bit_folders(tmp_path)
    with Image.open(odd / "train" / "c0" / "0.png") as img:
        assert img.mode == "I;16"
    runs = {name: tmp_path / name for name in ("odd", "twin", "bad")}
    procs = together(lambda: _train(tmp_path, odd, runs["odd"]), lambda: _train(tmp_path, twin, runs["twin"]))
    for name, proc in zip(("odd", "twin"), procs):
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    rows = []
    for name in ("odd", "twin"):
        with (runs[name] / "result.csv").open() as f:
            row = next(csv.DictReader(f))
        rows.append({k: row[k] for k in ("train_loss", "top1", "val_loss", "cka_before", "cka_after")})
    assert all(v not in ("", "nan") for v in rows[0].values()), rows[0]
    assert rows[0] == rows[1]

    bad = odd / "train" / "c1" / "zz.tif"
    Image.fromarray((UNIT * 255).astype(np.float32)).save(bad)     # a file that cannot be converted
    proc = _train(tmp_path, odd, runs["bad"], "data.bad_images=error")
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error: " in ln]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "data.root=" in errors[0] and f"unreadable image file {bad} (ValueError: mode F pixel values span " \
        "[0, 255], outside its range 0..1" in errors[0] and "data.bad_images=skip" in errors[0], errors[0]
    assert not (runs["bad"] / "result.csv").exists()


def test_a_file_that_cannot_be_converted_is_skipped_and_counted_with_bad_images_skip(tmp_path, caplog):
    odd, _ = _folders(tmp_path, ["I;16 (16-bit PNG)"] * 2)
    bad = odd / "train" / "c1" / "zz.tif"
    Image.fromarray((UNIT * 255).astype(np.float32)).save(bad)
    data = _data(odd, bad_images="skip")
    train_tf, eval_tf = build_transforms(MODEL_CFG, data, torch.device("cpu"))
    train, _ = build_datasets(data, train_tf, eval_tf)
    loader = build_loader(train, 5, False, 0, 0, pin_memory=False)
    with caplog.at_level("WARNING", logger="stitching.train.data"):
        sizes = [len(y) for _, y in loader]
    assert sizes == [4] and loader.skipped_last_pass == 1
    assert f"1 unreadable file(s) left out of this pass over train; first: unreadable image file {bad}" in caplog.text
