"""Pictures and the self-contained HTML report of ``ldct evaluate``.

Nothing is measured here (metrics live in ``ldct_cli.metrics``): every function takes
plain arrays and strings and draws or formats them. Figures are rendered with the Agg
canvas directly (no pyplot, no global state, no display needed), into memory, and each
file is written atomically: a temporary file beside the target, then ``os.replace``.

Every string that reaches a picture is drawn literally (``parse_math=False``: a ``$`` in
a Series Description is not mathtext) and every string that reaches the HTML is escaped
(labels come from DICOM headers and folder names and must not inject markup).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ldct_cli.fsutil import atomic_path

__all__ = ["Panel", "Table", "write_montage", "write_nps_plot", "write_profile_plot", "write_html"]

PANEL_INCHES = 3.0
DPI = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Distinct, saturated colours that read on a grayscale image; ROI k has the same colour in
# every panel of a montage.
_ROI_COLOURS = ("#00e5ff", "#ffd600", "#76ff03", "#ff4081", "#ff9100", "#b388ff", "#1de9b6", "#ff1744")
_KINDS = ("image", "difference")


@dataclass(frozen=True)
class Panel:
    """One picture of a montage row.

    ``image_hu`` is a 2-D array in HU. For ``kind="difference"`` it is the difference
    to the reference (signed or already absolute: its absolute value is shown).
    ``rois`` are squares given as (top-left row, top-left column, size) in pixels.
    """

    label: str
    image_hu: np.ndarray
    note: str = ""
    kind: str = "image"
    rois: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Panel kind must be one of {_KINDS}, not {self.kind!r}")
        if np.ndim(self.image_hu) != 2:
            raise ValueError(f"Panel {self.label!r}: image must be 2-D, got shape {np.shape(self.image_hu)}")
        for roi in self.rois:
            if len(roi) != 3 or roi[2] <= 0:
                raise ValueError(f"Panel {self.label!r}: ROI must be (row, col, size>0), got {roi!r}")


@dataclass(frozen=True)
class Table:
    """A table of the HTML report: already formatted strings."""

    caption: str
    header: list[str]
    rows: list[list[str]]


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through the project's temp-and-rename (fsutil.atomic_path)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return _atomic_write(path, buffer.getvalue())


def _wrap(text: str, width: int, max_lines: int | None = None) -> str:
    lines = textwrap.wrap(" ".join(str(text).split()), width=width, break_long_words=True, break_on_hyphens=False,
                          max_lines=max_lines, placeholder=" …")
    return "\n".join(lines)


def _label(text: str) -> str:
    return _wrap(text, 34, max_lines=3)


def _note(text: str) -> str:
    return _wrap(text, 40, max_lines=3)


def _fmt(value: float) -> str:
    return f"{value:g}"


# --------------------------------------------------------------------------- montage


def write_montage(path: Path, *, rows: list[list[Panel]], window: tuple[float, float], window_label: str,
                  title: str = "", diff_window: tuple[float, float] = (0, 100)) -> Path:
    """PNG grid: one row per slice, grayscale images in ``window``, |differences| in ``diff_window``.

    ``window_label`` is stated under the title as given (e.g. "window [-160, 240] HU
    (L = 400)"); when empty it is built from ``window``.
    """
    rows = [list(row) for row in rows if row]
    if not rows:
        raise ValueError("write_montage: no panels")
    low, high = map(float, window)
    d_low, d_high = map(float, diff_window)
    if not high > low or not d_high > d_low:
        raise ValueError(f"write_montage: empty window {window} or diff_window {diff_window}")
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    has_diff = any(p.kind == "difference" for row in rows for p in row)

    subtitle = window_label or f"window [{_fmt(low)}, {_fmt(high)}] HU (L = {_fmt(high - low)})"
    if has_diff:
        subtitle += f"   ·   |difference| shown in [{_fmt(d_low)}, {_fmt(d_high)}] HU (magma)"
    # Height from the text each row carries: panel titles and notes may wrap over lines.
    line_in = 0.19
    row_in = []
    for row in rows:
        title_lines = max(_label(p.label).count("\n") + 1 for p in row)
        below = max((_note(p.note).count("\n") + 1 if p.note else 0) * line_in
                    + (0.5 if p.kind == "difference" else 0.0) for p in row)
        row_in.append(PANEL_INCHES + title_lines * line_in + max(below, line_in) + 0.15)
    heading = (f"{_wrap(title, 40 * n_cols)}\n" if title else "") + subtitle
    header_in = 0.25 * (heading.count("\n") + 1) + 0.1
    fig = _new_figure(n_cols * PANEL_INCHES, sum(row_in) + header_in)
    fig.get_layout_engine().set(w_pad=0.04, h_pad=0.04, wspace=0.02, hspace=0.02)
    fig.suptitle(heading, fontsize=13, parse_math=False)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, gridspec_kw={"height_ratios": row_in})

    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_axis_off()
                continue
            _draw_panel(ax, row[c], (low, high), (d_low, d_high))
    return _save_png(fig, path)


def _draw_panel(ax, panel: Panel, window: tuple[float, float], diff_window: tuple[float, float]) -> None:
    image = np.asarray(panel.image_hu, dtype=np.float32)
    if panel.kind == "difference":
        shown = ax.imshow(np.abs(image), cmap="magma", vmin=diff_window[0], vmax=diff_window[1],
                          interpolation="antialiased")
        # A small colour bar in the space under the panel, where image panels have their note.
        bar = ax.inset_axes((0.2, -0.045, 0.6, 0.03))
        colourbar = ax.figure.colorbar(shown, cax=bar, orientation="horizontal",
                                       ticks=[diff_window[0], diff_window[1]])
        colourbar.outline.set_linewidth(0.5)
        bar.tick_params(labelsize=8, length=2, pad=1)
        bar.set_xticklabels([_fmt(diff_window[0]), _fmt(diff_window[1])])
        bar.set_xlabel("|difference| (HU)", fontsize=8, labelpad=1)
    else:
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], interpolation="antialiased")
    for k, (row, col, size) in enumerate(panel.rois):
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), size, size, fill=False, linewidth=1.0,
                               edgecolor=_ROI_COLOURS[k % len(_ROI_COLOURS)]))
        ax.text(col - 0.5, row - 1.5, str(k + 1), color=_ROI_COLOURS[k % len(_ROI_COLOURS)], fontsize=7,
                ha="left", va="bottom", parse_math=False)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
        spine.set_color("#888888")
    ax.set_title(_label(panel.label), fontsize=10, fontweight="bold", pad=4, parse_math=False)
    ax.set_xlabel(_note(panel.note), fontsize=9, labelpad=32 if panel.kind == "difference" else 4,
                  parse_math=False)


# --------------------------------------------------------------------------- line plots


def _line_figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, object]:
    fig = _new_figure(8.0, 5.0)
    ax = fig.subplots()
    if title:
        ax.set_title(title, fontsize=13, parse_math=False)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, color="#dddddd", linewidth=0.7)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _finish_legend(ax, n: int) -> None:
    if n == 0:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888888")
        return
    legend = ax.legend(fontsize=9, frameon=True, framealpha=0.9, ncols=1 if n <= 8 else 2)
    for text in legend.get_texts():
        text.set_parse_math(False)


def _curve(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"curve {name!r}: x has {x.size} values, y has {y.size}")
    # Non-finite values (an infinite PSNR of identical slices, a missing score) leave a gap.
    y = np.where(np.isfinite(y), y, np.nan)
    return x, y


def write_nps_plot(path: Path, *, curves: dict[str, tuple[np.ndarray, np.ndarray]],
                   title: str = "Noise power spectrum", f_avg: dict[str, float] | None = None) -> Path:
    """Radially averaged NPS of every series on one plot: frequency (mm⁻¹) vs HU²·mm²."""
    fig, ax = _line_figure(title, "spatial frequency (mm$^{-1}$)", "NPS (HU$^2$·mm$^2$)")
    f_avg = f_avg or {}
    for name, (f, nps) in curves.items():
        f, nps = _curve(f, nps, name)
        label = name
        value = f_avg.get(name)
        if value is not None and math.isfinite(float(value)):
            label = f"{name}  (f_avg = {float(value):.3f} mm⁻¹)"
        (line,) = ax.plot(f, nps, linewidth=1.6, label=label)
        if value is not None and math.isfinite(float(value)):
            ax.axvline(float(value), color=line.get_color(), linewidth=0.8, linestyle=":")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    _finish_legend(ax, len(curves))
    return _save_png(fig, path)


def write_profile_plot(path: Path, *, curves: dict[str, tuple[np.ndarray, np.ndarray]], ylabel: str,
                       xlabel: str = "slice position z (mm)", title: str = "") -> Path:
    """One line per series of a per-slice quantity (e.g. PSNR) along z."""
    fig, ax = _line_figure(title, xlabel, ylabel)
    ax.xaxis.label.set_parse_math(False)
    ax.yaxis.label.set_parse_math(False)
    for name, (x, y) in curves.items():
        x, y = _curve(x, y, name)
        order = np.argsort(x, kind="stable")
        ax.plot(x[order], y[order], linewidth=1.4, marker="o" if x.size <= 60 else None, markersize=3,
                label=name)
    _finish_legend(ax, len(curves))
    return _save_png(fig, path)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 2em auto; max-width: 1200px; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0 1.4em; font-size: .92em; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .4em; }
th, td { border: 1px solid #d0d7de; padding: .35em .7em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.settings th { width: 14em; }
figure { margin: 1.2em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { font-weight: 600; margin-bottom: .4em; }
footer { margin-top: 3em; color: #656d76; font-size: .85em; }
"""

_NUMERIC = re.compile(r"^\s*[-+−]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?(\s*(±|\+/-)\s*\d+(\.\d*)?([eE][-+]?\d+)?)?"
                      r"\s*(%|dB|HU|mm)?\s*$")


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cell(tag: str, value: object) -> str:
    text = str(value)
    css = ' class="num"' if tag == "td" and _NUMERIC.match(text) else ""
    return f"<{tag}{css}>{_esc(text)}</{tag}>"


def _table_html(table: Table, css_class: str = "") -> str:
    css = f' class="{css_class}"' if css_class else ""
    parts = [f"<table{css}>", f"<caption>{_esc(table.caption)}</caption>"]
    if table.header:
        parts.append("<thead><tr>" + "".join(_cell("th", h) for h in table.header) + "</tr></thead>")
    parts.append("<tbody>")
    for row in table.rows:
        parts.append("<tr>" + "".join(_cell("td", v) for v in row) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _data_uri(path: Path) -> str:
    data = Path(path).read_bytes()
    if data.startswith(PNG_SIGNATURE):
        mime = "image/png"
    elif data.startswith(_JPEG_SIGNATURE):
        mime = "image/jpeg"
    else:
        raise ValueError(f"{path}: not a PNG or JPEG image, cannot embed it")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def write_html(path: Path, *, title: str, settings: dict[str, str], tables: list[Table],
               images: list[tuple[str, Path]]) -> Path:
    """One self-contained HTML file: settings, tables and images embedded as data URIs.

    No external resource, no script; every given string is HTML-escaped.
    """
    settings_rows = "\n".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in settings.items())
    body = [
        f"<h1>{_esc(title)}</h1>",
        "<h2>Settings</h2>",
        f'<table class="settings"><tbody>\n{settings_rows}\n</tbody></table>' if settings else "<p>(none)</p>",
    ]
    if tables:
        body.append("<h2>Scores</h2>")
        body.extend(_table_html(t) for t in tables)
    if images:
        body.append("<h2>Figures</h2>")
        for caption, image_path in images:
            body.append(f'<figure><figcaption>{_esc(caption)}</figcaption>'
                        f'<img src="{_data_uri(image_path)}" alt="{_esc(caption)}"></figure>')
    document = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        *body,
        "<footer>Generated by ldct_cli. Self-contained: every image is embedded in this file.</footer>",
        "</body>",
        "</html>",
        "",
    ])
    return _atomic_write(path, document.encode("utf-8"))
