"""A cluster's carbon intensity over time as a step function, for mean intensity over a job's run and
for the lowest-carbon start before a deadline.

The steps are those of `greend.config.ClusterFactors`: a series point holds until the next one
(the last one for the series' max gap), and the static value holds outside the series. Integrals
are precomputed, so a mean over any window costs two binary searches.
"""

from __future__ import annotations

import bisect

from greend import quantities as q

from .records import Record


class Window(Record):
    start: float
    end: float
    mean_g_per_kwh: float

    __slots__ = ("end", "mean_g_per_kwh", "start")

    def __init__(self, start: float, end: float, mean_g_per_kwh: float):
        self.start = start
        self.end = end
        self.mean_g_per_kwh = mean_g_per_kwh


class CarbonWindow:
    def __init__(self, static_g_per_kwh: float, times: list[float] | None = None,
                 values: list[float] | None = None, max_gap_s: float = 3 * 3600, source: str = ""):
        self.static = float(static_g_per_kwh)
        self.source = source
        bps: list[float] = []
        vals: list[float] = []  # vals[k] holds on [bps[k], bps[k+1])
        times = times or []
        values = values or []
        for t, v in zip(times, values, strict=True):
            if bps and bps[-1] == t:
                vals[-1] = v
            else:
                bps.append(t)
                vals.append(v)
        if bps:
            # As CarbonSeries.at: a point holds until the next; the last one for max_gap_s.
            bps.append(bps[-1] + max_gap_s)
            vals.append(self.static)
        self.bps = bps
        self.vals = vals
        cum = [0.0]
        for k in range(len(bps) - 1):
            cum.append(cum[-1] + (bps[k + 1] - bps[k]) * vals[k])
        self.cum = cum

    @property
    def has_series(self) -> bool:
        return bool(self.bps)

    def covers(self, start: float, end: float) -> bool:
        """Whether the series (not the static value) gives the intensity all over [start, end]."""
        return bool(self.bps) and self.bps[0] <= start and end <= self.bps[-1]

    def coverage_note(self, start: float, end: float) -> str:
        """Empty when the series covers [start, end]; else what it covers and what stands in."""
        if self.covers(start, end):
            return ""
        if not self.bps:
            return f"no series: static {self.static:.4g} g/kWh"
        a, b = self.bps[0], self.bps[-1]
        how = "does not cover" if b <= start or a >= end else "covers only part of"
        return (f"the series ({q.iso(a)} .. {q.iso(b)}) {how} {q.iso(start)} .. {q.iso(end)}: static "
                f"{self.static:.4g} g/kWh outside it")

    def at(self, t: float) -> float:
        bps = self.bps
        if not bps or t < bps[0] or t >= bps[-1]:
            return self.static
        return self.vals[bisect.bisect_right(bps, t) - 1]

    def _integral(self, t: float) -> float:
        """Integral of the intensity from bps[0] to t (negative before it)."""
        bps = self.bps
        if t <= bps[0]:
            return (t - bps[0]) * self.static
        if t >= bps[-1]:
            return self.cum[-1] + (t - bps[-1]) * self.static
        k = bisect.bisect_right(bps, t) - 1
        return self.cum[k] + (t - bps[k]) * self.vals[k]

    def mean(self, start: float, end: float) -> float:
        """Time-weighted mean intensity over [start, end] (a job drawing constant power)."""
        if not self.bps or end <= start:
            return self.at(start)
        return (self._integral(end) - self._integral(start)) / (end - start)

    def lowest(self, earliest: float, latest: float, duration: float) -> Window:
        """The start in [earliest, latest] whose window [s, s + duration] has the lowest mean; ties go
        to the earliest start. The mean of a step function over a sliding window is piecewise linear
        in s, so its minimum is at an end of the range or where s or s + duration meets a step."""
        if latest < earliest:
            latest = earliest
        starts = {earliest, latest}
        if self.bps:
            lo = bisect.bisect_right(self.bps, earliest)
            hi = bisect.bisect_left(self.bps, latest)
            starts.update(self.bps[lo:hi])
            lo = bisect.bisect_right(self.bps, earliest + duration)
            hi = bisect.bisect_left(self.bps, latest + duration)
            starts.update(b - duration for b in self.bps[lo:hi])
        best: Window | None = None
        for s in sorted(starts):
            m = self.mean(s, s + duration)
            if best is None or m < best.mean_g_per_kwh - 1e-9:
                best = Window(s, s + duration, m)
        assert best is not None
        return best
