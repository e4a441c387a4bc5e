"""Building blocks of the self-contained HTML pages: CSS, tables, inline PNG images, the page."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

MIN_TILE_PX = 96  # small images (8x8, 28x28) are enlarged by whole pixels to at least this

CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --accent: #2f6fde; --bg: #f7f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
.layout { display: flex; align-items: flex-start; max-width: 1400px; margin: 0 auto; }
nav.toc { position: sticky; top: 0; flex: 0 0 210px; height: 100vh; overflow-y: auto;
          padding: 24px 12px 24px 20px; border-right: 1px solid var(--line); background: #fff; }
nav.toc h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .06em;
             color: var(--muted); margin: 0 0 8px; }
nav.toc a { display: block; padding: 4px 6px; color: var(--ink); text-decoration: none;
            border-radius: 4px; font-size: 14px; }
nav.toc a:hover { background: var(--bg); color: var(--accent); }
main { flex: 1; min-width: 0; padding: 24px 32px 64px; }
header.page h1 { margin: 0 0 4px; font-size: 26px; }
header.page p { margin: 0; color: var(--muted); }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
          padding: 18px 22px; margin: 20px 0; }
section h2 { margin: 0 0 12px; font-size: 20px; }
h3 { font-size: 16px; margin: 18px 0 8px; }
p.note { color: var(--muted); font-size: 13px; margin: 6px 0; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 4px 0 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .label { font-size: 12px; color: var(--muted); text-transform: uppercase; }
.card .value { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; height: auto; display: block; margin: 6px 0; }
img.wide { max-width: min(100%, 760px); height: auto; display: block; margin: 6px 0; }
td.nowrap { white-space: nowrap; }
img.pixel { image-rendering: pixelated; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure.tile { margin: 0; width: 204px; font-size: 12px; }
figure.tile.single { width: 100px; }
figure.tile .pair { display: flex; gap: 4px; }
figure.tile img { width: 100px; height: 100px; border: 1px solid var(--line); }
figure.tile figcaption { margin-top: 3px; line-height: 1.3; word-break: break-word; }
.bad { color: #c62828; }
.good { color: #2e7d32; }
pre { background: var(--bg); padding: 10px; overflow-x: auto; font-size: 13px; }
@media print {
  body { background: #fff; font-size: 12px; }
  nav.toc { display: none; }
  main { padding: 0; }
  section { border: none; padding: 0; margin: 12px 0; break-inside: auto; }
  section h2 { break-after: avoid; }
  figure.tile, img.figure, table { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
}
"""


@dataclass(frozen=True)
class Section:
    """One block of a page: its anchor id, its heading and its HTML body."""

    id: str
    title: str
    body: str


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | int | None, digits: int = 4) -> str:
    """A number as a person reads it: integers with separators, floats to `digits` places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def metric_span(key: str, value: float | int, digits: int = 4) -> str:
    """A number with its exact value in data-value, so tests and scripts can read the page."""
    shown = fmt(int(value)) if isinstance(value, int | np.integer) else fmt(float(value), digits)
    return (
        f'<span class="metric" id="metric-{esc(key)}" data-value="{float(value)!r}">{shown}</span>'
    )


def cards(items: Sequence[tuple[str, str]]) -> str:
    """A row of big-number cards; each item is (label, value HTML)."""
    inner = "".join(
        f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{value}</div>'
        "</div>"
        for label, value in items
    )
    return f'<div class="cards">{inner}</div>'


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    numeric: Sequence[int] = (),
    raw: bool = False,
    css_class: str = "",
    total_rows: int = 0,
) -> str:
    """An HTML table; columns in `numeric` are right-aligned. Cells are escaped unless `raw`.

    The last `total_rows` rows are styled as totals.
    """
    numeric_set = set(numeric)

    def cell(tag: str, i: int, value: object) -> str:
        klass = ' class="num"' if i in numeric_set else ""
        text = str(value) if raw else esc(value)
        return f"<{tag}{klass}>{text}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        klass = ' class="total"' if r >= len(rows) - total_rows else ""
        body.append(f"<tr{klass}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    attr = f' class="{esc(css_class)}"' if css_class else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(pairs: Sequence[tuple[str, object]]) -> str:
    """A two-column table of settings."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f"<table><tbody>{rows}</tbody></table>"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, css_class: str = "figure", width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img class="{esc(css_class)}" alt="{esc(alt)}"{size} src="{png_data_uri(png)}">'


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes and release it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
        fig.clear()
    return buffer.getvalue()


def tile_png(pixels: np.ndarray, min_px: int = MIN_TILE_PX) -> bytes:
    """PNG of one uint8 image (H, W) or (H, W, C), enlarged by whole pixels (nearest neighbour)."""
    array = np.asarray(pixels, dtype=np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    scale = max(1, math.ceil(min_px / max(array.shape[0], array.shape[1])))
    array = array.repeat(scale, 0).repeat(scale, 1)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """A complete HTML document: sticky table of contents, then the sections."""
    toc = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<div class="layout"><nav class="toc"><h2>Contents</h2>{toc}</nav><main>'
        f'<header class="page"><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>'
        f"{body}</main></div></body></html>\n"
    )
