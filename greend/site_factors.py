"""The factors in force for a cluster at a time t: static ones from its configuration (PUE, WUE,
EWIF, carbon intensity, with their sources) and the carbon intensity of its series file.

Free of pydantic and of the configuration models (it reads their attributes only), so that the
fast paths of `greend measure` and `greend route` (greend.config_cache) can use it without
importing greend.config. greend.config re-exports every name.
"""

from __future__ import annotations

import bisect
import csv
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import refdata
from .errors import ConfigError
from .footprint import Factors

if TYPE_CHECKING:
    from .config import Cluster, Config

# Defaults for a site that has not measured its own factors: docs/methodology.md §3-4.
DEFAULT_PUE = 1.56
DEFAULT_PUE_SOURCE = "unknown site: Uptime Institute 2024 global survey average"
DEFAULT_WUE = 1.8
DEFAULT_WUE_SOURCE = "unknown site: U.S. data-centre average on-site WUE (LBNL 2016)"


def value_at(times: list[float], values: list[float], max_gap_s: float, t: float) -> float | None:
    """The value of a step series at t: the last point at or before t, until the next point (the
    last one holds for max_gap_s); None before the first point or in a gap."""
    i = bisect.bisect_right(times, t) - 1
    if i < 0:
        return None
    nxt = times[i + 1] if i + 1 < len(times) else times[i] + max_gap_s
    return values[i] if t < nxt else None


class CarbonSeries:
    """A time series of carbon intensity; the value in force at t is the last point at or before t."""

    def __init__(self, path: Path, max_gap_s: float = 3 * 3600):
        self.path = path
        self.max_gap_s = max_gap_s
        times: list[float] = []
        values: list[float] = []
        try:
            with path.open(encoding="utf-8", newline="") as f:
                for lineno, row in enumerate(csv.reader(f), 1):
                    if not row or row[0].startswith("#") or (lineno == 1 and not _isnum(row[-1])):
                        continue
                    if len(row) != 2:
                        raise ConfigError(f"{path}:{lineno}: expected 'timestamp,g_per_kwh'")
                    try:
                        ts = datetime.fromisoformat(row[0].strip())
                    except ValueError:
                        raise ConfigError(
                            f"{path}:{lineno}: bad timestamp {row[0]!r}: expected ISO 8601"
                        ) from None
                    if ts.tzinfo is None:
                        ts = ts.replace(tzinfo=UTC)
                    if not _isnum(row[1]) or float(row[1]) < 0:
                        raise ConfigError(
                            f"{path}:{lineno}: bad intensity {row[1]!r}: expected gCO2e/kWh >= 0"
                        )
                    times.append(ts.timestamp())
                    values.append(float(row[1]))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read carbon intensity series: {e.strerror}") from None
        if not times:
            raise ConfigError(f"{path}: carbon intensity series has no data rows")
        order = sorted(range(len(times)), key=times.__getitem__)
        self.times = [times[i] for i in order]
        self.values = [values[i] for i in order]

    @property
    def source(self) -> str:
        return f"series {self.path}"

    def at(self, t: float) -> float | None:
        return value_at(self.times, self.values, self.max_gap_s, t)


def _isnum(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


class ClusterFactors:
    """Resolves the factors in force for one cluster at a time t."""

    def __init__(self, cluster: Cluster, series: CarbonSeries | None):
        # series: anything with at(t) -> g/kWh or None, and source (a CarbonSeries, or the live
        # signal of greend.carbon_feed).
        self.cluster = cluster
        self.series = series
        mix = refdata.country_mix(cluster.country)
        src = dict(cluster.sources)
        self.ci_static = cluster.carbon_intensity_g_per_kwh
        if self.ci_static is None:
            self.ci_static = mix.carbon_intensity_g_per_kwh
            src.setdefault("carbon_intensity_g_per_kwh", mix.source)
        else:
            src.setdefault("carbon_intensity_g_per_kwh", "site configuration")
        ewif = cluster.ewif_l_per_kwh
        if ewif is None:
            ewif = mix.ewif_l_per_kwh
            src.setdefault(
                "ewif_l_per_kwh", f"derived: {refdata.EWIF_SOURCE} on the mix of {mix.source}"
            )
        else:
            src.setdefault("ewif_l_per_kwh", "site configuration")
        src.setdefault(
            "pue", DEFAULT_PUE_SOURCE if cluster.pue == DEFAULT_PUE else "site configuration"
        )
        src.setdefault(
            "wue_site_l_per_kwh",
            DEFAULT_WUE_SOURCE if cluster.wue_site_l_per_kwh == DEFAULT_WUE else "site configuration",
        )
        self._static = Factors(cluster.pue, cluster.wue_site_l_per_kwh, ewif, self.ci_static, src)
        self._cache: dict[float, Factors] = {}

    def at(self, t: float) -> Factors:
        if self.series is None:
            return self._static
        ci = self.series.at(t)
        if ci is None:
            return self._static
        f = self._cache.get(ci)
        if f is None:
            src = dict(self._static.sources)
            src["carbon_intensity_g_per_kwh"] = self.series.source
            f = Factors(self._static.pue, self._static.wue_site_l_per_kwh,
                        self._static.ewif_l_per_kwh, ci, src)
            self._cache[ci] = f
        return f


def cluster_factors(cfg: Config, name: str | None = None) -> ClusterFactors:
    c = cfg.clusters[name or cfg.cluster]
    series = CarbonSeries(c.carbon_intensity_series) if c.carbon_intensity_series else None
    return ClusterFactors(c, series)


class FactorsCache:
    """The ClusterFactors of every cluster of a configuration, built once and built again only when
    the cluster's configuration (a reload) or its carbon intensity series file (mtime) changes: a
    scrape must not re-read every cluster's CSV series."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[Cluster, float | None, ClusterFactors | None]] = {}
        self._lock = threading.Lock()  # scrapes come from several server threads

    def get(self, cfg: Config) -> dict[str, ClusterFactors]:
        """Clusters whose series is unreadable are left out (logged once per change of the file)."""
        with self._lock:
            return self._get(cfg)

    def _get(self, cfg: Config) -> dict[str, ClusterFactors]:
        out = {}
        for name, c in cfg.clusters.items():
            mtime = _mtime(c.carbon_intensity_series)
            hit = self._built.get(name)
            if hit is None or hit[0] is not c or hit[1] != mtime:
                try:
                    cf = cluster_factors(cfg, name)
                except ConfigError as e:
                    logging.getLogger(__name__).warning("cluster %s: factors unavailable: %s", name, e)
                    cf = None
                hit = self._built[name] = (c, mtime, cf)
            if hit[2] is not None:
                out[name] = hit[2]
        for name in self._built.keys() - cfg.clusters.keys():
            del self._built[name]
        return out


def _mtime(path: Path | None) -> float | None:
    if path is None:
        return None
    try:
        return path.stat().st_mtime
    except OSError:
        return None
