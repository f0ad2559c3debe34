"""Inline SVG line charts for the HTML report: no JavaScript, no external files.

Only what the report needs: several series on linear (or log-x) axes with nice ticks, a
legend, optional markers. Long series are thinned to keep the HTML small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_MAX_POINTS = 400


@dataclass(frozen=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    markers: bool = False


def cdf_series(label: str, values: Sequence[float]) -> Series:
    """Empirical CDF as a series: x = value, y = fraction of samples <= x."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size > _MAX_POINTS:  # evaluate at evenly spaced quantiles, keep both ends
        q = np.linspace(0.0, 1.0, _MAX_POINTS)
        return Series(label, np.quantile(v, q).tolist(), q.tolist())
    return Series(label, v.tolist(), (np.arange(1, v.size + 1) / max(v.size, 1)).tolist())


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.6g}"


def line_chart(series: Sequence[Series], title: str, x_label: str, y_label: str,
               width: int = 560, height: int = 320, log_x: bool = False, y_from_zero: bool = True,
               legend_bottom: bool = False) -> str:
    """Render series as an SVG string.

    Args:
        series: what to draw; empty series are skipped.
        title, x_label, y_label: text (escaped here).
        width, height: pixels.
        log_x: log10 x axis (request-rate sweeps); non-positive x values are dropped.
        y_from_zero: include 0 in the y range.
        legend_bottom: legend in the lower right (CDFs leave that corner empty).

    Returns:
        An <svg> element.
    """
    left, right, top, bottom = 64, 16, 30, 44
    pw, ph = width - left - right, height - top - bottom
    pts = []
    for s in series:
        xy = [(float(x), float(y)) for x, y in zip(s.xs, s.ys, strict=True)
              if math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x)]
        if xy:
            pts.append((s, xy))
    out = [f'<svg width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" class="chart">',
           f'<text x="{width / 2}" y="18" text-anchor="middle" class="title">{escape(title)}</text>']
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(out)
    xs = [x for _, xy in pts for x, _ in xy]
    ys = [y for _, xy in pts for _, y in xy]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    if log_x:
        x_ticks = [10.0**e for e in range(math.floor(fx(min(xs))), math.ceil(fx(max(xs))) + 1)]
    else:
        x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(0.0, min(ys)) if y_from_zero else min(ys), max(ys))
    x0, x1 = fx(x_ticks[0]), fx(x_ticks[-1])
    y0, y1 = y_ticks[0], y_ticks[-1]

    def px(v: float) -> float:
        return left + (fx(v) - x0) / ((x1 - x0) or 1.0) * pw

    def py(v: float) -> float:
        return top + ph - (v - y0) / ((y1 - y0) or 1.0) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>')
    for t in x_ticks:
        out.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + ph}" class="grid"/>'
                   f'<text x="{px(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for t in y_ticks:
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + pw}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">{escape(y_label)}</text>')
    for i, (s, xy) in enumerate(pts):
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in xy)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if s.markers:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in xy)
        ly = (top + ph - 10 - 16 * (len(pts) - 1 - i)) if legend_bottom else top + 14 + 16 * i
        lx = left + pw - 200 if legend_bottom else left + 10
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="12" height="3" fill="{color}"/>'
                   f'<text x="{lx + 17}" y="{ly - 4}" class="legend">{escape(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)
