"""How things look to people: byte counts, and HTML for Jupyter (``_repr_html_``) of segments, arrays, listings.

A leaf: it imports nothing of shmarray, so every layer may use it.

Every cell passes through ``html.escape``: keys, dtype names, field names and
schemas are user strings, and a key such as ``<script>`` must show as text.
No style sheet and no script: the notebook's own table style applies, and
the output stays readable in any renderer (JupyterLab, VS Code, GitHub).
"""

from __future__ import annotations

from html import escape
from typing import Iterable, Sequence

__all__ = ["human", "esc", "facts", "grid", "preformatted"]


def human(n: int) -> str:
    """A byte count for people: '512 B', '1.5 MiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def esc(value: object) -> str:
    """*value* as text, HTML-escaped (quotes too, so it is safe in attributes)."""
    return escape(str(value), quote=True)


def facts(title: str, rows: Iterable[tuple[str, object]]) -> str:
    """A two-column table, name and value, under a bold *title*."""
    body = "".join(
        f'<tr><th style="text-align:left">{esc(name)}</th><td style="text-align:left">{esc(value)}</td></tr>'
        for name, value in rows
    )
    return f'<div><b>{esc(title)}</b><table>{body}</table></div>'


def grid(header: Sequence[str], rows: Iterable[Sequence[object]], *, caption: str | None = None) -> str:
    """A table with a header row; every cell is escaped."""
    head = "".join(f'<th style="text-align:left">{esc(h)}</th>' for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td style="text-align:left">{esc(c)}</td>' for c in row) + "</tr>" for row in rows
    )
    cap = f"<caption>{esc(caption)}</caption>" if caption is not None else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def preformatted(text: str) -> str:
    """*text* in a ``<pre>`` block, escaped."""
    return f"<pre>{esc(text)}</pre>"
