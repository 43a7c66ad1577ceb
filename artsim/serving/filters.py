"""`where` conditions on the id map's facet / metadata columns: parsing (CLI strings) and evaluation (row masks).

A ``where`` dict maps a column to a condition; all conditions must hold (AND):

- ``"China"`` or ``["China", "Japan"]`` — the value is one of these;
- ``{"not": "China"}`` or ``{"not": ["China", "Japan"]}`` — the value is none of these ("another culture");
- ``{">=": 1800, "<": 1900}`` — a numeric range (ops ``>=``, ``>``, ``<=``, ``<``; aliases ``gte gt lte lt``);
- ``{"in": [...], "not": [...], ">=": ...}`` — several of the above at once.

A null (unknown) value never satisfies a condition, negations included: ``culture!=China`` keeps works whose
culture is known and is not China. The CLI syntax (:func:`parse_where`) is ``FIELD=VALUE``, ``FIELD=a|b``,
``FIELD!=VALUE``, ``FIELD!=a|b``, ``FIELD>=N``, ``FIELD>N``, ``FIELD<=N``, ``FIELD<N`` and ``FIELD=N..M``
(inclusive range).
"""
from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.errors import ArtsimError

RANGE_OPS = {">=": "greater_equal", ">": "greater", "<=": "less_equal", "<": "less"}
ALIASES = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<", "eq": "in", "ne": "not", "not_in": "not"}
_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(!=|>=|<=|=|>|<)\s*(.*?)\s*$")


def parse_where(clauses: list[str] | tuple[str, ...] | None) -> dict:
    """``["culture!=China", "date_begin>=1800", "collection=met|smk"]`` -> a where dict (see module doc)."""
    where: dict[str, dict] = {}
    for clause in clauses or []:
        m = _CLAUSE.match(clause)
        if not m or m.group(3) == "":
            raise ArtsimError(f"--where {clause!r}: expected FIELD=VALUE, FIELD!=VALUE, FIELD>=N, FIELD<N or "
                              "FIELD=N..M")
        field, op, value = m.groups()
        cond = where.setdefault(field, {})
        if op in ("=", "!=") and ".." in value and op == "=":
            lo, hi = value.split("..", 1)
            cond[">="] = _number(field, lo)
            cond["<="] = _number(field, hi)
        elif op == "=":
            cond.setdefault("in", []).extend(v for v in value.split("|"))
        elif op == "!=":
            cond.setdefault("not", []).extend(v for v in value.split("|"))
        else:
            cond[op] = _number(field, value)
    return where


def _number(field: str, text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ArtsimError(f"--where {field}: expected a number, got {text!r}") from None


def normalize_where(where: dict | None, columns: dict[str, pa.DataType]) -> dict[str, dict]:
    """Validate a where dict against the filterable columns; returns ``{column: {op: value(s)}}``."""
    if not where:
        return {}
    if not isinstance(where, dict):
        raise ArtsimError(f"where: expected a mapping of column to value, got {type(where).__name__}")
    out: dict[str, dict] = {}
    for column, cond in where.items():
        if column not in columns:
            raise ArtsimError(f"where: unknown column {column!r}; filterable columns: {', '.join(sorted(columns))}")
        dtype = columns[column]
        if not isinstance(cond, dict):
            cond = {"in": cond}
        norm: dict[str, Any] = {}
        for op, value in cond.items():
            op = ALIASES.get(op, op)
            if op in ("in", "not"):
                values = value if isinstance(value, (list, tuple, set)) else [value]
                norm.setdefault(op, []).extend(_coerce(column, dtype, v) for v in values)
            elif op in RANGE_OPS:
                if not (pa.types.is_integer(dtype) or pa.types.is_floating(dtype)):
                    raise ArtsimError(f"where {column}: range {op} needs a numeric column, {column} is {dtype}")
                norm[op] = _coerce(column, dtype, value)
            else:
                raise ArtsimError(f"where {column}: unknown operator {op!r} (use a value, a list, 'not', "
                                  ">=, >, <=, <)")
        out[column] = norm
    return out


def _coerce(column: str, dtype: pa.DataType, value):
    if value is None:
        raise ArtsimError(f"where {column}: null is not a value to compare with")
    if pa.types.is_integer(dtype):
        if isinstance(value, bool):
            raise ArtsimError(f"where {column}: expected a number, got {value!r}")
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _number(column, str(value))
    if pa.types.is_floating(dtype):
        return float(_number(column, str(value)) if isinstance(value, str) else value)
    return str(value)


def where_key(norm: dict) -> str:
    """A stable cache key for a normalised where."""
    return json.dumps(norm, sort_keys=True, default=str)


def where_mask(table: pa.Table, norm: dict) -> np.ndarray:
    """Boolean row mask of ``table`` where every condition holds (nulls never match)."""
    mask = np.ones(table.num_rows, dtype=bool)
    for column, cond in norm.items():
        col = table.column(column)
        col_mask = pc.is_valid(col)
        if "in" in cond:
            col_mask = pc.and_(col_mask, pc.is_in(col, value_set=pa.array(cond["in"], type=col.type)))
        if "not" in cond:
            col_mask = pc.and_(col_mask, pc.invert(pc.is_in(col, value_set=pa.array(cond["not"], type=col.type))))
        for op, fn in RANGE_OPS.items():
            if op in cond:
                col_mask = pc.and_(col_mask, getattr(pc, fn)(col, _scalar(column, cond[op], col.type)))
        mask &= pc.fill_null(col_mask, False).to_numpy(zero_copy_only=False)
    return mask


def _scalar(column: str, value, dtype: pa.DataType) -> pa.Scalar:
    if not pa.types.is_integer(dtype):
        return pa.scalar(value)
    try:
        return pa.scalar(value).cast(dtype)
    except (pa.ArrowInvalid, OverflowError):
        raise ArtsimError(f"where {column}: {value} is out of range for a {dtype} column") from None
