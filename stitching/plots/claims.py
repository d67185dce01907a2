"""The papers' qualitative claims, checked one by one on measured results.

Owns the claims and the rule each is judged by, so a study states the same thing the same way from any
results table:

- :func:`stage_claims` -- on a collected sweep (``python -m stitching.collect``), at the training options'
  defaults, mean over seeds per scenario (:func:`stitching.plots.aggregate.prepare` / ``aggregate``):

  1. ``bottleneck >= linear``: at every gap a bottleneck adapter stitches at least as well as a linear one;
  2. ``separate >= integrated``: a separate (bilinear) downsample is at least as good as the integrated
     (strided) one, for the same adapter and gap;
  3. ``vit destination worst``: for every sender of another architecture and every gap, the best stitch into
     the ViT is below the best stitch into every other receiver, in top-1 and in top-1 as a fraction of the
     receiver's own accuracy (the paper: "especially where ViT is stitched on top of another architecture";
     a ViT sender's stitch into a ViT is the ViT with itself, not counted);
  4. ``one front``: every pairing's best stitches (bottleneck where it exists) lie within
     :data:`FRONT_POINTS` top-1 points of the accuracy-vs-MACs front of all pairings, except those into a
     ViT.

- :func:`matrix_patterns` -- on a stitching matrix's cell table (``matrix.csv`` of ``python -m
  stitching.matrix``), the patterns Hernandez et al. describe for trained and random-init networks (rows
  the sender, columns the receiver; "deeper sender" = the cut's relative depth in the sender exceeds the
  receiver's, the lower-left triangle of a same-shape matrix):

  1. both random: every cell low (below :data:`HIGH` of the trained matrix's best) and near uniform;
  2. random receiver: only late sender layers into late receiver layers are high;
  3. random sender: only stitches into early receiver layers are high;
  4. trained: stitches from a deeper sender (backwards) beat those from a shallower one (skipping).

A comparison is counted as holding where the difference has the claimed sign; where it does not, the
report says whether the reversal is within two standard errors of the difference (noise) or beyond. Each
claim's verdict is ``holds`` (every comparison), ``mostly`` (more than half), ``does not hold``, or ``no
data``. The thresholds are here, in one place, and printed with the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stitching.kinds import BOTTLENECK, LINEAR, STITCHED, TRAINED_KINDS

#: a pairing is "on the front" when its best stitches are within this many top-1 points of it
FRONT_POINTS = 3.0
#: a matrix cell is "high" at this fraction of the trained matrix's best cell or more
HIGH = 0.5
#: a pattern "appears" when the contrast it names is at least this many top-1 points
CONTRAST_POINTS = 5.0
#: the columns naming a pairing's gap
GAP = ["source", "destination", "source_stage", "destination_stage"]


@dataclass
class Claim:
    """One claim: its statement, the comparisons it rests on (a table), how many hold, and the verdict."""

    name: str
    statement: str
    rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    holding: int = 0
    total: int = 0
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.total == 0:
            return "no data"
        if self.holding == self.total:
            return "holds"
        return "mostly" if self.holding > self.total / 2 else "does not hold"

    def line(self) -> str:
        count = f" ({self.holding} of {self.total})" if self.total else ""
        return f"{self.name}: {self.verdict}{count}" + (f"; {self.note}" if self.note else "")


def _verdicts(diff: pd.Series, se: pd.Series) -> pd.Series:
    noise = 2 * se.fillna(0.0)
    return np.where(diff >= 0, "yes", np.where(-diff <= noise, "no (within 2 s.e.)", "no"))


def _compare(a: pd.DataFrame, b: pd.DataFrame, keys: list[str], a_name: str, b_name: str) -> pd.DataFrame:
    """Scenario pairs (a, b) on ``keys``: both top-1s, their difference a - b and its standard error."""
    cols = keys + ["top1_mean", "top1_se", "n"]
    both = a[cols].merge(b[cols], on=keys, suffixes=(f"_{a_name}", f"_{b_name}"))
    both["difference"] = both[f"top1_mean_{a_name}"] - both[f"top1_mean_{b_name}"]
    both["difference_se"] = np.sqrt(both[f"top1_se_{a_name}"].fillna(0) ** 2 + both[f"top1_se_{b_name}"].fillna(0) ** 2)
    both["holds"] = _verdicts(both["difference"], both["difference_se"])
    return both


def _claim_from(name: str, statement: str, rows: pd.DataFrame, note: str = "") -> Claim:
    held = int((rows["holds"] == "yes").sum()) if len(rows) else 0
    within = int((rows["holds"] == "no (within 2 s.e.)").sum()) if len(rows) else 0
    if within:
        note = (note + "; " if note else "") + f"{within} reversal(s) within 2 s.e."
    return Claim(name, statement, rows, held, len(rows), note)


def scenarios(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stitched and fine-tuned scenarios at the options' defaults, originals) of a collected results table:
    mean, standard error and count over seeds; rows shared between resize modes are marked ``shared``."""
    from stitching.plots.aggregate import SCENARIO_KEYS, aggregate, originals, prepare
    from stitching.plots.options import at_defaults
    from stitching.results.recipe import group_columns

    rows = prepare(at_defaults(df))
    own = aggregate(rows[~rows["resize_shared"].astype(bool)])
    every = aggregate(rows)
    keys = SCENARIO_KEYS + group_columns(rows)            # aggregate's own keys: one row per scenario and recipe
    marked = every.merge(own[keys], on=keys, how="left", indicator=True)
    every["shared"] = (marked["_merge"] == "left_only").to_numpy()     # only copies from another resize mode
    return every[every["kind"].isin(TRAINED_KINDS)].reset_index(drop=True), originals(df)


def bottleneck_vs_linear(sc: pd.DataFrame) -> Claim:
    st = sc[(sc["kind"] == STITCHED)]
    keys = GAP + ["resize"]
    b, lin = BOTTLENECK.name, LINEAR.name
    rows = _compare(st[st["adapter"] == b], st[st["adapter"] == lin], keys, b, lin)
    # a gap compared once per resize mode where the modes build one module (shared rows) counts once
    rows = rows.drop_duplicates(GAP + [f"top1_mean_{b}", f"top1_mean_{lin}"])
    return _claim_from("bottleneck >= linear", "a bottleneck adapter stitches at least as well as a linear one, "
                       "at every gap (same pair, gap and resize)", rows)


def separate_vs_integrated(sc: pd.DataFrame) -> Claim:
    st = sc[(sc["kind"] == STITCHED) & ~sc["shared"]]
    keys = GAP + ["adapter"]
    rows = _compare(st[st["resize"] == "bilinear"], st[st["resize"] == "strided"], keys, "separate", "integrated")
    return _claim_from("separate >= integrated", "a separate (bilinear) downsample stitches at least as well as "
                       "the integrated (strided) one, same adapter and gap (gaps where both build one module "
                       "left out)", rows)


def _best_per_pairing(sc: pd.DataFrame) -> pd.DataFrame:
    st = sc[sc["kind"] == STITCHED].sort_values("top1_mean", ascending=False, kind="stable")
    return st.drop_duplicates(GAP).reset_index(drop=True)


def _is_vit(name) -> bool:
    return str(name).startswith("vit")


def vit_destination_worst(sc: pd.DataFrame, orig: pd.DataFrame) -> Claim:
    best = _best_per_pairing(sc)
    own = dict(zip(orig["model"], orig["top1_mean"])) if len(orig) else {}
    best["relative"] = best.apply(lambda r: r["top1_mean"] / own[r["destination"]] if own.get(r["destination"])
                                  else np.nan, axis=1)
    rows = []
    for (source, s, t), group in best.groupby(["source", "source_stage", "destination_stage"]):
        if _is_vit(source):
            continue
        vit = group[group["destination"].map(_is_vit)]
        other = group[~group["destination"].map(_is_vit)]
        if vit.empty or other.empty:
            continue
        v, o = vit.iloc[0], other.sort_values("top1_mean").iloc[0]
        diff = o["top1_mean"] - v["top1_mean"]
        se = float(np.sqrt(np.nan_to_num(v["top1_se"]) ** 2 + np.nan_to_num(o["top1_se"]) ** 2))
        rows.append({"source": source, "source_stage": s, "destination_stage": t, "vit": v["destination"],
                     "top1_vit": v["top1_mean"], "method_vit": v["method"], "other": o["destination"],
                     "top1_other": o["top1_mean"], "method_other": o["method"], "difference": diff,
                     "difference_se": se, "relative_vit": v["relative"], "relative_other": o["relative"],
                     "holds_relative": "yes" if v["relative"] <= o["relative"] else "no"})
    table = pd.DataFrame(rows)
    if len(table):
        table["holds"] = _verdicts(table["difference"], table["difference_se"])
        both = int(((table["holds"] == "yes") & (table["holds_relative"] == "yes")).sum())
        note = f"{both} of {len(table)} also relative to the receiver's own accuracy"
    else:
        note = ""
    return _claim_from("ViT destination worst", "for every sender of another architecture and every gap, the best "
                       "stitch into the ViT is below the best stitch into any other receiver", table, note)


def one_front(sc: pd.DataFrame, points: float = FRONT_POINTS) -> Claim:
    best = _best_per_pairing(sc)
    if best.empty:
        return Claim("one front", "")
    macs, top1 = best["macs_mean"].to_numpy(float), best["top1_mean"].to_numpy(float)
    # the front at a point: the best top-1 any pairing reaches at no more MACs
    front = np.array([top1[macs <= m + 1e-9].max() for m in macs])
    best["below_front"] = front - top1
    pairs = best.groupby(["source", "destination"]).agg(points=("below_front", "size"),
                                                        median_below=("below_front", "median"),
                                                        max_below=("below_front", "max")).reset_index()
    pairs["into_vit"] = pairs["destination"].map(_is_vit) & ~pairs["source"].map(_is_vit)
    pairs["holds"] = np.where(pairs["median_below"] <= points, "yes", "no")
    others = pairs[~pairs["into_vit"]]
    off = pairs[pairs["into_vit"] & (pairs["median_below"] > points)]
    note = (f"median distance below the front <= {points:g} points; pairings into a ViT from another "
            f"architecture are left out of the count ({len(off)} of {int(pairs['into_vit'].sum())} off the front)")
    claim = _claim_from("one front", "every pairing's best stitches lie near one accuracy-vs-MACs front, apart "
                        "from those into a ViT", others, note)
    claim.rows = pairs
    return claim


def stage_claims(df: pd.DataFrame) -> list[Claim]:
    """The four claims of the stage study, on a collected results table (see the module docstring)."""
    sc, orig = scenarios(df)
    return [bottleneck_vs_linear(sc), separate_vs_integrated(sc), vit_destination_worst(sc, orig), one_front(sc)]


# ------------------------------------------------------------------------------------------ matrices
def _mean(cells: pd.DataFrame) -> float:
    return float(cells["top1_mean"].mean()) if len(cells) else float("nan")


def matrix_patterns(table: pd.DataFrame, contrast: float = CONTRAST_POINTS, high: float = HIGH) -> list[Claim]:
    """Hernandez et al.'s four patterns on one matrix's cell table (columns of
    :data:`stitching.matrix.cells.TABLE_COLUMNS`); each claim's ``rows`` holds the means it compares."""
    out = []
    by = {c: g for c, g in table.groupby("control")}
    trained = by.get("none", pd.DataFrame(columns=table.columns))
    top = float(trained["top1_mean"].max()) if len(trained) else float("nan")

    def claim(name, statement, parts: dict[str, pd.DataFrame], held: bool | None, note: str) -> Claim:
        rows = pd.DataFrame([{"cells": k, "n": len(v), "top1_mean": _mean(v)} for k, v in parts.items()])
        return Claim(name, statement, rows, int(bool(held)), 0 if held is None else 1, note)

    both = by.get("both")
    if both is None or both.empty:
        out.append(claim("both random: all low", "", {}, None, ""))
    else:
        spread = float(both["top1_mean"].max() - both["top1_mean"].min())
        held = bool(both["top1_mean"].max() < high * top) if np.isfinite(top) else None
        out.append(claim("both random: all low", "every cell low (below "
                         f"{high:g} x the trained matrix's best, {high * top:.1f}) and near uniform",
                         {"all": both}, held, f"best {both['top1_mean'].max():.1f}, spread {spread:.1f} points"))
    for control, name, statement, late_sender, late_receiver in [
            ("destination", "random receiver: late into late", "only late sender layers into late receiver "
             "layers are high", True, True),
            ("source", "random sender: into early", "only stitches into early receiver layers are high", None, False)]:
        cells = by.get(control)
        if cells is None or cells.empty:
            out.append(claim(name, statement, {}, None, ""))
            continue
        s_mid, r_mid = cells["sender_depth"].median(), cells["receiver_depth"].median()
        r_sel = cells["receiver_depth"] > r_mid if late_receiver else cells["receiver_depth"] <= r_mid
        sel = r_sel & (cells["sender_depth"] > s_mid) if late_sender else r_sel
        inside, outside = cells[sel], cells[~sel]
        diff = _mean(inside) - _mean(outside)
        out.append(claim(name, statement, {"named": inside, "rest": outside}, diff >= contrast,
                         f"named cells {_mean(inside):.1f} vs the rest {_mean(outside):.1f} "
                         f"({diff:+.1f} points; appears at >= {contrast:g})"))
    if trained.empty:
        out.append(claim("trained: deeper sender beats shallower", "", {}, None, ""))
    else:
        back = trained[trained["depth_difference"] < 0]
        skip = trained[trained["depth_difference"] > 0]
        same = trained[trained["depth_difference"] == 0]
        diff = _mean(back) - _mean(skip)
        out.append(claim("trained: deeper sender beats shallower", "stitches from a deeper sender into a shallower "
                         "receiver (the lower-left triangle) beat those that skip layers",
                         {"backwards": back, "same depth": same, "skipping": skip},
                         diff >= contrast if len(back) and len(skip) else None,
                         f"backwards {_mean(back):.1f}, same depth {_mean(same):.1f}, skipping {_mean(skip):.1f}"))
    return out


# ------------------------------------------------------------------------------------------ report
def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.3f}"
    return str(v)


def claims_markdown(claims: list[Claim], title: str = "") -> str:
    """The claims as Markdown: a verdict line each, then the table it rests on."""
    lines = [f"## {title}", ""] if title else []
    for c in claims:
        lines += [f"**{c.line()}** -- {c.statement}", ""]
        if len(c.rows):
            rows = c.rows
            lines.append("| " + " | ".join(map(str, rows.columns)) + " |")
            lines.append("|" + " --- |" * len(rows.columns))
            for _, r in rows.iterrows():
                lines.append("| " + " | ".join(_fmt(v) for v in r) + " |")
            lines.append("")
    return "\n".join(lines)
