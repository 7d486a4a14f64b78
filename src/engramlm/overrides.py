"""Dotted ``--section.field=value`` overrides of the config dataclasses, and their help text.

These live with the configs rather than in the command line so that library code
(``engramlm.compare``, the experiments) reads overrides without importing ``engramlm.cli``:
the CLI stays the top floor of the import graph.

A *schema* maps each section to the config dataclass it overrides (``{"model": ModelConfig,
"train": TrainConfig}``); nested dataclass fields (``model.engram``) are followed through the
type hints, so ``--model.engram.layer_ids=[1]`` is checked against ``EngramConfig``. The help of
a field is the comment on its line in the class body: the listing cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

# A section's value: a config dataclass, or a plain type for a single number (compare's rho).
Schema = dict[str, type]


def parse_value(text: str) -> Any:
    """``--x=3`` -> 3, ``--x=[1,2]`` -> [1, 2], ``--x=true`` -> True, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(
    tree: dict[str, Any], overrides: list[str], schema: Schema | None = None
) -> dict[str, Any]:
    """Set ``--section.key[.sub]=value`` pairs into a nested dict (copied).

    With a ``schema``, every key must name a field: an unknown one is a ``ValueError`` that
    names the closest valid key.
    """
    tree = json.loads(json.dumps(tree))
    valid = sorted(option_names(schema)) if schema is not None else None
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"expected --section.key=value, got {item!r}")
        key, value = item[2:].split("=", 1)
        if valid is not None and key not in valid:
            raise ValueError(unknown_option_message(key, valid))
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # e.g. model.engram is None in the base config
                raise ValueError(
                    f"--{key}: {part} is {json.dumps(node)} in the base config, not a section; "
                    "set it in the config file first (e.g. a [model.engram] table)"
                )
        node[parts[-1]] = parse_value(value)
    return tree


def unknown_option_message(key: str, valid: list[str]) -> str:
    """``unknown option --train.stpes; did you mean --train.steps?`` (the closest valid key)."""
    match = closest(key, valid)
    hint = f"did you mean --{match}?" if match else "see --help for the valid ones"
    return f"unknown option --{key}; {hint}"


def closest(key: str, valid: list[str]) -> str | None:
    """The valid key nearest to ``key``: a field of the same section spelled alike; else, the
    section being wrong or missing, the same field name elsewhere or the nearest spelling."""
    parent, _, leaf = key.rpartition(".")
    siblings = {v.rpartition(".")[2]: v for v in valid if v.rpartition(".")[0] == parent}
    if siblings:
        found = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        return siblings[found[0]] if found else None
    leaves: dict[str, str] = {}
    for v in valid:
        leaves.setdefault(v.rpartition(".")[2], v)
    if leaf in leaves:
        return leaves[leaf]
    found = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return found[0] if found else None


def option_names(schema: Schema) -> list[str]:
    """Every dotted key a schema accepts: ``train.steps``, ``model.engram.layer_ids``, ..."""
    return [f.name for f in describe(schema)]


@dataclass(frozen=True)
class FieldHelp:
    """One overridable field: its dotted name, default and the comment that documents it."""

    name: str
    default: Any
    help: str


def describe(schema: Schema, *, expand_repeats: bool = True) -> list[FieldHelp]:
    """Every field of the schema's dataclasses, nested ones flattened, in declaration order.

    A section that is a plain type (compare's ``rho``) is one entry. With ``expand_repeats``
    off, a nested dataclass met a second time (``model.overencoding``, an EngramConfig like
    ``model.engram``) is one entry pointing at the first listing, as ``--help`` shows it.
    """
    out: list[FieldHelp] = []
    seen: dict[type, str] = {}
    for section, cls in schema.items():
        if dataclasses.is_dataclass(cls):
            out.extend(_describe_class(cls, section, seen, expand_repeats))
        else:
            out.append(FieldHelp(section, None, f"a {cls.__name__}"))
    return out


def _describe_class(
    cls: type, prefix: str, seen: dict[type, str], expand_repeats: bool
) -> list[FieldHelp]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out: list[FieldHelp] = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        help = comments.get(f.name, "")
        nested = _nested_dataclass(hints[f.name])
        if nested is not None and nested in seen and not expand_repeats:
            help = f"{help}; its fields are those of --{seen[nested]}.*".lstrip("; ")
            out.append(FieldHelp(name, default, help))
            continue
        out.append(FieldHelp(name, default, help))
        if nested is not None and nested is not cls:
            seen.setdefault(nested, name)
            out.extend(_describe_class(nested, name, seen, expand_repeats))
    return out


def _nested_dataclass(hint: Any) -> type | None:
    """``EngramConfig | None`` -> EngramConfig; anything that is not a dataclass -> None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of a class body."""
    source = inspect.getsource(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    line_field: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        # A field is declared at the class body's indentation: "    name: ...".
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in fields:
            if tok.line[4:].startswith(f"{tok.string}:"):
                line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            comments[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    return comments


def format_fields(schema: Schema, width: int = 40) -> str:
    """The fields of a schema as help lines: ``  --train.steps=1000   optimiser steps``."""
    lines = []
    for f in describe(schema, expand_repeats=False):
        flag = f"--{f.name}={_show(f.default)}"
        pad = " " * max(1, width - len(flag))
        if len(flag) >= width:
            lines.append(f"  {flag}\n  {' ' * width} {f.help}".rstrip())
        else:
            lines.append(f"  {flag}{pad} {f.help}".rstrip())
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A default as it would be typed: ``3``, ``true``, ``[1,15]`` (no spaces), ``pydocs``."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))
