"""A job's power over time as a small bar chart drawn with block characters, and the one-line
sparkline of a running job's power in the jobs table.

Textual's Sparkline scales bars from the series' minimum to its maximum, which draws a steady 1 kW
as an empty line; power is read against zero, so these start at 0 W. The chart places each point
by time, so steps of uneven length (a short last step, a step changed mid-run) keep their width.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style

from greend import units
from greend.ledger import JobRow

EIGHTHS = " ▁▂▃▄▅▆▇█"
SPARKS = "▁▂▃▄▅▆▇█"
SPARK_W = 8  # points of a running job's sparkline
POWER_W = SPARK_W + 1 + 7  # the jobs table's power cell: sparkline, space, '1.23 kW'


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


def by_time(spans: list[tuple[float, float, float]], t0: float, t1: float, width: int) -> list[float | None]:
    """Mean power in each of `width` equal slices of [t0, t1], weighted by the time each span
    (start, end, watts) covers in the slice; None where no span covers the slice (a gap)."""
    if width <= 0 or t1 <= t0:
        return [spans[-1][2] if spans else None] * max(0, width)
    dt = (t1 - t0) / width
    out: list[float | None] = []
    i = 0
    for c in range(width):
        a, b = t0 + c * dt, t0 + (c + 1) * dt
        while i < len(spans) and spans[i][1] <= a:
            i += 1
        energy = covered = 0.0
        j = i
        while j < len(spans) and spans[j][0] < b:
            ov = min(b, spans[j][1]) - max(a, spans[j][0])
            if ov > 0:
                energy += ov * spans[j][2]
                covered += ov
            j += 1
        out.append(energy / covered if covered > dt * 1e-6 else None)
    return out


def _time_label(t: float, span: float) -> str:
    return time.strftime("%m-%d %H:%M" if span >= 86400 else "%H:%M", time.localtime(t))


class PowerPlot:
    """Rich renderable: bars from 0 W to the peak, the peak and 0 W on the left, start and end below."""

    def __init__(self, watts: list[float], t_start: float, t_end: float, height: int = 4,
                 style: str | Style = "", spans: list[tuple[float, float]] | None = None):
        """watts[i] is the mean power over spans[i] (start, end); without spans the points are
        taken as evenly spread over t_start..t_end."""
        self.watts = watts
        self.t_start = t_start
        self.t_end = t_end
        self.spans = spans
        self.height = max(1, height)
        self.style = Style.parse(style) if isinstance(style, str) else style

    def lines(self, width: int) -> list[str]:
        peak = max(self.watts, default=0.0)
        top = units.power(peak)
        label_w = max(len(top), len("0 W"))
        plot_w = max(1, width - label_w - 2)
        if self.spans is None:
            cols: list[float | None] = list(resample(self.watts, plot_w))
        else:
            cols = by_time([(a, b, w) for (a, b), w in zip(self.spans, self.watts, strict=True)],
                           self.t_start, self.t_end, plot_w)
        levels = [0 if v is None else round(v / peak * self.height * 8) if peak > 0 else 0 for v in cols]
        out = []
        for row in reversed(range(self.height)):
            label = top if row == self.height - 1 else "0 W" if row == 0 else ""
            tick = "┤" if label else "│"
            bars = "".join(EIGHTHS[max(0, min(8, lv - row * 8))] for lv in levels)
            out.append(f"{label:>{label_w}} {tick}{bars}")
        span = self.t_end - self.t_start
        left, right = _time_label(self.t_start, span), _time_label(self.t_end, span)
        if span < 120:  # minutes alone would read 12:00 to 12:00
            left, right = time.strftime("%H:%M:%S", time.localtime(self.t_start)), f"+{span:.3g} s"
        gap = plot_w - len(left) - len(right)
        axis = left + " " * gap + right if gap >= 1 else left
        out.append(" " * (label_w + 2) + axis)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.lines(options.max_width)
        for i, line in enumerate(lines):
            yield Segment(line, self.style if i < len(lines) - 1 else Style(dim=True))
            yield Segment.line()


def power_spans(series, first_seen: float | None = None) -> list[tuple[float, float]]:
    """The time each point of a job's series covers, as tui.data.power_w counts it (a point never
    begins before the job did nor before the previous point ended)."""
    out = []
    prev_end = first_seen if first_seen is not None else float("-inf")
    for p in series:
        start = max(p.t_start, prev_end)
        end = p.t_end if p.t_end > start else start + max(1e-9, p.t_end - p.t_start)
        out.append((start, end))
        prev_end = max(prev_end, p.t_end)
    return out


def sparkline(values: Iterable[float], width: int = SPARK_W) -> str:
    """One character per value (the last `width`), from 0 W to the largest, right-aligned."""
    vals = list(values)[-width:]
    top = max(vals, default=0.0)
    chars = [SPARKS[min(7, int(v / top * 8))] if top > 0 else SPARKS[0] for v in vals]
    return "".join(chars).rjust(width)


class PowerHistory:
    """Each running job's power between two of its updates (energy added over the time between
    them), from the rows the jobs screen reads anyway: the sparkline costs no extra query. A job
    seen for the first time starts with its mean power so far."""

    def __init__(self, keep: int = SPARK_W) -> None:
        self.keep = keep
        self._last: dict[tuple, tuple[float, int]] = {}
        self._watts: dict[tuple, deque[float]] = {}

    @staticmethod
    def key(r: JobRow) -> tuple:
        return (r.cluster, r.job_id, r.submit_time)

    def update(self, rows: Iterable[JobRow]) -> None:
        for r in rows:
            k = self.key(r)
            if r.state != "running":
                self._last.pop(k, None)
                self._watts.pop(k, None)
                continue
            e = r.it_energy_uj
            last = self._last.get(k)
            hist = self._watts.get(k)
            if last is None or hist is None:
                span = r.last_seen - r.first_seen
                self._watts[k] = deque([e / 1e6 / span] if span > 0 and e else [], maxlen=self.keep)
            elif r.last_seen > last[0] and e >= last[1]:
                hist.append((e - last[1]) / 1e6 / (r.last_seen - last[0]))
            else:
                continue
            self._last[k] = (r.last_seen, e)

    def watts(self, r: JobRow) -> list[float]:
        return list(self._watts.get(self.key(r), ()))

    def cell(self, r: JobRow, now: float) -> str:
        """Running: the sparkline and the latest power; ended: the job's mean power."""
        if r.state == "running":
            w = self.watts(r)
            return f"{sparkline(w)} {units.power(w[-1]):>7}" if w else "…"
        span = (r.end_time or r.last_seen) - r.first_seen
        return f"mean {units.power(r.it_energy_uj / 1e6 / span)}" if span > 0 and r.it_energy_uj else "—"
