"""The pieces every report page shares: the stylesheet, escaping and number formatting, embedded images, badges
and cards."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

CSS = """
:root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bg: #ffffff; --soft: #f6f8fb; --accent: #2f6fdf;
        --good: #1e8e3e; --bad: #c0392b; --warn: #b7791f; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--soft); color: var(--fg);
       font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
header { background: var(--bg); border-bottom: 1px solid var(--line); }
header .inner { max-width: 1120px; margin: 0 auto; padding: 20px 28px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 0 0 12px; }
h3 { font-size: 14px; margin: 16px 0 8px; }
.sub { color: var(--muted); font-size: 13px; }
section { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 18px 20px; margin: 18px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin-top: 18px; }
.card { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 20px; font-weight: 600; margin-top: 2px; }
.card .note { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: var(--good); } .neg { color: var(--bad); } .ci { color: var(--muted, #777); font-size: 0.85em; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.ok { background: #e6f4ea; color: var(--good); } .badge.bad { background: #fdecea; color: var(--bad); }
.badge.warn { background: #fdf3e1; color: var(--warn); } .badge.info { background: #e8f0fe; color: var(--accent); }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 14px; }
.plots figure { margin: 0; } .plots figure.wide { grid-column: 1 / -1; }
.plots img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
.plots figure.wide img { width: auto; max-width: 100%; }
table + .plots { margin-top: 14px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 2px; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; overflow-x: auto;
      font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-word; margin: 0; }
details { margin: 6px 0; } summary { cursor: pointer; color: var(--accent); }
.sample { border-top: 1px solid var(--line); padding: 10px 0; }
.sample:first-of-type { border-top: none; }
.answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 8px; margin-top: 6px; }
.answers .label { color: var(--muted); font-size: 12px; margin-bottom: 2px; }
.answers .marks { font-size: 11px; }
.note { color: var(--muted); font-size: 13px; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def delta_cell(value, digits: int = 1, *, lower_is_better: bool = False, ci: list | None = None) -> str:
    """A delta; with its 95% interval `ci` it is shown beside it and coloured only when the interval excludes zero
    (a difference the data cannot tell from noise stays grey)."""
    if value is None:
        return '<td class="num">–</td>'
    good = value < 0 if lower_is_better else value > 0
    css = "pos" if good and abs(value) > 1e-12 else ("neg" if abs(value) > 1e-12 else "")
    if ci is None:
        return f'<td class="num {css}">{value:+.{digits}f}</td>'
    if ci[0] <= 0 <= ci[1]:
        css = ""
    interval = f'<span class="ci">[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]</span>'
    return f'<td class="num {css}">{value:+.{digits}f} {interval}</td>'


def image(path: Path, alt: str, caption: str = "", wide: bool = False) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    cls = ' class="wide"' if wide else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure{cls}><img alt="{esc(alt)}" src="data:image/png;base64,{encoded}">{cap}</figure>'


def status_badge(state: str) -> str:
    css = {"completed": "ok", "failed": "bad", "running": "warn"}.get(state, "info")
    return f'<span class="badge {css}">{esc(state)}</span>'


def card(label: str, value: str, note: str = "") -> str:
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{value}</div>'
            f'<div class="note">{note}</div></div>')


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
