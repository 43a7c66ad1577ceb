"""The README's config reference, generated from artsim/config.py (types, defaults and the comment beside each
field), so that the documentation cannot drift from the code: `python -m artsim.config_doc` prints it and
tests/test_docs.py checks that the README documents every key."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
import typing

import yaml

from artsim import config as config_module


def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on the field's line, or the comment lines directly above it."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            last = lines[item.end_lineno - 1]
            inline = re.search(r"#\s*(.*)$", last)
            text = inline.group(1) if inline and not last.strip().startswith("#") else ""
            above, j = [], item.lineno - 2
            while j >= 0 and lines[j].strip().startswith("#"):
                above.insert(0, lines[j].strip().lstrip("#").strip())
                j -= 1
            out[(node.name, item.target.id)] = " ".join(above + ([text] if text else []))
    return out


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return _type_name(next(a for a in args if a is not type(None))) + " or null"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip() + "`"


def config_keys() -> list[tuple[str, type, dataclasses.Field]]:
    """Every documented key path (``download.image_size``, ``sources.N.kind``) with its section class and field."""
    keys = []
    hints = typing.get_type_hints(config_module.Config)
    for section in dataclasses.fields(config_module.Config):
        tp = hints[section.name]
        is_list = typing.get_origin(tp) is list
        cls = typing.get_args(tp)[0] if is_list else tp
        prefix = f"{section.name}.N" if is_list else section.name
        for f in dataclasses.fields(cls):
            keys.append((f"{prefix}.{f.name}", cls, f))
    return keys


def config_reference_markdown() -> str:
    comments = _field_comments()
    out, current = [], None
    for key, cls, f in config_keys():
        section = key.split(".")[0]
        if section != current:
            current = section
            note = " — a list; each entry:" if key.startswith(f"{section}.N.") else ""
            out += ["", f"**`{section}`**{note}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        meaning = comments.get((cls.__name__, f.name), "").replace("|", "\\|")
        out.append(f"| `{key}` | {_type_name(typing.get_type_hints(cls)[f.name])} | {_default(f)} | {meaning} |")
    return "\n".join(out).strip() + "\n"


def _interval(allowed) -> str:
    def number(x):
        return f"{x:,}".replace(",", "_") if float(x).is_integer() and abs(x) >= 10_000 else f"{x:g}"

    return (("(" if allowed.low_open else "[") + number(allowed.low) + ", " + number(allowed.high)
            + (")" if allowed.high_open else "]"))


def config_ranges_markdown() -> str:
    """One line per section: the allowed range of every number (``RANGES`` in artsim/config.py)."""
    out = []
    seen = set()
    for key, cls, f in config_keys():
        if cls in seen:
            continue
        seen.add(cls)
        section = key.rsplit(".", 1)[0]
        ranges = getattr(cls, "RANGES", {})
        if ranges:
            parts = [f"`{name}` {_interval(allowed)}" for name, allowed in ranges.items()]
            out.append(f"- `{section}`: " + ", ".join(parts))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(config_reference_markdown())
    print("Allowed ranges (checked when the config is read; floats must also be finite):\n")
    print(config_ranges_markdown(), end="")
