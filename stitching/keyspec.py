"""How a config key is declared: :func:`declare` (its default and, as dataclass field metadata, what the tables derived
from the fields read), :class:`Choices` (choices a subsystem owns, named, not imported: :mod:`stitching.config`
imports no subsystem) and :class:`RecipeColumn` (its recipe column and caption words). The fields are in
:mod:`stitching.config`; :func:`stitching.config.declared` collects one kind of metadata over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Choices:
    """A key's choices declared by their owner: ``owner`` names its tuple (``"train.perf.PRECISIONS"``, under
    ``stitching.``), ``first`` the values before it; :mod:`stitching.validate` imports the owner and resolves it."""
    owner: str
    first: tuple = ()


@dataclass(frozen=True)
class RecipeColumn:
    """A key's recipe column (:mod:`stitching.results.recipe`): its ``name``, its place among the recipe columns
    (``at``: the order of ``result.csv``), its place in a recipe caption (``caption_at``) and its words there
    (``unit``: a format, or (singular, plural)); ``resolved``: the row holds a value worked out from the config
    (e.g. ``auto`` resolved), not the key's value as written."""
    name: str
    at: int
    caption_at: int | None = None
    unit: str | tuple | None = None
    resolved: bool = False


def declare(default, *, choices: tuple | Choices | None = None, operational: bool = False,
            read_when: tuple[str, tuple] | None = None, recipe: RecipeColumn | None = None):
    """Declare a config key: its default and, as field metadata, everything the derived tables read -- ``choices``
    (:data:`stitching.validate.CHOICES`), ``operational`` (:data:`OPERATIONAL_KEYS`), ``read_when`` (another
    key, the values under which this one is read: :data:`READ_ONLY_WHEN`, and the plots' companions) and
    ``recipe`` (:data:`stitching.results.recipe.RECIPE`, its caption words)."""
    meta = {"choices": choices, "operational": operational, "read_when": read_when, "recipe": recipe}
    return field(default=default, metadata={k: v for k, v in meta.items() if v})
