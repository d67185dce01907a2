"""Text into values, within bounds: the YAML files the framework reads and the values typed on the command line.

Owns :func:`read_yaml` / :func:`parse_yaml` (a config and its base files, a sweep or matrix file, a run directory's
``config.yaml``: at most :data:`MAX_YAML_BYTES` on disk and :data:`MAX_YAML_NODES` with every alias expanded,
numbers read as YAML 1.2 reads them) and :func:`parse_value` (a ``section.key=value`` or ``--slurm key=value``
value, written as :data:`VALUE_SYNTAX` says for the key's type) and :func:`coerce` (a value read from YAML as
the key's type takes it). Errors are a
:class:`stitching.messages.ConfigError` naming the file or key. :mod:`stitching.config` re-exports these.
"""

from __future__ import annotations

import copy
import math
import os
import re
import types
import typing

import yaml

from stitching.messages import CLI, ConfigError, short_repr

#: The most a YAML file the framework reads (a config and its base files, a sweep or matrix file, a run
#: directory's ``config.yaml``) may hold: bytes on disk, and nodes once every alias is expanded. A config is a few
#: hundred nodes; an alias bomb (a 1.7 KB file whose nested aliases expand to 10^8 nodes) is refused before
#: anything walks it (an error message, the run hash, a deep copy written out).
MAX_YAML_BYTES = 256 * 1024
MAX_YAML_NODES = 100_000
_PARSED: dict = {}      # a file's text -> its parsed YAML: a sweep loads the same base files for every grid point


class _TooLarge(Exception):
    pass


def _expanded_nodes(root: yaml.Node, limit: int) -> int:
    """How many nodes the document rooted at ``root`` has with every alias expanded (each distinct node counted
    once per place it appears), computed over the distinct nodes only; :class:`_TooLarge` as soon as the count
    passes ``limit`` or a node contains itself (a recursive alias)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()                       # nodes whose children are being counted: the current path
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if children_done:
            sizes[id(node)] = size = 1 + sum(sizes[id(c)] for c in children)
            open_.discard(id(node))
            if size > limit:
                raise _TooLarge(f"its aliases expand to more than {limit:,} nodes (MAX_YAML_NODES; a config has a "
                                "few hundred): not a file this framework reads")
            continue
        if id(node) in sizes:
            continue
        open_.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_:
                raise _TooLarge("an alias refers to a node that contains it (a recursive alias): its expansion "
                                "has no end")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts each document's nodes with its aliases expanded before constructing it
    (:data:`MAX_YAML_NODES`), and reads numbers as YAML 1.2 does (``2e-3`` is a float; YAML 1.1, PyYAML's
    default, reads it as a string): every file and every command-line mapping or list goes through it."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _expanded_nodes(node, MAX_YAML_NODES)
        return node


_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)"
                                     r"([eE][-+]?[0-9]+)$"), list("-+0123456789."))


def parse_yaml(text: str, src: str):
    """The YAML document ``text`` (from ``src``, for messages) as ``yaml.safe_load`` reads it, within
    :data:`MAX_YAML_NODES`; parsed once per distinct text (a copy each call: callers change it). Invalid YAML,
    too many nodes, a recursive alias or nesting too deep for the parser are a :class:`ConfigError` naming ``src``."""
    if text not in _PARSED:
        try:
            value = yaml.load(text, Loader=_BoundedLoader)
        except _TooLarge as err:
            raise ConfigError("", None, src, str(err)) from None
        except RecursionError:
            raise ConfigError("", None, src, "nested too deeply to be read (not a config)") from None
        except (yaml.YAMLError, ValueError) as err:   # ValueError: e.g. an integer of more than 4300 digits
            raise ConfigError("", None, src, f"not valid YAML: {(str(err).strip().splitlines() or [''])[0]}") \
                from None
        if len(_PARSED) >= 256:
            _PARSED.clear()
        _PARSED[text] = value
    return copy.deepcopy(_PARSED[text])


def read_yaml(path: str | os.PathLike, src: str | None = None):
    """The YAML document in the file ``path`` (:func:`parse_yaml`), read only up to :data:`MAX_YAML_BYTES`; a
    file that cannot be read, is larger, is not UTF-8 text or not YAML within the bounds is a :class:`ConfigError`
    naming it (``src``: how to name it, default the path)."""
    src = str(path) if src is None else src
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError("", None, src, f"cannot be read ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError("", None, src, f"larger than {MAX_YAML_BYTES // 1024} KiB (MAX_YAML_BYTES; a config is a "
                          "few KiB): not a file this framework reads")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("", None, src, f"not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x})") from None
    return parse_yaml(text, src)


# ------------------------------------------------------------------------------------- command-line values
#: How a command-line value (``section.key=value``, ``--slurm key=value``) is written, by the type of the key it
#: sets -- one syntax each, never a YAML document (so ``#`` starts no comment and ``: `` makes no mapping):
#: a string or path: exactly as typed (spaces, ``#``, ``: ``, ``=``, unicode; quote it for the shell only);
#: an integer: ``64``, ``-1``; a number: ``0.002``, ``2e-3``, ``1``; a boolean: ``true`` / ``false``; none (for a
#: key that may be unset): ``null``; a mapping: ``{img_size: 64, patch_size: 8}`` and a list: ``[a, b]``
#: (YAML flow style, where ``2e-3`` is a number too).
VALUE_SYNTAX = types.MappingProxyType({
    str: "a string, as typed", int: "an integer (64)", float: "a number (0.002, 2e-3)", bool: "true or false",
    type(None): "null", dict: "a mapping {key: value, ...}", list: "a list [a, b, ...]",
})
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def parse_value(hint, raw: str, key: str, source: str = CLI):
    """The value of the command-line text ``raw`` for a key of type ``hint`` (a field's annotation, e.g.
    ``str | None``), written as :data:`VALUE_SYNTAX` says; :class:`ConfigError` naming ``key`` otherwise.
    The members of a union are tried in a fixed order: null, boolean, integer, number, mapping/list, string --
    so ``null`` unsets an optional key, ``true`` is the boolean of a ``str | bool`` key, and a string key takes
    anything as typed (``null`` included, for a key that cannot be unset)."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [typing.get_origin(m) or m for m in members]
    if raw == "null" and type(None) in kinds:
        return None
    if bool in kinds and raw in ("true", "false"):
        return raw == "true"
    if int in kinds and _INT.fullmatch(raw):
        return int(raw)
    if float in kinds and _FLOAT.fullmatch(raw):
        return float(raw)       # (nan and inf parse, and are refused as such by the key's check)
    for kind in (dict, list):
        if kind in kinds and raw.lstrip().startswith({dict: "{", list: "["}[kind]):
            try:
                value = yaml.load(raw, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
            except _TooLarge as err:
                raise ConfigError(key, raw, source, str(err)) from None
            except yaml.YAMLError as err:
                raise ConfigError(key, raw, source, f"not a valid {VALUE_SYNTAX[kind]}: "
                                  f"{str(err).splitlines()[0]}") from None
            if isinstance(value, kind):
                return value
    if str in kinds:
        return raw
    raise ConfigError(key, raw, source, "must be " + " or ".join(VALUE_SYNTAX.get(k, k.__name__) for k in kinds))


def coerce(hint, value, key: str, src: str):
    """``value`` (read from a file, or given in Python) as a key of type ``hint`` takes it: a finite number, a
    mapping with identifier keys (copied), ...; a :class:`ConfigError` naming ``key`` and ``src`` otherwise."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):    # (.nan, .inf: no key of a run means anything with them)
                raise ConfigError(key, value, src, "must be a finite number")
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if t is list and isinstance(value, list):
            return copy.deepcopy(value)
        if t is dict and isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
            if bad:
                raise ConfigError(key, value, src, f"argument names must be identifiers, not {short_repr(bad[0])}")
            return copy.deepcopy(value)
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(key, value, src, f"must be {names}")
