"""The live carbon signal: each provider's client against its documented response format served by a
local HTTP server (127.0.0.1 only), the on-disk cache, the fallback chain (cache, series, static) with
the source named on every figure, bounded waits, and `greend config check`'s coverage warnings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from greend.collectors import carbon_signal as cs
from greend.policies.engine import Engine
from greend.policies.request import build_request
from greend.policies.site import compile_site, refresh_carbon

from greend import carbon_feed
from greend import config as config_mod

GREEND = Path(sys.executable).with_name("greend")
HOUR = 3600.0


def iso(t: float, fmt: str = "%Y-%m-%dT%H:%M:%S+00:00") -> str:
    return datetime.fromtimestamp(t, UTC).strftime(fmt)


class Provider:
    """A local HTTP server answering like a provider: routes map a path prefix to
    (status, body, delay_s); every request is recorded (path, query, headers)."""

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes | str | dict | list, float]] = {}
        self.requests: list[tuple[str, dict, dict]] = []
        self.trickle: dict[str, float] = {}  # path prefix -> seconds between bytes
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                owner.requests.append((u.path, urllib.parse.parse_qs(u.query),
                                       {k.lower(): v for k, v in self.headers.items()}))
                routes = sorted(owner.routes.items(), key=lambda r: -len(r[0]))  # longest prefix first
                status, body, delay = next((r for pre, r in routes if u.path.startswith(pre)),
                                           (404, {"error": "not found"}, 0.0))
                if delay:
                    time.sleep(delay)
                raw = body if isinstance(body, bytes) else (
                    body.encode() if isinstance(body, str) else json.dumps(body).encode())
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    gap = next((g for pre, g in owner.trickle.items() if u.path.startswith(pre)), 0)
                    if gap:  # a byte at a time: each read is quick, the whole answer is not
                        for i in range(len(raw)):
                            self.wfile.write(raw[i:i + 1])
                            self.wfile.flush()
                            time.sleep(gap)
                    else:
                        self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up (a timeout under test)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def provider():
    p = Provider()
    yield p
    p.close()


def closed_port_url() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


# -- documented response formats --------------------------------------------------------------------
def eco2mix_body(start: float, values: list[float | None]) -> dict:
    """ODRE Explore API v2.1 records of eco2mix-national-tr, newest first as the query asks."""
    recs = [{"date_heure": iso(start + i * 900), "taux_co2": v} for i, v in enumerate(values)]
    return {"total_count": len(recs), "results": list(reversed(recs))}


def em_body(key: str, start: float, values: list[float], zone: str = "FR") -> dict:
    """Electricity Maps v3 /carbon-intensity/history or /forecast."""
    pts = [{"zone": zone, "carbonIntensity": v, "datetime": iso(start + i * HOUR, "%Y-%m-%dT%H:%M:%S.000Z"),
            "updatedAt": iso(start, "%Y-%m-%dT%H:%M:%S.000Z"), "emissionFactorType": "lifecycle",
            "isEstimated": key == "forecast", "estimationMethod": None} for i, v in enumerate(values)]
    return {"zone": zone, key: pts, "updatedAt": iso(start, "%Y-%m-%dT%H:%M:%S.000Z")}


def uk_body(start: float, actual: list[float | None], forecast: list[float]) -> dict:
    """api.carbonintensity.org.uk /intensity/{from}/fw48h."""
    return {"data": [{"from": iso(start + i * 1800, "%Y-%m-%dT%H:%MZ"),
                      "to": iso(start + (i + 1) * 1800, "%Y-%m-%dT%H:%MZ"),
                      "intensity": {"forecast": f, "actual": a, "index": "moderate"}}
                     for i, (a, f) in enumerate(zip(actual, forecast, strict=True))]}


# -- the clients ----------------------------------------------------------------------------------
def test_rte_eco2mix_client_reads_the_odre_records(provider):
    t0 = 1_800_000_000.0
    provider.routes[cs.RTE_DATASET_PATH] = (200, eco2mix_body(t0, [30, 32, 28, 25, None]), 0)
    s = cs.fetch("rte-eco2mix", provider.url, "FR", t0, 2.0)
    assert s.points == [(t0, 30.0), (t0 + 900, 32.0), (t0 + 1800, 28.0), (t0 + 2700, 25.0)]  # oldest first
    assert s.step_s == 900 and s.forecast_from is None and s.name == "RTE eCO2mix"
    path, query, _ = provider.requests[0]
    assert path == "/api/explore/v2.1/catalog/datasets/eco2mix-national-tr/records"
    assert query["order_by"] == ["date_heure desc"] and query["limit"] == ["100"]
    assert "taux_co2" in query["select"][0]
    # the v1 shape and the export endpoint's list carry the same fields
    v1 = {"records": [{"fields": {"date_heure": iso(t0), "taux_co2": 41}}]}
    assert cs.parse_eco2mix(v1) == [(t0, 41.0)]
    assert cs.parse_eco2mix([{"date_heure": iso(t0), "taux_co2": 41}]) == [(t0, 41.0)]


def test_electricitymaps_client_sends_the_token_and_joins_history_and_forecast(provider, tmp_path):
    t0 = 1_800_000_000.0 - 1_800_000_000.0 % HOUR
    provider.routes["/v3/carbon-intensity/history"] = (200, em_body("history", t0 - 2 * HOUR, [50, 60, 70]),
                                                       0)
    provider.routes["/v3/carbon-intensity/forecast"] = (200, em_body("forecast", t0, [70, 20, 30]), 0)
    s = cs.fetch("electricitymaps", provider.url, "DE", t0, 2.0, token=lambda: "s3cret")
    # the forecast's first point repeats the last history hour: history wins there
    assert s.points == [(t0 - 2 * HOUR, 50.0), (t0 - HOUR, 60.0), (t0, 70.0), (t0 + HOUR, 20.0),
                        (t0 + 2 * HOUR, 30.0)]
    assert s.forecast_from == t0 + HOUR and s.step_s == HOUR
    for path, query, headers in provider.requests:
        assert headers.get("auth-token") == "s3cret" and query["zone"] == ["DE"], path
    # a token that may not read forecasts: history only, and it says so
    provider.routes["/v3/carbon-intensity/forecast"] = (403, {"message": "forbidden"}, 0)
    s = cs.fetch("electricitymaps", provider.url, "DE", t0, 2.0, token=lambda: "s3cret")
    assert s.forecast_from is None and len(s.points) == 3
    assert "no forecast (HTTP 403" in s.notes[0]


def test_uk_carbon_intensity_client_takes_actuals_then_forecasts(provider):
    now = 1_800_000_000.0 + 600  # inside a half hour
    start = now - now % 1800
    provider.routes["/intensity/"] = (200, uk_body(start, [175, 170, None, None], [180, 160, 150, 90]), 0)
    s = cs.fetch("uk-carbon-intensity", provider.url, "GB", now, 2.0)
    assert s.points == [(start, 175.0), (start + 1800, 170.0), (start + 3600, 150.0), (start + 5400, 90.0)]
    assert s.forecast_from == start + 3600 and s.step_s == 1800
    path, _, _ = provider.requests[0]
    assert path == f"/intensity/{iso(start, '%Y-%m-%dT%H:%MZ')}/fw48h"


@pytest.mark.parametrize("parse,body,message", [
    (cs.parse_eco2mix, {"error_code": "ODSQLError"}, "no 'results' list"),
    (cs.parse_eco2mix, {"results": [{"date_heure": "yesterday", "taux_co2": 3}]}, "date_heure"),
    (cs.parse_eco2mix, {"results": [{"date_heure": "2026-12-01T10:00:00+00:00", "taux_co2": -3}]},
     "gCO2e/kWh >= 0"),
    (lambda d: cs.parse_electricitymaps(d, "history"), {"zone": "FR"}, "no 'history' list"),
    (lambda d: cs.parse_electricitymaps(d, "forecast"),
     {"forecast": [{"datetime": "2026-12-01T10:00:00Z", "carbonIntensity": "low"}]}, "carbonIntensity"),
    (lambda d: cs.parse_uk(d, 0), {"data": [{"from": "2026-12-01T10:00Z"}]}, "'intensity'"),
    (lambda d: cs.parse_uk(d, 0), [1, 2], "no 'data' list"),
])
def test_unexpected_responses_are_named_errors(parse, body, message):
    with pytest.raises(cs.SignalError, match=message):
        parse(body)


@pytest.mark.parametrize("status,body,delay,message", [
    (500, {"error": "internal"}, 0, "HTTP 500"),
    (200, b"<html>maintenance</html>", 0, "not JSON"),
    (200, {"data": []}, 0, "no intensity"),
    (200, {"data": []}, 5.0, "within 0.3 s"),
])
def test_provider_failures_are_errors_within_the_budget(provider, status, body, delay, message):
    provider.routes["/intensity/"] = (status, body, delay)
    t = time.monotonic()
    with pytest.raises(cs.SignalError, match=message):
        cs.fetch_bounded(0.3 + 0.5, lambda: cs.fetch("uk-carbon-intensity", provider.url, "GB",
                                                     time.time(), 0.3))
    assert time.monotonic() - t < 1.5


def test_a_server_that_trickles_its_answer_is_cut_at_the_budget(provider):
    provider.routes["/intensity/"] = (200, uk_body(time.time() // 1800 * 1800, [100] * 40, [100] * 40), 0)
    provider.trickle["/intensity/"] = 0.05  # every read returns within the socket timeout
    t = time.monotonic()
    with pytest.raises(cs.SignalError, match="no complete answer within 1 s"):
        cs.fetch_bounded(1.0, lambda: cs.fetch("uk-carbon-intensity", provider.url, "GB", time.time(), 0.5))
    assert time.monotonic() - t < 1.5


def test_a_server_that_is_down_is_unreachable():
    with pytest.raises(cs.SignalError, match=r"Connection refused at http://127\.0\.0\.1:"):
        cs.fetch("uk-carbon-intensity", closed_port_url(), "GB", time.time(), 1.0)


# -- the glue: cache and fallbacks ------------------------------------------------------------------
def em_cluster(url: str, tmp_path: Path, **sig) -> config_mod.Config:
    (tmp_path / "em.token").write_text("tok\n")
    data = {"clusters": {"local": {
        "carbon_intensity_g_per_kwh": 56.0,
        "carbon_signal": {"provider": "electricitymaps", "zone": "FR", "url": url,
                          "token_file": str(tmp_path / "em.token"), "timeout_s": 0.5, **sig}}},
        "state_dir": str(tmp_path / "state")}
    return config_mod.parse(data)


def resolve(cfg, now=None, fetch=True):
    cf = config_mod.cluster_factors(cfg, "local")
    return carbon_feed.resolve("local", cfg.clusters["local"], cf.at(-math.inf), cf.series,
                               cfg.resolved_state_dir(), now=now, fetch=fetch)


def serve_em(provider, t0, hist=(50, 60), fc=(60, 20, 30)):
    start = t0 - len(hist) * HOUR
    provider.routes["/v3/carbon-intensity/history"] = (200, em_body("history", start, list(hist)), 0)
    provider.routes["/v3/carbon-intensity/forecast"] = (200, em_body("forecast", t0, list(fc)), 0)


def test_signal_is_cached_with_its_fetch_time_and_source_and_reused(provider, tmp_path):
    now = time.time()
    t0 = now - now % HOUR
    serve_em(provider, t0)
    cfg = em_cluster(provider.url, tmp_path)
    live = resolve(cfg, now)
    assert live.kind == "live" and live.at(t0 + HOUR + 1) == 20.0 and live.at(t0 - 1) == 60.0
    assert live.source == f"Electricity Maps (FR) observed + forecast, fetched {carbon_feed.hhmm(now)}"
    cache = json.loads(carbon_feed.cache_path(tmp_path / "state", "local").read_text())
    assert cache["fetched_at"] == now and cache["key"]["provider"] == "electricitymaps"
    # fresh: not asked again
    n = len(provider.requests)
    assert resolve(cfg, now + 60).kind == "live" and len(provider.requests) == n
    # stale (past refresh_s): asked again
    assert resolve(cfg, now + 1000).kind == "live" and len(provider.requests) == n + 2
    # the factors in force (what the daemon would account with) name the signal
    f = carbon_feed.live_factors(cfg, now=now + 1000, fetch=False).at(t0 + HOUR + 1)
    assert f.carbon_intensity_g_per_kwh == 20.0
    assert f.sources["carbon_intensity_g_per_kwh"].startswith("Electricity Maps (FR)")


def test_outage_uses_the_cache_then_the_series_then_the_static_value_and_says_why(provider, tmp_path):
    now = time.time()
    t0 = now - now % HOUR
    serve_em(provider, t0)
    cfg = em_cluster(provider.url, tmp_path, retry_s=0)
    assert resolve(cfg, now).kind == "live"
    provider.routes["/v3/carbon-intensity/history"] = (500, {"error": "boom"}, 0)
    live = resolve(cfg, now + 1000)
    assert live.kind == "cache" and live.at(t0 + HOUR + 1) == 20.0
    assert "cached (fallback: Electricity Maps unreachable: HTTP 500" in live.source
    # the cache too old: the series, with why
    csv = tmp_path / "ci.csv"
    csv.write_text("timestamp,g_per_kwh\n" + "".join(f"{iso(t0 + i * HOUR)},{40 + i}\n" for i in range(3)))
    data = cfg.model_dump(mode="json")
    data["clusters"]["local"]["carbon_intensity_series"] = str(csv)
    cfg2 = config_mod.parse(data)
    live = resolve(cfg2, now + 7 * HOUR)
    assert live.kind == "series" and live.at(t0 + 1) == 40.0
    assert live.source.startswith(f"series {csv} (fallback: Electricity Maps unreachable: HTTP 500")
    assert "older than max_age_s" in live.note
    # no series either: the static value, with why
    live = resolve(cfg, now + 7 * HOUR)
    assert live.kind == "static" and live.times == [] and live.static_g == 56.0
    assert live.source.startswith("static 56 g/kWh, site configuration (fallback: Electricity Maps "
                                  "unreachable: HTTP 500")


def test_a_failed_fetch_is_not_retried_before_retry_s(tmp_path):
    cfg = em_cluster(closed_port_url(), tmp_path, retry_s=300)
    now = time.time()
    first = resolve(cfg, now)
    assert first.kind == "static" and "unreachable" in first.note
    t = time.monotonic()
    again = resolve(cfg, now + 10)
    assert time.monotonic() - t < 0.1  # not asked: the recorded error stands
    assert "next try after 300 s" in again.note
    # a token that cannot be read is a stated reason, not a traceback
    (tmp_path / "em.token").unlink()
    assert "token_file" in resolve(cfg, now + 400).note


def test_a_slow_provider_never_holds_a_decision_past_its_timeout(provider, tmp_path):
    provider.routes["/v3/"] = (200, {"zone": "FR", "history": []}, 10.0)
    cfg = em_cluster(provider.url, tmp_path)
    t = time.monotonic()
    live = resolve(cfg)
    took = time.monotonic() - t
    assert took < 0.5 + 0.5 + 0.3, took  # timeout_s + the fetch's margin
    assert live.kind == "static" and "Electricity Maps unreachable" in live.note


# -- decisions ------------------------------------------------------------------------------------
PARTS = {"batch": {"default": True, "max_walltime": "2-00:00:00", "max_cpus": 8, "cpus_per_node": 8,
                   "mem_per_node": "4000M"}}


def site_toml(tmp_path: Path, signal: str, series: str = "") -> Path:
    (tmp_path / "em.token").write_text("tok\n")
    p = tmp_path / "greend.toml"
    p.write_text(f"""cluster = "site"
state_dir = "{tmp_path / 'state'}"
[policy]
live_state = false
[[policy.rules]]
rule = "carbon"
[[policy.rules]]
rule = "carbon_deferral"
[clusters.site]
carbon_intensity_g_per_kwh = 56.0
{series}
carbon_signal = {signal}
power_model = {{ cpu_w_per_core = 10.0 }}
[clusters.site.partitions.batch]
default = true
max_walltime = "2-00:00:00"
max_cpus = 8
cpus_per_node = 8
mem_per_node = "4000M"
""")
    return p


def em_signal(url: str, tmp_path: Path) -> str:
    return (f'{{ provider = "electricitymaps", zone = "FR", url = "{url}", '
            f'token_file = "{tmp_path / "em.token"}", timeout_s = 0.5 }}')


def run_greend(*argv, cwd: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("GREEND_CONFIG", "GREEND_STATE_DIR")}
    env["XDG_CACHE_HOME"] = str(cwd)
    return subprocess.run([str(GREEND), *map(str, argv)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60)


def test_deferral_follows_the_forecast_and_names_it(provider, tmp_path):
    now = time.time()
    t0 = now - now % HOUR
    serve_em(provider, t0, hist=(80, 80), fc=(80, 80, 80, 20, 20, 20, 80, 80, 80, 80, 80, 80))
    path = site_toml(tmp_path, em_signal(provider.url, tmp_path))
    cfg = config_mod.load(path)
    eng = Engine(compile_site(cfg, path))
    r = build_request(None, [("time", "2:00:00"), ("deferrable", None), ("deadline", "+10h")],
                      user="alice", now=now)
    d = eng.decide(r, now=now)
    assert d.plan.begin == t0 + 3 * HOUR
    src = d.plan.estimate.factors.sources["carbon_intensity_g_per_kwh"]
    assert src.startswith("mean of Electricity Maps (FR) observed + forecast, fetched")
    assert "WARNING" not in src
    assert d.plan.estimate.factors.carbon_intensity_g_per_kwh == pytest.approx(20.0)
    (v,) = [v for v in d.verdicts if v.rule == "carbon_deferral"]
    assert v.verdict == "defer" and "coverage" not in v.numbers
    # a deadline past the forecast: the decision says the forecast does not see it
    r2 = build_request(None, [("time", "2:00:00"), ("deferrable", None), ("deadline", "+30h")],
                       user="alice", now=now)
    d2 = eng.decide(r2, now=now)
    (v2,) = [v for v in d2.verdicts if v.rule == "carbon_deferral"]
    assert "covers only part of" in v2.numbers["coverage"]


def test_route_json_names_the_fallback_when_the_provider_is_down(provider, tmp_path):
    provider.routes["/v3/"] = (500, {"error": "internal"}, 0)
    path = site_toml(tmp_path, em_signal(provider.url, tmp_path))
    job = tmp_path / "job.sh"
    job.write_text("#!/bin/bash\n#SBATCH -c 2\n#SBATCH -t 2:00:00\n#GREEND --deferrable --deadline=+10h\n")
    t = time.monotonic()
    p = run_greend("-c", path, "route", "--json", job, cwd=tmp_path)
    took = time.monotonic() - t
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    (cand,) = d["candidates"]
    src = cand["estimate"]["factors"]["sources"]["carbon_intensity_g_per_kwh"]
    assert src.startswith("static 56 g/kWh, site configuration (fallback: Electricity Maps unreachable: "
                          "HTTP 500")
    assert cand["estimate"]["factors"]["carbon_intensity_g_per_kwh"] == 56.0
    (v,) = [v for v in d["rules"] if v["rule"] == "carbon_deferral"]
    assert v["verdict"] == "skip" and "fallback: Electricity Maps unreachable" in v["reason"]
    assert d["plan"]["begin"] is None
    assert took < 20, took
    # the text names it too
    p = run_greend("-c", path, "route", job, cwd=tmp_path)
    assert ("carbon intensity:\n  site: static 56 g/kWh, site configuration (fallback: Electricity Maps"
            in p.stdout)


# -- greend config check --------------------------------------------------------------------------
def test_config_check_warns_when_the_series_does_not_cover_now(tmp_path):
    ex = Path(__file__).resolve().parent.parent / "examples" / "site.toml"
    p = run_greend("config", "check", ex, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "warning: clusters.campus.carbon_intensity_series: series" in p.stderr
    assert "fr-carbon-sample.csv covers 2026-01-1" in p.stderr
    assert "the static 56.04 g/kWh applies" in p.stderr
    j = run_greend("config", "check", "--json", ex, cwd=tmp_path)
    assert any("fr-carbon-sample.csv" in w for w in json.loads(j.stdout)["warnings"])
    # a series that covers now .. +24 h: no warning
    now = time.time()
    csv = tmp_path / "ci.csv"
    csv.write_text("timestamp,g_per_kwh\n" + "".join(f"{iso(now - HOUR + i * HOUR)},50\n" for i in range(27)))
    ok = tmp_path / "ok.toml"
    ok.write_text(f'[clusters.local]\ncarbon_intensity_series = "{csv}"\n')
    p = run_greend("config", "check", ok, cwd=tmp_path)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr
    p = run_greend("config", "check", "--horizon-h", "48", ok, cwd=tmp_path)
    assert "covers" in p.stderr and "not all of now .. +48 h" in p.stderr


def test_config_check_warns_about_a_signal_it_cannot_read_and_a_short_forecast(provider, tmp_path):
    path = site_toml(tmp_path, em_signal(closed_port_url(), tmp_path))
    p = run_greend("config", "check", path, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert ("warning: clusters.site.carbon_signal: Electricity Maps unreachable: Connection refused at "
            "http://127.0.0.1:") in p.stderr
    assert "decisions use static 56 g/kWh" in p.stderr
    now = time.time()
    serve_em(provider, now - now % HOUR, fc=(50, 50, 50))
    (tmp_path / "b").mkdir()
    path = site_toml(tmp_path / "b", em_signal(provider.url, tmp_path / "b"))
    p = run_greend("config", "check", path, cwd=tmp_path)
    assert "warning: clusters.site.carbon_signal: Electricity Maps (FR) observed + forecast" in p.stderr
    assert "not all of now .. +24 h" in p.stderr


@pytest.mark.parametrize("signal,message", [
    ('{ provider = "watttime" }', "clusters.site.carbon_signal.provider"),
    ('{ provider = "electricitymaps", zone = "FR" }', "token_file is required"),
    ('{ provider = "rte-eco2mix", zone = "DE" }', "France only"),
    ('{ provider = "uk-carbon-intensity", url = "api.carbonintensity.org.uk" }', "carbon_signal.url"),
    ('{ provider = "uk-carbon-intensity", timeout_s = 90 }', "carbon_signal.timeout_s"),
])
def test_bad_carbon_signal_config_names_the_key(tmp_path, signal, message):
    path = site_toml(tmp_path, signal)
    p = run_greend("config", "check", path, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert message in p.stderr and str(path) in p.stderr


def test_observed_only_signal_holds_its_latest_value_for_an_hour_and_says_it_has_no_forecast(provider,
                                                                                             tmp_path):
    now = time.time()
    last = now - now % 900 - 1800  # eCO2mix's taux_co2 lags: the latest is half an hour old
    provider.routes[cs.RTE_DATASET_PATH] = (200, eco2mix_body(last - 3 * 900, [30, 32, 28, 25, None]), 0)
    signal = {"provider": "rte-eco2mix", "url": provider.url}
    cfg = config_mod.parse({"state_dir": str(tmp_path / "state"), "clusters": {"local": {
        "carbon_intensity_g_per_kwh": 56.0, "carbon_signal": signal}}})
    live = resolve(cfg, now)
    assert live.source.startswith("RTE eCO2mix (FR) observed (no forecast), fetched")
    assert live.at(now) == 25.0 and live.at(last + 3600 + 1) is None  # then the static value
    w = live.coverage_warning(now, now + 24 * HOUR)
    assert w and "not all of" in w and "static 56 g/kWh applies outside it" in w


def test_a_long_lived_site_picks_up_the_signal_when_the_provider_comes_back(provider, tmp_path):
    now = time.time()
    t0 = now - now % HOUR
    provider.routes["/v3/"] = (503, {"error": "maintenance"}, 0)
    cfg = em_cluster(provider.url, tmp_path, retry_s=0)
    site = compile_site(cfg)
    spec = site.by_name["local"]
    assert not spec.carbon.has_series and "HTTP 503" in spec.factors.sources["carbon_intensity_g_per_kwh"]
    del provider.routes["/v3/"]
    serve_em(provider, t0)
    refresh_carbon(site)
    assert spec.carbon.has_series and spec.carbon.at(t0 + HOUR + 1) == 20.0
    assert spec.factors.sources["carbon_intensity_g_per_kwh"] == "site configuration"


def test_config_check_refresh_carbon_asks_now_and_the_resolved_factors_name_the_signal(provider, tmp_path):
    now = time.time()
    serve_em(provider, now - now % HOUR, fc=[30] * 30)
    path = site_toml(tmp_path, em_signal(provider.url, tmp_path))
    p = run_greend("config", "check", "--json", path, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == "", p.stderr  # covered: no warning
    d = json.loads(p.stdout)
    assert d["warnings"] == []
    assert d["resolved"]["factors"]["sources"]["carbon_intensity_g_per_kwh"].startswith(
        "Electricity Maps (FR) observed + forecast, fetched")
    n = len(provider.requests)
    run_greend("config", "check", path, cwd=tmp_path)
    assert len(provider.requests) == n  # the cache is fresh
    run_greend("config", "check", "--refresh-carbon", path, cwd=tmp_path)
    assert len(provider.requests) == n + 2  # history and forecast, asked again


def test_persistence_forecast_repeats_the_last_day_when_asked_and_says_so(provider, tmp_path):
    now = time.time()
    last = now - now % 900 - 900
    values = [40.0] * 96
    values[10] = 15.0  # a low quarter hour yesterday, 86 quarter hours before the latest
    provider.routes[cs.RTE_DATASET_PATH] = (200, eco2mix_body(last - 95 * 900, values), 0)
    signal = {"provider": "rte-eco2mix", "url": provider.url, "forecast": "persistence-24h"}
    cfg = config_mod.parse({"state_dir": str(tmp_path / "state"), "clusters": {"local": {
        "carbon_intensity_g_per_kwh": 56.0, "carbon_signal": signal}}})
    live = resolve(cfg, now)
    assert "observed + 24 h persistence forecast (the last day repeated)" in live.source
    low = last - 85 * 900 + 86400
    assert live.at(low + 1) == 15.0 and live.at(low + 901) == 40.0
    assert live.span()[1] == last + 86400 + 900
    # not asked for: no forecast
    signal["forecast"] = "provider"
    cfg = config_mod.parse({"state_dir": str(tmp_path / "state2"), "clusters": {"local": {
        "carbon_intensity_g_per_kwh": 56.0, "carbon_signal": signal}}})
    assert resolve(cfg, now).at(low + 1) is None


def test_the_daemon_accounts_with_the_live_signal_and_names_it(provider, tmp_path):
    from daemonproc import Greend, metric_value

    now = time.time()
    start = now - now % 1800
    provider.routes["/intensity/"] = (200, uk_body(start, [123.0, None], [125.0, 90.0]), 0)
    g = Greend(tmp_path / "g", config={"clusters": {"local": {
        "carbon_intensity_g_per_kwh": 56.0,
        "carbon_signal": {"provider": "uk-carbon-intensity", "zone": "GB", "url": provider.url,
                          "timeout_s": 1.0}}}})
    with g:
        g.start()

        def ci():
            return metric_value(g.metrics(), "greend_factor_carbon_intensity_grams_per_kilowatt_hour",
                                cluster="local")

        # Read at start, not only after daemon.factor_refresh_s (300 s).
        deadline = time.monotonic() + 20
        while ci() != 123.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ci() == 123.0
        assert any(path.startswith("/intensity/") for path, _, _ in provider.requests)
        # The API lists the factors in force from the daemon's cache of the signal, with its source.
        st, d = g.get("/api/v1/clusters")
        (local,) = [c for c in d["clusters"] if c["name"] == "local"] if isinstance(
            d["clusters"], list) else [d["clusters"]["local"]]
        assert st == 200 and local["factors"]["carbon_intensity_g_per_kwh"] == 123.0
        assert "UK Carbon Intensity" in local["factors"]["sources"]["carbon_intensity_g_per_kwh"]
        assert g.stop() == 0
