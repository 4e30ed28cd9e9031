"""Values as table cells and arbitrary JSON as report blocks.

Reports show numbers from many sources (metrics, data reports, environments); one formatter
keeps them alike: 4 significant digits, thousands separators, "–" for missing, and nested
dicts or lists as tables instead of raw JSON.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ftlab.eval.document import Block, Heading, Paragraph, Table
from ftlab.eval.report import MISSING

__all__ = ["fmt", "human_bytes", "is_number", "mean_std", "records_table", "value_blocks"]

MAX_ROWS = 50  # longest generic table (data report lists)
MAX_CELL = 300  # characters of one table cell


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def fmt(value: Any) -> str:
    """A value as a short table cell: 4 significant digits, thousands separators, lists and
    dicts inline, long text clipped."""
    if value is None:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if is_number(value):
        x = float(value)
        if not math.isfinite(x):
            return str(x)
        if x != 0 and abs(x) >= 1e4:
            return f"{x:,.0f}"
        return f"{x:.4g}"
    if isinstance(value, dict):
        text = ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = ", ".join(fmt(v) for v in value)
    else:
        text = str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def mean_std(values: list[Any]) -> str:
    """Mean ± std over seeds (the value itself for one seed), MISSING when none has one."""
    nums = [float(v) for v in values if is_number(v) and math.isfinite(float(v))]
    if not nums:
        return MISSING
    if len(nums) == 1:
        return fmt(nums[0])
    return f"{fmt(float(np.mean(nums)))} ± {fmt(float(np.std(nums)))}"


def human_bytes(n: Any) -> str:
    """1536 -> "1.5 KiB": memory in the unit a person reads."""
    if not is_number(n):
        return MISSING
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"


def _flat(value: Any) -> bool:
    """Fits in one table cell: a scalar, a list of scalars or a small dict of scalars (a
    larger one reads better as its own table)."""
    if isinstance(value, dict):
        return len(value) <= 4 and all(
            not isinstance(v, (dict, list, tuple)) for v in value.values()
        )
    if isinstance(value, (list, tuple)):
        return all(not isinstance(v, (dict, list, tuple)) for v in value)
    return True


def records_table(records: list[dict]) -> Table:
    """A table with one row per dict and the union of their keys as columns."""
    columns: list[str] = []
    for record in records:
        columns += [str(k) for k in record if str(k) not in columns]
    rows = [[fmt(r.get(c)) for c in columns] for r in records[:MAX_ROWS]]
    if len(records) > MAX_ROWS:
        rows.append([f"… {len(records) - MAX_ROWS} more"] + [""] * (len(columns) - 1))
    return Table(columns, rows)


def value_blocks(value: Any, level: int = 3) -> list[Block]:
    """Any JSON value as blocks: flat entries of a dict in a key/value table, a dict of flat
    dicts or a list of dicts as one table, deeper dicts under sub-headings."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        if all(_flat(v) for record in value for v in record.values()):
            return [records_table(list(value))]
        blocks: list[Block] = []
        for i, item in enumerate(value[:MAX_ROWS]):
            blocks += [Heading(f"[{i}]", min(level, 6))] + value_blocks(item, level + 1)
        return blocks
    if not isinstance(value, dict):
        return [Paragraph(fmt(value))] if value not in (None, [], {}) else []
    records = value and all(isinstance(v, dict) and v for v in value.values())
    if records and all(_flat(x) for v in value.values() for x in v.values()):
        return [records_table([{"": k, **v} for k, v in value.items()])]
    flat = [(str(k), v) for k, v in value.items() if _flat(v)]
    blocks = [Table(["key", "value"], [[k, fmt(v)] for k, v in flat])] if flat else []
    for k, v in value.items():
        if not _flat(v):
            inner = value_blocks(v, level + 1)
            if inner:
                blocks += [Heading(str(k), min(level, 6))] + inner
    return blocks
