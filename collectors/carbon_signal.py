"""Clients for live grid carbon intensity: RTE eCO2mix (France), Electricity Maps, the UK Carbon
Intensity API. Each reads its provider's documented JSON and returns (time, gCO2e/kWh) points.

Pure clients: no cache, no fallback, no configuration model. A provider that cannot be reached or
answers something else than its documented format raises `SignalError` with a short reason, which
the caller (greend.carbon_feed) names in the decision that falls back.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

PROVIDERS = {
    "rte-eco2mix": "RTE eCO2mix",
    "electricitymaps": "Electricity Maps",
    "uk-carbon-intensity": "UK Carbon Intensity API",
}
DEFAULT_URLS = {
    # ODRE (Open Data Réseaux Énergies) publishes RTE's eCO2mix real-time national data.
    "rte-eco2mix": "https://odre.opendatasoft.com",
    "electricitymaps": "https://api.electricitymap.org",
    "uk-carbon-intensity": "https://api.carbonintensity.org.uk",
}
DEFAULT_ZONES = {"rte-eco2mix": "FR", "uk-carbon-intensity": "GB"}
RTE_DATASET_PATH = "/api/explore/v2.1/catalog/datasets/eco2mix-national-tr/records"
RTE_MAX_RECORDS = 100  # the Explore API v2.1 returns at most 100 records per request
MAX_BODY_BYTES = 4 << 20
USER_AGENT = "greend carbon signal"


class SignalError(Exception):
    """The provider could not be read; the message says why, in a few words."""


@dataclass(frozen=True)
class Signal:
    """A provider's carbon intensity around now: observed points, then forecast points."""

    provider: str
    zone: str
    points: list[tuple[float, float]]
    """(unix time, gCO2e/kWh), sorted by time; each holds until the next (the last for step_s)."""
    step_s: float
    """The provider's resolution (15 min for eCO2mix, 30 min UK, 1 h Electricity Maps)."""
    forecast_from: float | None = None
    """Time of the first forecast point; None when every point is observed."""
    notes: list[str] = field(default_factory=list)
    """What was missing but did not fail the fetch (e.g. a forecast the token may not read)."""

    @property
    def name(self) -> str:
        return PROVIDERS.get(self.provider, self.provider)


# -- parsers: documented JSON -> points ----------------------------------------------------------
def _time(v, what: str) -> float:
    if not isinstance(v, str):
        raise SignalError(f"{what}: expected an ISO 8601 time, got {v!r}")
    try:
        ts = datetime.fromisoformat(v.strip())
    except ValueError:
        raise SignalError(f"{what}: expected an ISO 8601 time, got {v!r}") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.timestamp()


def _intensity(v, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise SignalError(f"{what}: expected gCO2e/kWh >= 0, got {v!r}")
    return float(v)


def _list(data, key: str, provider: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise SignalError(f"unexpected {provider} response: no {key!r} list")
    return data[key]


def parse_eco2mix(data) -> list[tuple[float, float]]:
    """ODRE dataset eco2mix-national-tr: Explore API v2.1 {"results": [{"date_heure", "taux_co2"}]},
    v1 {"records": [{"fields": {...}}]} or the export endpoint's JSON list of records. Records without
    taux_co2 (the latest quarter hours, not yet computed) are skipped."""
    if isinstance(data, list):
        records = data
    elif isinstance(data, dict) and "records" in data and "results" not in data:
        records = [r.get("fields", r) if isinstance(r, dict) else r
                   for r in _list(data, "records", "eCO2mix")]
    else:
        records = _list(data, "results", "eCO2mix")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise SignalError(f"eCO2mix record {i}: expected an object")
        ci = _intensity(r.get("taux_co2"), f"eCO2mix record {i} taux_co2")
        if ci is None:
            continue
        out.append((_time(r.get("date_heure"), f"eCO2mix record {i} date_heure"), ci))
    return sorted(out)


def parse_electricitymaps(data, key: str) -> list[tuple[float, float]]:
    """Electricity Maps v3 {"zone", "history"|"forecast": [{"datetime", "carbonIntensity"}]}."""
    out = []
    for i, r in enumerate(_list(data, key, "Electricity Maps")):
        if not isinstance(r, dict):
            raise SignalError(f"Electricity Maps {key}[{i}]: expected an object")
        ci = _intensity(r.get("carbonIntensity"), f"Electricity Maps {key}[{i}] carbonIntensity")
        if ci is not None:
            out.append((_time(r.get("datetime"), f"Electricity Maps {key}[{i}] datetime"), ci))
    return sorted(out)


def parse_uk(data, now: float) -> tuple[list[tuple[float, float]], float | None]:
    """UK Carbon Intensity API {"data": [{"from", "to", "intensity": {"forecast", "actual",
    "index"}}]}: the actual value where published, else the forecast. Returns (points, time of the
    first point that is a forecast at or after now)."""
    out = []
    forecast_from = None
    for i, r in enumerate(_list(data, "data", "UK Carbon Intensity")):
        if not isinstance(r, dict) or not isinstance(r.get("intensity"), dict):
            raise SignalError(f"UK Carbon Intensity data[{i}]: expected an object with 'intensity'")
        t = _time(r.get("from"), f"UK Carbon Intensity data[{i}] from")
        actual = _intensity(r["intensity"].get("actual"), f"UK Carbon Intensity data[{i}] actual")
        fc = _intensity(r["intensity"].get("forecast"), f"UK Carbon Intensity data[{i}] forecast")
        if actual is not None:
            out.append((t, actual))
        elif fc is not None:
            out.append((t, fc))
            if forecast_from is None or t < forecast_from:
                forecast_from = t
    return sorted(out), forecast_from


def step_of(points: list[tuple[float, float]], default_s: float) -> float:
    """The series' resolution: the median spacing of its points."""
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(points) if b[0] > a[0]]
    return float(statistics.median(gaps)) if gaps else default_s


# -- HTTP ---------------------------------------------------------------------------------------
def get_json(url: str, timeout_s: float, headers: dict[str, str] | None = None):
    # Imported here: urllib.request (http.client, email) is ~6 ms of every `greend route` start,
    # which reads a cached signal far more often than it fetches one.
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": USER_AGENT,
                                               **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # http(s) only: checked by the config
            body = resp.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise SignalError(f"HTTP {e.code} {e.reason} from {_where(url)}") from None
    except urllib.error.URLError as e:
        raise SignalError(f"{_reason(e.reason)} at {_where(url)}") from None
    except TimeoutError:
        raise SignalError(f"no answer within {timeout_s:g} s from {_where(url)}") from None
    except OSError as e:
        raise SignalError(f"{_reason(e)} at {_where(url)}") from None
    if len(body) > MAX_BODY_BYTES:
        raise SignalError(f"response larger than {MAX_BODY_BYTES >> 20} MiB from {_where(url)}")
    try:
        return json.loads(body)
    except ValueError:
        raise SignalError(f"not JSON from {_where(url)}: {body[:60]!r}") from None


def _where(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return f"{u.scheme}://{u.netloc}{u.path}"


def _reason(e) -> str:
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _iso_z(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%MZ")


# -- the clients --------------------------------------------------------------------------------
def fetch_eco2mix(base_url: str, zone: str, now: float, timeout_s: float) -> Signal:
    """The latest 100 quarter hours (25 h) of eCO2mix's taux_co2. eCO2mix publishes observed values
    only (no forecast of the intensity)."""
    if zone.upper() != "FR":
        raise SignalError(f"eCO2mix covers France only (zone FR), not {zone!r}")
    query = urllib.parse.urlencode({
        "select": "date_heure,taux_co2", "where": "taux_co2 is not null",
        "order_by": "date_heure desc", "limit": RTE_MAX_RECORDS,
    })
    pts = parse_eco2mix(get_json(f"{base_url}{RTE_DATASET_PATH}?{query}", timeout_s))
    if not pts:
        raise SignalError("eCO2mix returned no record with taux_co2")
    return Signal("rte-eco2mix", "FR", pts, step_of(pts, 900.0))


def fetch_electricitymaps(base_url: str, zone: str, token: str, now: float, timeout_s: float) -> Signal:
    """The last 24 h (history) and the forecast, if the token may read it."""
    headers = {"auth-token": token}
    q = urllib.parse.urlencode({"zone": zone})
    hist = parse_electricitymaps(
        get_json(f"{base_url}/v3/carbon-intensity/history?{q}", timeout_s, headers), "history")
    notes = []
    try:
        fc = parse_electricitymaps(
            get_json(f"{base_url}/v3/carbon-intensity/forecast?{q}", timeout_s, headers), "forecast")
    except SignalError as e:
        fc = []
        notes.append(f"no forecast ({e})")
    last_hist = hist[-1][0] if hist else -math.inf
    fc = [p for p in fc if p[0] > last_hist]
    pts = hist + fc
    if not pts:
        raise SignalError(f"Electricity Maps returned no carbon intensity for zone {zone}")
    return Signal("electricitymaps", zone, pts, step_of(pts, 3600.0), fc[0][0] if fc else None, notes)


def fetch_uk(base_url: str, zone: str, now: float, timeout_s: float) -> Signal:
    """GB national intensity from the current half hour, 48 h forward (actual where published)."""
    if zone.upper() != "GB":
        raise SignalError(f"the UK Carbon Intensity client reads the GB national series, not {zone!r}")
    start = math.floor(now / 1800) * 1800
    pts, fc_from = parse_uk(get_json(f"{base_url}/intensity/{_iso_z(start)}/fw48h", timeout_s), now)
    if not pts:
        raise SignalError("UK Carbon Intensity API returned no intensity")
    return Signal("uk-carbon-intensity", "GB", pts, step_of(pts, 1800.0), fc_from)


def fetch(provider: str, base_url: str, zone: str, now: float, timeout_s: float,
          token: Callable[[], str] | None = None) -> Signal:
    """One provider's signal; token() gives the Electricity Maps token (read when needed)."""
    base_url = base_url.rstrip("/")
    if provider == "rte-eco2mix":
        return fetch_eco2mix(base_url, zone, now, timeout_s)
    if provider == "electricitymaps":
        if token is None:
            raise SignalError("Electricity Maps needs a token (token_file)")
        return fetch_electricitymaps(base_url, zone, token(), now, timeout_s)
    if provider == "uk-carbon-intensity":
        return fetch_uk(base_url, zone, now, timeout_s)
    raise SignalError(f"unknown provider {provider!r}: expected one of {', '.join(PROVIDERS)}")


def fetch_bounded(budget_s: float, fn: Callable[[], Signal]) -> Signal:
    """fn() within budget_s seconds of wall time, whatever the server does (a socket timeout bounds
    each read, not a server that trickles bytes): past the budget the fetch is abandoned."""
    box: dict[str, object] = {}

    def run():
        try:
            box["ok"] = fn()
        except SignalError as e:
            box["err"] = e
        except Exception as e:  # a client bug must not take the decision down with it
            box["err"] = SignalError(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=run, name="carbon-signal-fetch", daemon=True)
    t.start()
    t.join(budget_s)
    if t.is_alive():
        raise SignalError(f"no complete answer within {budget_s:g} s")
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return box["ok"]  # type: ignore[return-value]
