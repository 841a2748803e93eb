"""A cluster's carbon intensity as decisions and accounting use it: the live signal of its provider
(greend.collectors.carbon_signal) cached in the state directory, then the cache, then the CSV series,
then the static value; the source actually used, and why, goes with every figure.

Never blocks beyond the signal's timeout_s: a stale cache triggers at most one bounded fetch, and a
failed fetch is not retried for retry_s (the fallback stands meanwhile).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .collectors import carbon_signal as cs
from .footprint import Factors
from .site_factors import CarbonSeries, ClusterFactors, cluster_factors, value_at

if TYPE_CHECKING:  # `greend route`'s fast path reads a cached view, without greend.config
    from .config import Cluster, Config

log = logging.getLogger(__name__)

CACHE_DIR = "carbon-signal"
CACHE_VERSION = 1
OBSERVED_HOLD_S = 3600.0
DAY_S = 86400.0


def hhmm(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


class LiveSeries:
    """What a cluster's carbon intensity comes from now: points (times, values; each holds until the
    next, the last for max_gap_s) or none (the static value), with source and fallback note. Has the
    interface of config.CarbonSeries (at, source), so ClusterFactors takes it as it is."""

    def __init__(self, kind: str, source: str, static_g: float, times: list[float] | None = None,
                 values: list[float] | None = None, max_gap_s: float = 3600.0, note: str = "",
                 fetched_at: float | None = None, used: str = ""):
        self.kind = kind
        """live (fresh from the provider), cache (an older fetch), series (the CSV), static."""
        self.source = source
        self.static_g = static_g
        self.times = times or []
        self.values = values or []
        self.max_gap_s = max_gap_s
        self.note = note
        """Why this is a fallback (the provider's error), or empty."""
        self.fetched_at = fetched_at
        self.used = used or source
        """The source without the fallback note."""

    def at(self, t: float) -> float | None:
        return value_at(self.times, self.values, self.max_gap_s, t)

    def span(self) -> tuple[float, float] | None:
        return (self.times[0], self.times[-1] + self.max_gap_s) if self.times else None

    def coverage_warning(self, start: float, end: float, what: str = "") -> str | None:
        """None when the points cover [start, end]; else what they cover and what stands in."""
        span = self.span()
        what = what or f"[{hhmm(start)} .. {hhmm(end)}]"
        if span is None:
            return None if self.kind == "static" and not self.note else (
                f"no carbon intensity series or forecast for {what}: the static {self.static_g:.4g} g/kWh "
                "applies")
        a, b = span
        if a <= start and b >= end:
            return None
        covered = f"{self.used} covers {hhmm(a)} .. {hhmm(b)}"
        if b <= start or a >= end:
            return f"{covered}, not {what}: the static {self.static_g:.4g} g/kWh applies"
        return f"{covered}, not all of {what}: the static {self.static_g:.4g} g/kWh applies outside it"


def cache_path(state_dir: Path, cluster: str) -> Path:
    return Path(state_dir) / CACHE_DIR / (re.sub(r"[^A-Za-z0-9_.-]", "_", cluster) + ".json")


def _read_cache(path: Path, key: dict) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("carbon signal cache %s unreadable, ignored: %s", path, e)
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("key") != key:
        return None  # another provider, zone or URL: not this signal's
    try:
        pts = [(float(t), float(v)) for t, v in data.get("points") or []]
        float(data.get("fetched_at") or 0)
        float(data.get("step_s") or 3600)
    except (TypeError, ValueError):
        log.warning("carbon signal cache %s malformed, ignored", path)
        return None
    data["points"] = sorted(pts)
    return data


def _write_cache(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write the carbon signal cache %s: %s", path, e)
        tmp.unlink(missing_ok=True)


def _token(path: Path | None):
    def read() -> str:
        if path is None:
            raise cs.SignalError("no token_file")
        try:
            tok = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise cs.SignalError(f"token_file {path}: cannot read: {e.strerror}") from None
        if not tok:
            raise cs.SignalError(f"token_file {path} is empty")
        return tok
    return read


def _label(provider: str, zone: str, fetched_at: float, forecast_from: float | None, notes: list[str]) -> str:
    name = cs.PROVIDERS.get(provider, provider)
    kind = "observed + forecast" if forecast_from is not None else "observed (no forecast)"
    extra = f"; {'; '.join(notes)}" if notes else ""
    return f"{name} ({zone}) {kind}, fetched {hhmm(fetched_at)}{extra}"


def resolve(name: str, cluster: Cluster, static: Factors, series: CarbonSeries | None, state_dir: Path | None,
            *, now: float | None = None, fetch: bool = True, force: bool = False) -> LiveSeries:
    """The carbon intensity a decision on cluster `name` uses now. fetch=False: the cache only;
    force=True: ask the provider now, whatever the cache and the last error (on demand)."""
    static_g = static.carbon_intensity_g_per_kwh
    static_src = static.sources.get("carbon_intensity_g_per_kwh", "")

    def fallback(note: str) -> LiveSeries:
        if series is not None:
            return LiveSeries("series", f"{series.source} (fallback: {note})", static_g, series.times,
                              series.values, series.max_gap_s, note, used=series.source)
        used = f"static {static_g:.4g} g/kWh, {static_src}"
        return LiveSeries("static", f"{used} (fallback: {note})", static_g, note=note, used=used)

    sig = cluster.carbon_signal
    if sig is None:
        if series is not None:
            return LiveSeries("series", series.source, static_g, series.times, series.values,
                              series.max_gap_s)
        return LiveSeries("static", f"static {static_g:.4g} g/kWh, {static_src}", static_g)

    now = time.time() if now is None else now
    provider = cs.PROVIDERS[sig.provider]
    zone = (sig.zone or cs.DEFAULT_ZONES.get(sig.provider, "")).upper()
    url = sig.url or cs.DEFAULT_URLS[sig.provider]
    key = {"provider": sig.provider, "zone": zone, "url": url}
    path = cache_path(state_dir, name) if state_dir is not None else None
    cache = _read_cache(path, key) if path is not None else None

    def from_cache(c: dict, kind: str, note: str = "") -> LiveSeries:
        pts = c["points"]
        used = _label(sig.provider, zone, c["fetched_at"], c.get("forecast_from"), c.get("notes") or [])
        if note:
            used += ", cached"
        step = float(c.get("step_s") or 3600)
        # Without a forecast the latest observation is the best estimate of now: it stands for up to
        # an hour (eCO2mix publishes taux_co2 with some delay), then the static value does.
        hold = step if c.get("forecast_from") is not None else max(step, OBSERVED_HOLD_S)
        if sig.forecast == "persistence-24h" and c.get("forecast_from") is None and pts:
            # The naive day-ahead baseline, stated as such: tomorrow repeats the last 24 h observed.
            last = pts[-1][0]
            pts = pts + [(t + DAY_S, v) for t, v in pts if last < t + DAY_S]
            used = used.replace("observed (no forecast)", "observed + 24 h persistence forecast (the last "
                                "day repeated)")
            hold = step
        return LiveSeries(kind, f"{used} (fallback: {note})" if note else used, static_g,
                          [t for t, _ in pts], [v for _, v in pts], hold, note, c["fetched_at"], used)

    if cache and cache["points"] and now - cache["fetched_at"] < sig.refresh_s and not (fetch and force):
        return from_cache(cache, "live")

    err, why = "", "unreachable"
    last_attempt = float(cache.get("last_attempt") or 0) if cache else 0.0
    if cache and cache.get("last_error") and now - last_attempt < sig.retry_s and not (fetch and force):
        err = f"{cache['last_error']} (at {hhmm(last_attempt)}; next try after {sig.retry_s:g} s)"
    elif not fetch:
        why = "not asked"
        err = ("no cache" if cache is None or not cache["points"]
               else f"cache of {hhmm(cache['fetched_at'])} older than refresh_s {sig.refresh_s:g}")
    else:
        try:
            s = cs.fetch_bounded(sig.timeout_s + 0.5, lambda: cs.fetch(
                sig.provider, url, zone, now, sig.timeout_s, _token(sig.token_file)))
        except cs.SignalError as e:
            err = str(e)
            log.info("carbon signal of %s (%s): %s", name, provider, err)
            if path is not None:
                _write_cache(path, {**(cache or {"version": CACHE_VERSION, "key": key, "points": [],
                                                 "fetched_at": 0.0, "step_s": 3600.0}),
                                    "last_attempt": now, "last_error": err})
        else:
            fresh = {"version": CACHE_VERSION, "key": key, "fetched_at": now, "points": s.points,
                     "step_s": s.step_s, "forecast_from": s.forecast_from, "notes": s.notes,
                     "last_attempt": now, "last_error": ""}
            if path is not None:
                _write_cache(path, fresh)
            fresh["points"] = sorted(s.points)
            return from_cache(fresh, "live")
    note = f"{provider} {why}: {err}"
    if cache and cache["points"] and now - cache["fetched_at"] <= sig.max_age_s:
        return from_cache(cache, "cache", note)
    if cache and cache["points"]:
        note += f"; cached signal of {hhmm(cache['fetched_at'])} older than max_age_s {sig.max_age_s:g}"
    return fallback(note)


def live_factors(cfg: Config, name: str | None = None, state_dir: Path | None = None, *,
                 now: float | None = None, fetch: bool = True) -> ClusterFactors:
    """config.cluster_factors with the live signal plugged in (for accounting: the daemon's factor
    refresh). Without a carbon_signal it is config.cluster_factors itself."""
    name = name or cfg.cluster
    cf = cluster_factors(cfg, name)
    c = cfg.clusters[name]
    if c.carbon_signal is None:
        return cf
    static = cf.at(float("-inf"))
    live = resolve(name, c, static, cf.series, state_dir or cfg.resolved_state_dir(), now=now, fetch=fetch)
    out = ClusterFactors(c, live if live.times else None)
    if not live.times:
        out._static = with_source(out._static, live.source)
    return out


def with_source(f: Factors, ci_source: str) -> Factors:
    src = dict(f.sources)
    src["carbon_intensity_g_per_kwh"] = ci_source
    return Factors(f.pue, f.wue_site_l_per_kwh, f.ewif_l_per_kwh, f.carbon_intensity_g_per_kwh, src)


def coverage_warnings(cfg: Config, now: float, horizon_s: float, state_dir: Path | None = None, *,
                      fetch: bool = True, force: bool = False) -> list[str]:
    """What `greend config check` warns about: a configured signal that cannot be read, a series or
    forecast that does not cover now .. now + horizon_s."""
    out = []
    what = f"now .. +{horizon_s / 3600:g} h ({hhmm(now)} .. {hhmm(now + horizon_s)})"
    for name, c in cfg.clusters.items():
        if c.carbon_signal is None and c.carbon_intensity_series is None:
            continue
        cf = cluster_factors(cfg, name)
        live = resolve(name, c, cf.at(float("-inf")), cf.series, state_dir or cfg.resolved_state_dir(),
                       now=now, fetch=fetch, force=force)
        key = "carbon_signal" if c.carbon_signal is not None else "carbon_intensity_series"
        if live.note:
            out.append(f"clusters.{name}.{key}: {live.note}; decisions use {live.used}")
        w = live.coverage_warning(now, now + horizon_s, what)
        if w:
            out.append(f"clusters.{name}.{key}: {w}")
    return out
