"""What the HTML reports share: one stylesheet, tables, and charts inlined as PNG, so that a report
is one self-contained file a person opens from a shared folder."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.scroll{max-width:100%;overflow-x:auto}.flag{color:#b00020;font-weight:bold}.ok{color:#1b7f3b}
img{max-width:100%;height:auto}td.name{max-width:420px;overflow-wrap:anywhere}
"""


def pyplot():
    """matplotlib's pyplot on the file-only backend (batch nodes have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """A figure as a data URI, closed once drawn."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def table(header: list[str], rows: list[list[Any]], name_column: int | None = None,
          raw_columns: tuple[int, ...] = ()) -> str:
    """An HTML table; cells are escaped except in ``raw_columns`` (links this module's callers built)."""
    def cell(i: int, value: Any) -> str:
        text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        text = text if i in raw_columns else html.escape(text)
        return f'<td class="name">{text}</td>' if i == name_column else f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'
