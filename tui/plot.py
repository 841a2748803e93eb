"""A job's power over time as a small bar chart drawn with block characters.

Textual's Sparkline scales bars from the series' minimum to its maximum, which draws a steady 1 kW
as an empty line; power is read against zero, so this chart starts at 0 W and labels its axes.
"""

from __future__ import annotations

import time

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style

from greend import units

EIGHTHS = " ▁▂▃▄▅▆▇█"


def resample(values: list[float], width: int) -> list[float]:
    """Fit values to width columns: means of groups when there are more, repeats when fewer."""
    n = len(values)
    if n == 0 or width <= 0:
        return []
    if n >= width:
        out = []
        for c in range(width):
            a, b = c * n // width, max((c + 1) * n // width, c * n // width + 1)
            chunk = values[a:b]
            out.append(sum(chunk) / len(chunk))
        return out
    return [values[min(n - 1, c * n // width)] for c in range(width)]


def _time_label(t: float, span: float) -> str:
    return time.strftime("%m-%d %H:%M" if span >= 86400 else "%H:%M", time.localtime(t))


class PowerPlot:
    """Rich renderable: bars from 0 W to the peak, the peak and 0 W on the left, start and end below."""

    def __init__(self, watts: list[float], t_start: float, t_end: float, height: int = 4,
                 style: str | Style = ""):
        self.watts = watts
        self.t_start = t_start
        self.t_end = t_end
        self.height = max(1, height)
        self.style = Style.parse(style) if isinstance(style, str) else style

    def lines(self, width: int) -> list[str]:
        peak = max(self.watts, default=0.0)
        top = units.power(peak)
        label_w = max(len(top), len("0 W"))
        plot_w = max(1, width - label_w - 2)
        cols = resample(self.watts, plot_w)
        levels = [round(v / peak * self.height * 8) if peak > 0 else 0 for v in cols]
        out = []
        for row in reversed(range(self.height)):
            label = top if row == self.height - 1 else "0 W" if row == 0 else ""
            tick = "┤" if label else "│"
            bars = "".join(EIGHTHS[max(0, min(8, lv - row * 8))] for lv in levels)
            out.append(f"{label:>{label_w}} {tick}{bars}")
        span = self.t_end - self.t_start
        left, right = _time_label(self.t_start, span), _time_label(self.t_end, span)
        gap = plot_w - len(left) - len(right)
        axis = left + " " * gap + right if gap >= 1 else left
        out.append(" " * (label_w + 2) + axis)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.lines(options.max_width)
        for i, line in enumerate(lines):
            yield Segment(line, self.style if i < len(lines) - 1 else Style(dim=True))
            yield Segment.line()
