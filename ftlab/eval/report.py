"""Markdown tables for comparing runs in READMEs and experiment reports."""

from __future__ import annotations

from typing import Any

__all__ = ["MISSING", "markdown_table"]

MISSING = "–"  # en dash: distinguishes "not measured" from a real 0 or empty string


def _cell(value: Any, spec: str) -> str:
    """Format one value; pipes/newlines are escaped so they can't break the table."""
    if value is None:
        return MISSING
    text = format(value, spec) if spec else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """GitHub markdown table; columns are (key, header, format spec), e.g. ".3f", ",d", "".

    A key missing from a row (or set to None) renders as "–". Ends with a newline.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    headers = [_cell(header, "") for _, header, _ in columns]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        cells = [_cell(row.get(key), spec) for key, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
