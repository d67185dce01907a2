"""Tests of stitching.data: the synthetic dataset, transforms, dataset building and seeded loaders."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from stitching.data.datasets import build_datasets
from stitching.data.loaders import build_loader
from stitching.data.seeding import set_epoch
from stitching.data.synthetic import MAX_CLASSES, SyntheticImages, class_factors
from stitching.data.transforms import data_config_for_size, eval_transform, train_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pixels(ds, index):
    return np.asarray(ds[index][0])


# --------------------------------------------------------------------------- SyntheticImages


def test_synthetic_is_a_pure_function_of_seed_split_index():
    a = SyntheticImages(num_classes=10, length=50, img_size=32, seed=3)
    b = SyntheticImages(num_classes=10, length=50, img_size=32, seed=3)
    forward = [_pixels(a, i) for i in range(10)]
    for i in reversed(range(10)):  # any access order, fresh instance, global RNG disturbed
        np.random.seed(i)
        torch.manual_seed(i)
        assert np.array_equal(_pixels(b, i), forward[i])
        assert np.array_equal(_pixels(a, i), forward[i])
    assert not np.array_equal(forward[0], forward[1])


def test_synthetic_seeds_and_splits_differ():
    base = SyntheticImages(length=20, img_size=32, seed=0, split="train")
    other_seed = SyntheticImages(length=20, img_size=32, seed=1, split="train")
    val = SyntheticImages(length=20, img_size=32, seed=0, split="val")
    for i in range(5):
        assert base[i][1] == other_seed[i][1] == val[i][1]  # same label ...
        assert not np.array_equal(_pixels(base, i), _pixels(other_seed, i))  # ... different image
        assert not np.array_equal(_pixels(base, i), _pixels(val, i))


def test_synthetic_labels_are_balanced():
    ds = SyntheticImages(num_classes=7, length=1003, img_size=16)
    counts = Counter(ds.targets)
    assert sorted(counts) == list(range(7))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert [ds[i][1] for i in range(20)] == ds.targets[:20]


@pytest.mark.parametrize("num_classes,img_size", [(2, 16), (10, 33), (1000, 64), (MAX_CLASSES, 224)])
def test_synthetic_any_num_classes_and_size(num_classes, img_size):
    ds = SyntheticImages(num_classes=num_classes, length=num_classes + 3, img_size=img_size)
    for index in (0, 1, num_classes - 1, num_classes + 2):
        image, label = ds[index]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (img_size, img_size)
        assert label == index % num_classes
        assert np.asarray(image).std() > 5  # not a blank image
    assert ds[-1][1] == ds[len(ds) - 1][1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_synthetic_classes_are_distinct_factor_combinations():
    combos = {class_factors(c) for c in range(MAX_CLASSES)}
    assert len(combos) == MAX_CLASSES >= 1000
    # a handful of classes already needs more than one cue: some share a colour family
    hues = [class_factors(c)[1] for c in range(10)]
    assert len(set(hues)) < 10


def test_synthetic_applies_transform():
    ds = SyntheticImages(length=4, img_size=32, transform=lambda im: torch.from_numpy(np.array(im)).sum())
    value, label = ds[1]
    assert isinstance(value, torch.Tensor) and label == 1


def test_synthetic_is_fast_at_64px():
    ds = SyntheticImages(num_classes=100, length=400, img_size=64)
    ds[0]
    start = time.perf_counter()
    for i in range(200):
        ds[i]
    per_image = (time.perf_counter() - start) / 200
    assert per_image < 0.01, f"{per_image * 1e3:.2f} ms per 64x64 image"  # ~0.4 ms on an idle core


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_classes=1),
        dict(num_classes=MAX_CLASSES + 1),
        dict(length=0),
        dict(img_size=15),
        dict(seed=-1),
        dict(split="training"),
        dict(num_classes=2.5),
        dict(transform="not callable"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticImages(**kwargs)


# --------------------------------------------------------------------------- transforms


def test_train_transform_output_shape_and_is_random():
    image = SyntheticImages(length=1, img_size=64)[0][0]
    tf = train_transform(48, IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(0)
    a, b = tf(image), tf(image)
    assert a.shape == b.shape == (3, 48, 48) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    plain = train_transform(40, (0.5,) * 3, (0.5,) * 3, auto_augment=False, interpolation="bicubic")
    assert plain(image).shape == (3, 40, 40)
    assert not any("AutoAugment" in type(t).__name__ for t in plain.transforms)
    assert any("AutoAugment" in type(t).__name__ for t in tf.transforms)
    with pytest.raises(ValueError):
        train_transform(48, IMAGENET_MEAN, IMAGENET_STD, interpolation="lanczos9")


def _data_config(mean, std, size=224, crop_pct=0.875):
    return dict(input_size=(3, size, size), interpolation="bicubic", mean=mean, std=std,
                crop_pct=crop_pct, crop_mode="center")


def test_eval_transform_honours_mean_std():
    image = SyntheticImages(length=1, img_size=96)[0][0]
    half = eval_transform(_data_config((0.5,) * 3, (0.5,) * 3, size=64))(image)
    imnet = eval_transform(_data_config(IMAGENET_MEAN, IMAGENET_STD, size=64))(image)
    assert half.shape == imnet.shape == (3, 64, 64)
    assert not torch.allclose(half, imnet, atol=1e-2)
    # same pixels underneath: undoing each normalisation gives the same image
    m, s = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(half * 0.5 + 0.5, imnet * s + m, atol=1e-5, rtol=0)


def test_eval_transform_from_a_timm_model_config():
    import timm

    model = timm.create_model("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=False, num_classes=0)
    config = timm.data.resolve_model_data_config(model)
    assert tuple(config["mean"]) == (0.5, 0.5, 0.5)
    tf = eval_transform(config)
    resize = tf.transforms[0]
    assert resize.size == int(224 / config["crop_pct"])  # crop_pct honoured
    image = SyntheticImages(length=1, img_size=300)[0][0]
    out = tf(image)
    assert out.shape == (3, 224, 224)
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6  # mean/std 0.5 maps [0, 1] -> [-1, 1]


def test_data_config_for_size():
    config = _data_config(IMAGENET_MEAN, IMAGENET_STD)
    small = data_config_for_size(config, 64)
    assert small["input_size"] == (3, 64, 64)
    assert config["input_size"] == (3, 224, 224)  # original untouched
    assert {k: v for k, v in small.items() if k != "input_size"} == {k: v for k, v in config.items() if k != "input_size"}
    image = SyntheticImages(length=1, img_size=80)[0][0]
    assert eval_transform(small)(image).shape == (3, 64, 64)


# --------------------------------------------------------------------------- build_datasets


def _data(**overrides):
    base = dict(name="synthetic", root=None, num_classes=4, train_size=40, val_size=12, img_size=32, seed=5)
    base.update(overrides)
    return SimpleNamespace(**base)


def test_build_datasets_synthetic():
    train, val = build_datasets(_data(), None, None)
    assert (len(train), len(val)) == (40, 12)
    assert (train.split, val.split) == ("train", "val")
    assert train.num_classes == val.num_classes == 4 and train.seed == val.seed == 5
    assert not np.array_equal(_pixels(train, 0), _pixels(val, 0))
    tf = eval_transform(_data_config((0.5,) * 3, (0.5,) * 3, size=24))
    _, val = build_datasets(_data(), None, tf)
    assert val[0][0].shape == (3, 24, 24)


def _write_image_tree(root, splits=("train", "val"), classes=("cat", "dog", "emu"), per_class=3):
    source = SyntheticImages(num_classes=len(classes), length=len(classes) * per_class, img_size=40)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                source[c + k * len(classes)][0].save(folder / f"{k}.jpg", quality=90)


def test_build_datasets_imagefolder(tmp_path):
    _write_image_tree(tmp_path)
    tf = eval_transform(_data_config(IMAGENET_MEAN, IMAGENET_STD, size=32))
    train, val = build_datasets(_data(name="imagefolder", root=str(tmp_path), num_classes=3), tf, tf)
    assert len(train) == len(val) == 9
    assert train.classes == val.classes == ["cat", "dog", "emu"]
    image, label = train[4]
    assert image.shape == (3, 32, 32) and label == 1


def test_build_datasets_imagefolder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_datasets(_data(name="imagefolder", root=str(missing)), None, None)
    _write_image_tree(tmp_path / "only_train", splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"only_train.val"):
        build_datasets(_data(name="imagefolder", root=str(tmp_path / "only_train"), num_classes=3), None, None)
    with pytest.raises(ValueError, match="root"):
        build_datasets(_data(name="imagefolder", root=None), None, None)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_datasets(_data(name="imagenet21k"), None, None)
    _write_image_tree(tmp_path / "tree", per_class=1)
    with pytest.raises(ValueError, match="num_classes"):
        build_datasets(_data(name="imagefolder", root=str(tmp_path / "tree"), num_classes=10), None, None)
    (tmp_path / "tree" / "val" / "cat").rename(tmp_path / "tree" / "val" / "cow")
    with pytest.raises(ValueError, match="differ"):
        build_datasets(_data(name="imagefolder", root=str(tmp_path / "tree"), num_classes=3), None, None)


# --------------------------------------------------------------------------- loaders


def _augmented_dataset():
    # label == index, so the labels of a batch spell out the sample order
    return SyntheticImages(num_classes=48, length=48, img_size=24, transform=train_transform(16, IMAGENET_MEAN, IMAGENET_STD))


def _run_epoch(loader, epoch):
    set_epoch(loader, epoch)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_set_epoch_makes_epochs_reproducible(workers):
    ds = _augmented_dataset()
    uninterrupted = build_loader(ds, batch_size=8, train=True, seed=7, workers=workers)
    epoch0 = _run_epoch(uninterrupted, 0)
    epoch1 = _run_epoch(uninterrupted, 1)
    resumed = build_loader(ds, batch_size=8, train=True, seed=7, workers=workers)
    resumed1 = _run_epoch(resumed, 1)  # epoch 1 without ever iterating epoch 0
    assert torch.equal(resumed1[1], epoch1[1])  # same order
    assert torch.equal(resumed1[0], epoch1[0])  # same augmentation
    assert not torch.equal(epoch0[1], epoch1[1])  # epochs are shuffled differently
    assert sorted(epoch1[1].tolist()) == list(range(48))
    # and each sample gets a fresh augmentation every epoch
    by_label0 = epoch0[0][epoch0[1].argsort()]
    by_label1 = epoch1[0][epoch1[1].argsort()]
    assert all(not torch.equal(a, b) for a, b in zip(by_label0, by_label1))
    other_seed = _run_epoch(build_loader(ds, batch_size=8, train=True, seed=8, workers=workers), 1)
    assert not torch.equal(other_seed[1], epoch1[1])


def test_set_epoch_fixes_the_order_without_epoch_seeding():
    ds = SyntheticImages(num_classes=40, length=40, img_size=16, transform=lambda im: 0)
    plain = build_loader(ds, batch_size=8, train=True, seed=4, workers=0, epoch_seeded=False)
    _run_epoch(plain, 0)
    epoch1 = _run_epoch(plain, 1)[1]
    fresh = build_loader(ds, batch_size=8, train=True, seed=4, workers=0, epoch_seeded=False)
    assert torch.equal(_run_epoch(fresh, 1)[1], epoch1)
    assert not torch.equal(_run_epoch(fresh, 2)[1], epoch1)


def test_batches_do_not_depend_on_worker_count():
    ds = _augmented_dataset()
    single = _run_epoch(build_loader(ds, batch_size=8, train=True, seed=3, workers=0), 2)
    multi = _run_epoch(build_loader(ds, batch_size=8, train=True, seed=3, workers=2), 2)
    assert torch.equal(single[1], multi[1]) and torch.equal(single[0], multi[0])


def test_loading_leaves_the_callers_rng_alone():
    loader = build_loader(_augmented_dataset(), batch_size=8, train=True, seed=0, workers=0)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    _run_epoch(loader, 0)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_eval_loader_is_sequential_and_keeps_every_sample():
    ds = SyntheticImages(num_classes=50, length=50, img_size=16, transform=lambda im: 0)
    loader = build_loader(ds, batch_size=8, train=False, seed=0, workers=0)
    set_epoch(loader, 3)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == list(range(50))  # no shuffling, no dropped last batch


def test_train_loader_drops_last_and_warns_without_set_epoch():
    ds = SyntheticImages(num_classes=50, length=50, img_size=16, transform=lambda im: 0)
    loader = build_loader(ds, batch_size=8, train=True, seed=0, workers=0)
    assert len(loader) == 6
    first = torch.cat([y for _, y in loader])
    assert len(first) == 48
    with pytest.warns(UserWarning, match="set_epoch"):
        second = torch.cat([y for _, y in loader])
    assert not torch.equal(first, second)  # advanced to epoch 1 by itself ...
    assert torch.equal(second, _run_epoch(loader, 1)[1])  # ... which equals an explicit epoch 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_epoch(loader, 2)


def test_distributed_sampler_shards_and_is_epoch_seeded():
    ds = SyntheticImages(num_classes=40, length=40, img_size=16, transform=lambda im: 0)
    shards = []
    for rank in range(2):
        loader = build_loader(ds, batch_size=4, train=True, seed=1, workers=0, rank=rank, world_size=2)
        shards.append(_run_epoch(loader, 1)[1])
        again = build_loader(ds, batch_size=4, train=True, seed=1, workers=0, rank=rank, world_size=2)
        assert torch.equal(_run_epoch(again, 1)[1], shards[-1])
    assert sorted(torch.cat(shards).tolist()) == list(range(40))


def test_build_loader_rejects_bad_arguments():
    ds = SyntheticImages(length=10, img_size=16)
    with pytest.raises(ValueError):
        build_loader(ds, batch_size=0, train=True, seed=0, workers=0)
    with pytest.raises(ValueError):
        build_loader(ds, batch_size=4, train=True, seed=0, workers=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no batches"):
        build_loader(ds, batch_size=16, train=True, seed=0, workers=0)


# --------------------------------------------------------------------------- learnability


def _arrays(split, n, num_classes=10, img_size=32):
    ds = SyntheticImages(num_classes=num_classes, length=n, img_size=img_size, seed=0, split=split)
    x = torch.from_numpy(np.stack([ds.render(i) for i in range(n)])).permute(0, 3, 1, 2).float().div(255)
    return x, torch.tensor(ds.targets)


def _fit(model, x, y, xv, yv, lr, max_epochs, target, batch_size=64):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    accuracy = 0.0
    for _ in range(max_epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(batch_size):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(xv).argmax(1) == yv).float().mean().item()
        if accuracy >= target:
            break
    return accuracy


def test_synthetic_is_learnable_by_a_small_cnn_but_not_by_a_linear_model():
    torch.manual_seed(0)
    x, y = _arrays("train", 3000)
    xv, yv = _arrays("val", 500)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, xv = (x - mean) / std, (xv - mean) / std

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    cnn = nn.Sequential(block(3, 24), block(24, 48), block(48, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))
    cnn_accuracy = _fit(cnn, x, y, xv, yv, lr=3e-3, max_epochs=12, target=0.75)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    linear_accuracy = _fit(linear, x, y, xv, yv, lr=1e-3, max_epochs=15, target=1.1, batch_size=256)
    assert cnn_accuracy > 0.6, f"small CNN reached only {cnn_accuracy:.2f} val accuracy (chance 0.10)"
    assert linear_accuracy < 0.6, f"a linear model on raw pixels reached {linear_accuracy:.2f}: dataset too easy"
    assert cnn_accuracy > linear_accuracy + 0.2


def test_start_at_resumes_mid_epoch_with_the_same_batches_without_loading_skipped_ones():
    from stitching.data.loaders import build_loader
    from stitching.data.seeding import set_epoch, start_at

    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.loaded = []

        def __len__(self):
            return 40

        def __getitem__(self, i):
            self.loaded.append(i)
            return torch.tensor([i])

    ds = Counting()
    loader = build_loader(ds, batch_size=4, train=True, seed=3, workers=0)
    set_epoch(loader, 2)
    full = [b.flatten().tolist() for b in loader]
    ds.loaded.clear()
    set_epoch(loader, 2)
    start_at(loader, 6)
    rest = [b.flatten().tolist() for b in loader]
    assert rest == full[6:]
    assert sorted(ds.loaded) == sorted(i for b in full[6:] for i in b)
