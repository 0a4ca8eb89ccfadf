"""The small files DVC reads as metrics and plots (JSON, CSV) and the markdown reports.
Figures are in figures.py."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from .fsutil import write_bytes


def write_json(obj, path: Path) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    return json.loads(path.read_text())


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str] | None = None) -> None:
    columns = list(columns or rows[0].keys())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row[k]) for k in columns})
    write_bytes(path, buf.getvalue().encode())


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def markdown_table(rows: Sequence[dict]) -> list[str]:
    columns = list(rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join("" if r[c] is None else str(_fmt(r[c])) for c in columns) + " |" for r in rows]


def write_markdown_table(
    rows: Sequence[dict], path: Path, title: str, extra: Sequence[tuple[str, Sequence[dict]]] = ()
) -> None:
    """A titled table, and optionally more titled tables below it."""
    lines = [f"# {title}", "", *markdown_table(rows)]
    for heading, more in extra:
        lines += ["", f"## {heading}", "", *markdown_table(more)]
    write_bytes(path, ("\n".join(lines) + "\n").encode())
