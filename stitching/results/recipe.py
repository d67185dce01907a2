"""The recipe of a run -- how it was trained and evaluated -- as result columns, and what a row stands for.

Owns:

- :data:`RECIPE_COLUMNS`: the recipe's result columns (the one list; the schema, the trainer's result row,
  the aggregation keys, the plots' checks and captions all read it). Two runs whose recipes differ are
  never averaged together.
- :func:`recipe_columns`: a run's recipe values, from its config (``train.per_device_batch_size`` resolved for
  the world size, ``train.precision`` as resolved on the device).
- :func:`resize_modes`: the resize modes whose module equals this run's (``none|bilinear|strided`` where no
  adapter changes a size; ``bilinear|strided`` for an "integrated" chain that must upsample, which is
  bilinear upsampling then stride-1 adapters): a sweep trains that module once and the plots share its row.
- :func:`recipe_of`, :func:`split_by_recipe`, :func:`recipe_label`, :func:`describe_recipes`: the recipe a
  results table holds, one table per recipe, the recipe in words for titles and captions, and a summary
  (:class:`MixedRecipes` when one is needed and a table holds several); :func:`dataset_label`: the dataset's
  display name (``data.label``, else ``dataset``).

The learning rate is a recipe column but a figure may show several (the fine-tuning baseline's best lr per
scenario, learning-rate sweeps), so the checks and splits leave it to the scenario keys
(:data:`PER_SCENARIO`). The models' constructor arguments (``model_kwargs``, e.g. a ViT's patch size for small
images) are part of what an architecture *is*: rows that differ in them are never averaged together, but, like
two architecture names, they may share a figure (:data:`ARCHITECTURE_COLUMNS`). Reference rows of the
original models (``kind`` :data:`~stitching.kinds.ORIGINAL`, no training) belong to every recipe whose evaluation
(:data:`EVAL_COLUMNS`) equals theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stitching.config import config_value, declared, unread_keys
from stitching.kinds import FINETUNE, ORIGINAL

if TYPE_CHECKING:          # the trainer imports this module (via the schema): pandas only where tables are
    import pandas as pd

#: result column -> dotted config key (``None``: a value worked out from the config, below). Order = column order
#: in ``result.csv``. Derived from the keys' declarations (:class:`stitching.keyspec.RecipeColumn`, ``recipe=``);
#: :data:`RECIPE_KEYS`: every column's declaring key, worked out or not.
RECIPE_KEYS: dict[str, str] = {c.name: k for k, c in sorted(declared("recipe").items(), key=lambda kc: kc[1].at)}
RECIPE: dict[str, str | None] = {c: None if declared("recipe")[k].resolved else k for c, k in RECIPE_KEYS.items()}
RECIPE_COLUMNS = list(RECIPE)
#: chosen per scenario by the plots (never a reason to split a figure)
PER_SCENARIO = ("lr",)
#: what the named architectures were built with: a scenario key (never averaged across) but, like the
#: architecture names, never a reason to split a figure (a cross-architecture figure shows pairs whose
#: models take different constructor arguments)
ARCHITECTURE_COLUMNS = ("model_kwargs",)
#: what an evaluate-only row (an original model) depends on
EVAL_COLUMNS = ("dataset", "num_classes", "pretrained", "random_init", "img_size", "precision", "normalize",
                "eval_crop_pct", "eval_interpolation")


class MixedRecipes(ValueError):
    """A figure or table was asked to draw rows of more than one recipe."""


def recipe_columns(cfg, world_size: int, precision: str) -> dict:
    """The recipe values of the result row of the run ``cfg`` (a :class:`stitching.config.Config`)."""
    from stitching.stitch.plan import style_label

    m, t = cfg.model, cfg.train
    unread = unread_keys(cfg.to_dict())     # keys read only under another key's value: '' where not read
    derived = {
        "dataset": cfg.data.name if cfg.data.name == "synthetic" else Path(cfg.data.root).name,
        "num_classes": cfg.num_classes,
        "pretrained": m.pretrained if not (m.source_weights or m.destination_weights) else "weights_file",
        "per_device_batch_size": t.per_device_batch_size or t.batch_size // max(1, world_size),
        "model_kwargs": model_kwargs_column(cfg),
        "precision": precision,
        "init_images": "" if "model.init_images" in unread else m.init_images,
        "distill_temperature": "" if "train.distill_temperature" in unread else t.distill_temperature,
        "match_epochs": "" if "train.match_epochs" in unread else t.resolved_match_epochs(),
    }
    out = {}
    for column, key in RECIPE.items():
        if key is None:
            out[column] = derived[column]
        else:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            out[column] = "" if value is None else value
    out["adapter_style"] = style_label(m.adapter_style, m.code_quirks)    # the paper code's quirks: another network
    return out


def fill_missing_recipe(row: pd.DataFrame, config: dict | None = None) -> pd.DataFrame:
    """``row`` (result rows) with the recipe columns it lacks -- written by a version before the column
    existed -- filled in: from the run's resolved ``config`` (its ``config.yaml``) where that has the key, else
    with the key's :data:`stitching.config.IDENTITY_BASELINE` value (the value runs had before the key
    existed). Derived columns (no config key) are left absent. So a result of an older version is read with
    the recipe it ran, and groups with newer rows of the same recipe."""
    row = row.copy()
    for column, key in RECIPE.items():
        if key is None or column in row.columns:
            continue
        value = config_value(config, key)
        row[column] = "" if value is None else str(value)
    return row


def model_kwargs_column(cfg) -> str:
    """The constructor arguments of the run's models as one JSON cell (``''`` when both use the defaults)."""
    import json

    args = {"source": cfg.model.source_args()}
    if not cfg.is_original:
        args["destination"] = cfg.model.destination_args()
    args = {k: v for k, v in args.items() if v}
    return json.dumps(args, sort_keys=True) if args else ""


def resize_modes(cfg) -> str:
    """``|``-joined resize modes that build the same module as the run ``cfg`` ('' for unstitched runs)."""
    from stitching.kinds import RESIZES
    from stitching.stitch.plan import PlanError, plan_config

    m = cfg.model
    if cfg.is_original or m.adapter == FINETUNE:
        return ""

    def signature(resize):
        try:
            return plan_config(m, cfg.data.img_size, resize).signature()
        except PlanError:
            return None

    own = signature(m.resize)
    return "|".join(r for r in RESIZES if own is not None and signature(r) == own)


# ------------------------------------------------------------------------------------------ tables of runs
def canonical(value) -> str:
    """One spelling per value, whatever the CSV round trip made of it (``10`` / ``10.0`` / ``"10"``)."""
    import pandas as pd

    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    text = str(value).strip()
    if text.lower() in ("nan", "<na>", "none"):
        return ""
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _columns(df: pd.DataFrame, columns) -> list[str]:
    return [c for c in columns if c in df.columns]


def group_columns(df: pd.DataFrame) -> list[str]:
    """The recipe columns two rows must share to be averaged together (those ``df`` has, the per-scenario
    lr left out)."""
    return _columns(df, [c for c in RECIPE_COLUMNS if c not in PER_SCENARIO])


def figure_columns(df: pd.DataFrame) -> list[str]:
    """The recipe columns a figure must not mix: :func:`group_columns` without the architectures' own
    constructor arguments (:data:`ARCHITECTURE_COLUMNS`)."""
    return [c for c in group_columns(df) if c not in ARCHITECTURE_COLUMNS]


def canonical_recipes(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: df[c].map(canonical) for c in columns}, index=df.index)


def split_by_recipe(df: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """One ``(recipe, rows)`` per recipe of the trained rows, each with the original models evaluated like
    it. Without trained rows: one per evaluation recipe of the originals. Recipes as canonical strings."""
    import pandas as pd

    columns = figure_columns(df)
    trained = df[df["kind"] != ORIGINAL]
    originals = df[df["kind"] == ORIGINAL]
    if trained.empty:
        base, columns = originals, _columns(df, EVAL_COLUMNS)
    else:
        base = trained
    if base.empty:
        return []
    keys = canonical_recipes(base, columns)
    eval_cols = [c for c in columns if c in EVAL_COLUMNS]
    orig_keys = canonical_recipes(originals, eval_cols)
    groups = keys.groupby(columns, sort=True, dropna=False).groups.items() if columns else [((), keys.index)]
    out = []
    for values, idx in groups:
        values = values if isinstance(values, tuple) else (values,)
        recipe = dict(zip(columns, values))
        rows = base.loc[idx]
        if not trained.empty and not originals.empty:
            match = (orig_keys == pd.Series({c: recipe[c] for c in eval_cols})).all(axis=1) if eval_cols else \
                pd.Series(True, index=originals.index)
            rows = pd.concat([rows, originals[match]])
        out.append((recipe, rows.sort_index()))
    return out


def _differences(recipes: list[dict]) -> str:
    differ = [c for c in recipes[0] if len({r[c] for r in recipes}) > 1]
    return "; ".join(f"{c}: {', '.join(sorted({r[c] or '(none)' for r in recipes}))}" for c in differ)


def describe_recipes(df: pd.DataFrame) -> str:
    """``1 recipe`` or ``2 recipes (they differ in adapter_style: code, text)``, for summaries."""
    recipes = [r for r, _ in split_by_recipe(df)]
    if len(recipes) <= 1:
        return f"{len(recipes)} recipe" + ("" if recipes else "s")
    return f"{len(recipes)} recipes (they differ in {_differences(recipes)}); plots draw them apart"


def recipe_of(df: pd.DataFrame, what: str = "this figure") -> tuple[dict, pd.DataFrame]:
    """The one recipe of ``df`` and its rows (originals evaluated otherwise left out); raise
    :class:`MixedRecipes` naming the columns that differ when there are several."""
    groups = split_by_recipe(df)
    if not groups:
        return {}, df
    if len(groups) > 1:
        raise MixedRecipes(f"{what} would mix {len(groups)} recipes (they differ in "
                           f"{_differences([r for r, _ in groups])}); filter the results to one recipe or draw "
                           f"them all with draw_all, which splits them")
    return groups[0]


#: recipe column -> its words; a pair is (singular, plural), the singular for the value 1; in caption order.
#: Derived from the keys' declarations (:class:`stitching.keyspec.RecipeColumn`: ``unit``, ``caption_at``).
_UNITS = [(c.name, c.unit) for c in sorted((c for c in declared("recipe").values() if c.unit is not None),
                                           key=lambda c: c.caption_at)]
#: the columns of the short recipe (legend titles; the whole recipe goes into the captions)
SHORT_RECIPE = ("dataset", "epochs", "img_size")


def recipe_part(column: str, value) -> str:
    """One recipe column in words (``epochs`` 1 -> ``1 epoch``, 2 -> ``2 epochs``); '' for an empty value."""
    value = canonical(value)
    if not value:
        return ""
    fmt = dict(_UNITS).get(column, column + ": {}")
    if isinstance(fmt, tuple):
        fmt = fmt[0] if value == "1" else fmt[1]
    return fmt.format(value)


def dataset_label(rows: pd.DataFrame) -> str:
    """The dataset's name for figures and tables: the rows' ``data_label`` (``data.label``) where one is given,
    otherwise their ``dataset`` (``data.name`` for synthetic data, the ImageFolder root's name); '' if neither."""
    for column in ("data_label", "dataset"):
        if column in rows.columns:
            named = [v for v in rows[column].map(canonical) if v]
            if named:
                return named[0]
    return ""


def recipe_label(recipe: dict, dataset: str | None = None, columns=None) -> str:
    """The recipe in one line for a title or caption (columns the table lacks or leaves empty are omitted;
    an empty preprocessing entry means the source model's own). ``dataset``: its display name
    (:func:`dataset_label`) in place of the ``dataset`` column; ``columns``: only these (in the usual order)."""
    recipe = {**recipe, "dataset": dataset} if dataset else recipe
    parts = [recipe_part(c, recipe.get(c, "")) for c, _ in _UNITS if columns is None or c in columns]
    parts = [p for p in parts if p]
    return "Recipe: " + " · ".join(parts) if parts else "Recipe: (not recorded)"
