"""The papers' claims, judged on results tables whose answer is known (stitching.plots.claims)."""

from __future__ import annotations

import pandas as pd

from stitching.matrix.cells import TABLE_COLUMNS
from stitching.plots.claims import claims_markdown, matrix_patterns, stage_claims
from stitching.results.collect import normalize_columns

R, V = "resnet18", "vit_tiny_patch16_224"


def _row(source, destination, s, t, adapter, resize, seed, top1, macs=1e8, kind="stitched", lr=0.002):
    return {"run_id": f"{source}-{destination}-{s}-{t}-{adapter}-{resize}-{seed}-{lr}", "kind": kind,
            "source": source, "destination": destination, "source_stage": s, "destination_stage": t,
            "adapter": adapter, "resize": resize, "lr": lr, "seed": seed, "top1": top1, "macs": macs}


def _results(linear_12=70.0, strided_13=(88.0, 89.0), vit_14=(60.0, 62.0)) -> pd.DataFrame:
    rows = [_row(R, None, None, None, None, None, 0, 97.0, 4e8, kind="original"),
            _row(V, None, None, None, None, None, 0, 93.0, 1e9, kind="original")]
    for seed, d in enumerate((0.0, 1.0)):
        rows += [
            _row(R, R, 1, 2, "bottleneck", "bilinear", seed, 80.0 + d, 3e8),
            _row(R, R, 1, 2, "linear", "bilinear", seed, linear_12 + d, 2.8e8),
            _row(R, R, 1, 3, "bottleneck", "bilinear", seed, 93.0 + d, 2e8),
            _row(R, R, 1, 3, "linear", "bilinear", seed, 81.0 + d, 1.9e8),
            _row(R, R, 1, 3, "bottleneck", "strided", seed, strided_13[seed], 2e8),
            _row(R, V, 1, 4, "bottleneck", "bilinear", seed, vit_14[seed], 1.5e8),
            _row(R, R, 1, 4, "bottleneck", "bilinear", seed, 92.0 + d, 1.2e8),
            _row(V, V, 1, 4, "linear", "none", seed, 95.0 + d, 6e8),
            _row(V, R, 1, 4, "bottleneck", "bilinear", seed, 90.0 + d, 3e8),
        ]
    return normalize_columns(pd.DataFrame(rows))


def _by_name(claims):
    return {c.name: c for c in claims}


def test_stage_claims_hold_where_the_numbers_say_so():
    claims = _by_name(stage_claims(_results()))
    assert claims["bottleneck >= linear"].verdict == "holds"
    assert (claims["bottleneck >= linear"].holding, claims["bottleneck >= linear"].total) == (2, 2)
    assert claims["separate >= integrated"].line().startswith("separate >= integrated: holds (1 of 1)")
    worst = claims["ViT destination worst"]
    # ResNet-18 1 -> 4: into the ViT 61 against 92.5 into itself (the ViT sender's own 95.5 vs 90.5 into ResNet is
    # the ViT with itself, not a ViT stitched on top of another architecture: not counted)
    assert (worst.holding, worst.total) == (1, 1) and worst.verdict == "holds"
    assert set(worst.rows["source"]) == {R}
    vit_row = worst.rows[worst.rows["source"] == R].iloc[0]
    assert abs(vit_row["difference"] - 31.5) < 1e-9 and vit_row["holds"] == "yes"
    front = claims["one front"]
    assert set(front.rows["destination"]) == {R, V}
    off = front.rows[(front.rows["source"] == R) & (front.rows["destination"] == V)].iloc[0]
    assert bool(off["into_vit"]) and off["median_below"] > 3
    text = claims_markdown(list(claims.values()), "study")
    assert "**bottleneck >= linear: holds (2 of 2)**" in text and "| resnet18 |" in text


def test_a_reversal_is_reported_and_told_apart_from_noise():
    # linear beats bottleneck at 1 -> 2 by 15 points: beyond noise
    claims = _by_name(stage_claims(_results(linear_12=95.0)))
    c = claims["bottleneck >= linear"]
    assert c.verdict == "does not hold" and (c.holding, c.total) == (1, 2)
    assert "no" in set(c.rows["holds"]) and "within" not in c.note
    # integrated ahead by 0.5 points with a spread of 10 between seeds: a reversal within two standard errors
    c = _by_name(stage_claims(_results(strided_13=(89.0, 99.0))))["separate >= integrated"]
    assert c.verdict == "does not hold" and c.rows["holds"].iloc[0] == "no (within 2 s.e.)"
    assert "1 reversal(s) within 2 s.e." in c.note


def _cells(control, values, sender_depths=(0.25, 0.5, 0.75), receiver_depths=(0.25, 0.5, 0.75)):
    rows = []
    for i, ds in enumerate(sender_depths):
        for j, dr in enumerate(receiver_depths):
            rows.append({"control": control, "sender_cut": i, "receiver_cut": j, "sender": R, "receiver": V,
                         "sender_depth": ds, "receiver_depth": dr, "depth_difference": dr - ds,
                         "top1_mean": values[i][j], "top1_se": 0.5, "n": 2, "run_dirs": ""})
    return rows


def test_matrix_patterns_of_hernandez_et_al():
    lower_left = [[90, 40, 20], [95, 90, 40], [96, 95, 90]]           # backwards cells high
    late_late = [[10, 10, 10], [10, 10, 12], [10, 12, 80]]
    early = [[70, 10, 10], [75, 12, 10], [80, 11, 10]]
    flat = [[10, 11, 9], [10, 10, 11], [9, 10, 10]]
    table = pd.DataFrame(_cells("none", lower_left) + _cells("destination", late_late) + _cells("source", early)
                         + _cells("both", flat), columns=TABLE_COLUMNS)
    patterns = _by_name(matrix_patterns(table))
    assert all(c.verdict == "holds" for c in patterns.values()), [c.line() for c in patterns.values()]
    assert "backwards 95.3, same depth 90.0, skipping 33.3" in patterns["trained: deeper sender beats shallower"].note
    # the opposite matrices: the patterns are reported absent
    table = pd.DataFrame(_cells("none", [list(r) for r in zip(*lower_left)]) + _cells("destination", flat)
                         + _cells("source", late_late) + _cells("both", lower_left), columns=TABLE_COLUMNS)
    patterns = _by_name(matrix_patterns(table))
    assert all(c.verdict == "does not hold" for c in patterns.values()), [c.line() for c in patterns.values()]
    # a matrix without controls: those patterns have no data
    only = _by_name(matrix_patterns(pd.DataFrame(_cells("none", lower_left), columns=TABLE_COLUMNS)))
    assert only["both random: all low"].verdict == "no data"
