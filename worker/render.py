"""Plain aligned text tables for the CLI (no dependency: the output must read well in any
terminal and in logs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Left-aligned columns separated by two spaces; long cells are cut at 60 characters."""
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [min(60, max(len(c), *(len(row[i]) for row in cells))) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}.{w}}}" for w in widths)
    lines = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in cells]
    return "\n".join(line.rstrip() for line in lines)
