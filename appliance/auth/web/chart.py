"""A project's storage use over time as a small inline SVG (no chart library, no script).

Pure: points in, markup out, tested as such. Every number is formatted here and every
piece of text escaped, so the result may be put into a page as it is. The line is a
step line: between two computations the use is the last one computed (pushes since
show in the last point, which the page adds as "now").
"""

from __future__ import annotations

import datetime as dt
from html import escape

from appliance.auth.sizes import format_size

WIDTH, HEIGHT = 600, 200
LEFT, RIGHT, TOP, BOTTOM = 70, 10, 10, 30


def usage_chart(points: list[tuple[float, int]], quota: int | None, title: str) -> str:
    """SVG markup of (time, bytes) points, oldest first, with the quota as a dashed line."""
    label = escape(title)
    if not points:
        return ""
    times = [t for t, _ in points]
    values = [v for _, v in points]
    top_value = max([*values, quota or 0, 1])
    start, end = min(times), max(times)
    span = (end - start) or 1.0

    def x(t: float) -> float:
        if end == start:
            return LEFT + (WIDTH - LEFT - RIGHT) / 2
        return LEFT + (t - start) / span * (WIDTH - LEFT - RIGHT)

    def y(v: int) -> float:
        return TOP + (1 - v / top_value) * (HEIGHT - TOP - BOTTOM)

    path = []
    for index, (t, v) in enumerate(points):
        if index:
            path.append(f"L{x(t):.1f},{y(points[index - 1][1]):.1f}")
        path.append(f"{'M' if not index else 'L'}{x(t):.1f},{y(v):.1f}")
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label}"'
        ' xmlns="http://www.w3.org/2000/svg">',
        f"<title>{label}</title>",
        f'<line class="axis" x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}"'
        f' y2="{HEIGHT - BOTTOM}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">{escape(format_size(top_value))}'
        "</text>",
        f'<text x="{LEFT - 6}" y="{HEIGHT - BOTTOM}" text-anchor="end">0</text>',
        f'<text x="{LEFT}" y="{HEIGHT - 8}">{escape(_label(start, span))}</text>',
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end">'
        f"{escape(_label(end, span))}</text>",
    ]
    if quota is not None:
        parts.append(
            f'<line class="quota" x1="{LEFT}" y1="{y(quota):.1f}" x2="{WIDTH - RIGHT}"'
            f' y2="{y(quota):.1f}"><title>quota {escape(format_size(quota))}</title></line>'
        )
    parts.append(f'<path class="line" d="{" ".join(path)}"/>')
    for t, v in points:
        parts.append(
            f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="currentColor">'
            f"<title>{escape(_moment(t))}: {escape(format_size(v))}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _label(t: float, span: float) -> str:
    """The axis' ends: the day, or the time of day too over a span under two days."""
    shape = "%Y-%m-%d" if span >= 2 * 86400 else "%Y-%m-%d %H:%M UTC"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime(shape)


def _moment(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
