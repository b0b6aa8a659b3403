"""The pieces every marketing report page is made of: one stylesheet, tables, inlined plots, numbers.

Pages are single self-contained HTML5 files (plots as base64 PNGs) so they can be attached to an
email or logged to MLflow as one artifact. Kept in one place so the profile, experiment and
campaign reports look alike and all pass the same strict HTML5 parse (``tests/marketing/test_reports.py``).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:68em;margin:2em auto;padding:0 1em;"
    "color:#222;line-height:1.45}"
    "table{border-collapse:collapse;margin:.8em 0 1.4em}"
    "td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left;vertical-align:top}"
    "th{background:#f3f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    "img{max-width:100%;display:block;margin:.5em 0 1.2em}"
    ".verdict{font-size:1.15em;padding:.6em .9em;background:#eef6ee;border-left:4px solid #3a7d44}"
    ".warn{padding:.6em .9em;background:#fff3e0;border-left:4px solid #e08a00}"
    ".badge{display:inline-block;padding:.1em .5em;border-radius:.3em;background:#6a4c93;color:#fff;font-size:.85em}"
    ".muted{color:#666}"
)


def esc(x: Any) -> str:
    return html.escape(str(x))


def page(title: str, body: str) -> str:
    """A complete HTML5 document with the shared stylesheet."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{esc(title)}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped, columns whose index is in ``numeric`` right-aligned.

    ``header=None`` gives a key-value table without a header row.
    """
    num = set(numeric)
    if header is None:
        body = "".join(f"<tr><th>{esc(r[0])}</th>" + "".join(f"<td>{esc(c)}</td>" for c in r[1:]) + "</tr>" for r in rows)
        return f"<table><tbody>{body}</tbody></table>"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"num\">{esc(c)}</td>" if j in num else f"<td>{esc(c)}</td>"
                         for j, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def img(data: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inlined and a real description for screen readers."""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def money(x: float | None, currency: str, signed: bool = False) -> str:
    """``1234.5, "EUR"`` -> ``"EUR 1,234.50"``; ``None`` -> ``"-"``."""
    if x is None:
        return "-"
    return f"{currency} {x:{'+' if signed else ''},.2f}"


def pct(x: float | None, signed: bool = False, digits: int = 1) -> str:
    """``0.041`` -> ``"4.1%"`` (``"+4.1%"`` when signed); ``None`` -> ``"-"``."""
    if x is None:
        return "-"
    return f"{x * 100:{'+' if signed else ''}.{digits}f}%"


def use_agg() -> None:
    """Files only, no display: safe in the CLI, tests and Serve replicas."""
    import matplotlib

    matplotlib.use("Agg")
