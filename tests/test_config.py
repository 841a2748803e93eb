"""Configuration: the embedded default, precise errors, carbon intensity series, `greend config check`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from greend import config as config_mod
from greend.config import ConfigError

GREEND = Path(sys.executable).with_name("greend")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        config_mod.load(path)
    return str(e.value)


# -- the embedded default -------------------------------------------------------------------------
def test_embedded_default_is_valid_and_uses_french_factors():
    cfg = config_mod.load(None)
    assert cfg.cluster == "local" and "local" in cfg.clusters
    f = config_mod.cluster_factors(cfg).at(0.0)
    assert f.carbon_intensity_g_per_kwh == pytest.approx(56.039)
    assert f.ewif_l_per_kwh == pytest.approx(1.62, abs=0.01)
    assert f.pue == config_mod.DEFAULT_PUE == 1.56
    # every factor says where it comes from
    assert set(f.sources) >= {"pue", "wue_site_l_per_kwh", "ewif_l_per_kwh", "carbon_intensity_g_per_kwh"}
    assert "CodeCarbon" in f.sources["carbon_intensity_g_per_kwh"]


def test_effective_config_printed_by_config_check_loads_back_unchanged():
    cfg = config_mod.load(None)
    assert config_mod.parse(tomllib.loads(config_mod.to_toml(cfg))) == cfg


def test_a_valid_file_overrides_defaults(tmp_path):
    p = write(tmp_path / "greend.toml", """
cluster = "site"
node = "n1"
[sampling]
interval_s = 2
[attribution]
idle_power = "unattributed"
[clusters.site]
tier = "site"
country = "deu"
pue = 1.2
wue_site_l_per_kwh = 0.0
carbon_intensity_g_per_kwh = 100
sources = { pue = "measured 2024" }
""")
    cfg = config_mod.load(p)
    assert cfg.node_name == "n1"
    assert cfg.sampling.interval_s == 2.0
    assert cfg.attribution.idle_power == "unattributed"
    c = cfg.clusters["site"]
    assert c.country == "DEU"
    f = config_mod.cluster_factors(cfg).at(0.0)
    assert (f.pue, f.wue_site_l_per_kwh, f.carbon_intensity_g_per_kwh) == (1.2, 0.0, 100.0)
    assert f.sources["pue"] == "measured 2024"
    assert f.sources["carbon_intensity_g_per_kwh"] == "site configuration"


# -- errors: file, key path, what was expected ----------------------------------------------------
@pytest.mark.parametrize(("body", "key", "expected"), [
    ('[sampling]\ninterval_s = "fast"\n', "sampling.interval_s", "valid number"),
    ("[clusters.local]\npue = 0.5\n", "clusters.local.pue", "greater than or equal to 1"),
    ("[clusters.local]\npue = 9\n", "clusters.local.pue", "less than or equal to 5"),
    ("[sampling]\nintervall_s = 5\n", "sampling.intervall_s", "unknown key"),
    ("colour = 'green'\n", "colour", "unknown key"),
    ('[clusters.local]\ncountry = "XYZ"\n', "clusters.local.country", "ISO 3166-1 alpha-3"),
    ('[attribution]\nidle_power = "everyone"\n', "attribution.idle_power", "'allocated' or 'unattributed'"),
])
def test_invalid_value_names_file_key_and_expectation(tmp_path, body, key, expected):
    p = write(tmp_path / "bad.toml", body)
    msg = load_error(p)
    assert str(p) in msg
    assert f"key '{key}'" in msg
    assert expected in msg


def test_all_problems_of_a_file_are_reported_at_once(tmp_path):
    p = write(tmp_path / "bad.toml", '[sampling]\ninterval_s = -1\n[clusters.local]\npue = 0.5\n')
    msg = load_error(p)
    assert "sampling.interval_s" in msg and "clusters.local.pue" in msg


def test_cluster_not_defined(tmp_path):
    p = write(tmp_path / "bad.toml", 'cluster = "site"\n')
    msg = load_error(p)
    assert str(p) in msg
    assert "cluster 'site' is not defined" in msg
    assert "expected one of ['local']" in msg


def test_invalid_toml_gives_the_line(tmp_path):
    p = write(tmp_path / "bad.toml", 'cluster = "local"\n[sampling]\ninterval_s = \n')
    msg = load_error(p)
    assert str(p) in msg and "invalid TOML" in msg and "line 3" in msg


def test_missing_file(tmp_path):
    msg = load_error(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in msg and "no such config file" in msg


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('node = "nœud"\n'.encode("latin-1", errors="replace") + b"\xe9\n")
    assert "not UTF-8" in load_error(p)


@pytest.mark.parametrize(("row", "expected"), [
    ("2024-01-01T02:00:00Z,abc", "bad intensity 'abc'"),
    ("2024-01-01T02:00:00Z,-3", "bad intensity '-3'"),
    ("yesterday,50", "bad timestamp 'yesterday'"),
    ("2024-01-01T02:00:00Z,50,extra", "expected 'timestamp,g_per_kwh'"),
])
def test_bad_series_row_names_file_and_line(tmp_path, row, expected):
    series = write(tmp_path / "ci.csv",
                   f"timestamp,g_per_kwh\n2024-01-01T00:00:00Z,50\n2024-01-01T01:00:00Z,60\n{row}\n")
    p = write(tmp_path / "greend.toml", f'[clusters.local]\ncarbon_intensity_series = "{series}"\n')
    msg = load_error(p)
    assert f"{series}:4" in msg
    assert expected in msg


def test_missing_or_empty_series(tmp_path):
    p = write(tmp_path / "greend.toml", '[clusters.local]\ncarbon_intensity_series = "none.csv"\n')
    msg = load_error(p)
    assert str(tmp_path / "none.csv") in msg
    write(tmp_path / "none.csv", "timestamp,g_per_kwh\n")
    assert "no data rows" in load_error(p)


# -- carbon intensity series ----------------------------------------------------------------------
SERIES = """timestamp,g_per_kwh
# RTE eCO2mix-style hourly intensity
2024-01-01T00:00:00Z,50
2024-01-01T01:00:00Z,80
2024-01-01T02:00:00+00:00,20
"""


def test_relative_series_path_is_resolved_against_the_config_file(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    write(conf / "ci.csv", SERIES)
    p = write(conf / "greend.toml", '[clusters.local]\ncarbon_intensity_series = "ci.csv"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config_mod.load(p)
    assert cfg.clusters["local"].carbon_intensity_series == conf / "ci.csv"
    assert config_mod.cluster_factors(cfg).at(ts("2024-01-01T00:30:00")).carbon_intensity_g_per_kwh == 50


def test_hourly_series_values_apply_at_the_right_times_with_static_fallback(tmp_path):
    write(tmp_path / "ci.csv", SERIES)
    p = write(tmp_path / "greend.toml", """
[clusters.local]
carbon_intensity_g_per_kwh = 100
carbon_intensity_series = "ci.csv"
""")
    cf = config_mod.cluster_factors(config_mod.load(p))

    def ci(iso: str) -> float:
        return cf.at(ts(iso)).carbon_intensity_g_per_kwh

    assert ci("2023-12-31T23:59:59") == 100  # before the series: static value
    assert ci("2024-01-01T00:00:00") == 50
    assert ci("2024-01-01T00:59:59") == 50
    assert ci("2024-01-01T01:00:00") == 80
    assert ci("2024-01-01T01:30:00") == 80
    assert ci("2024-01-01T02:00:00") == 20
    assert ci("2024-01-01T04:59:59") == 20  # the last point holds for a while...
    assert ci("2024-01-01T05:00:00") == 100  # ...then the static value takes over again
    series_f = cf.at(ts("2024-01-01T01:30:00"))
    static_f = cf.at(ts("2024-01-02T00:00:00"))
    assert "series" in series_f.sources["carbon_intensity_g_per_kwh"]
    assert static_f.sources["carbon_intensity_g_per_kwh"] == "site configuration"
    assert series_f.key() != static_f.key()
    # Other factors are the cluster's whatever the intensity.
    assert (series_f.pue, series_f.ewif_l_per_kwh) == (static_f.pue, static_f.ewif_l_per_kwh)
    # The same value at two times is the same factor set (one ledger row, not one per sample).
    assert cf.at(ts("2024-01-01T00:10:00")) is cf.at(ts("2024-01-01T00:20:00"))


def test_unsorted_series_is_sorted(tmp_path):
    write(tmp_path / "ci.csv", "2024-01-01T01:00:00Z,80\n2024-01-01T00:00:00Z,50\n")
    series = config_mod.CarbonSeries(tmp_path / "ci.csv")
    assert series.at(ts("2024-01-01T00:30:00")) == 50
    assert series.at(ts("2024-01-01T01:30:00")) == 80


# -- greend config check --------------------------------------------------------------------------
def run_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GREEND_CONFIG", "GREEND_STATE_DIR")}
    return subprocess.run([str(GREEND), "config", "check", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60)


def test_config_check_prints_the_effective_config(tmp_path):
    p = write(tmp_path / "greend.toml", '[clusters.local]\npue = 1.2\n')
    r = run_check(str(p), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"# effective configuration ({p})" in r.stdout
    assert "pue = 1.2" in r.stdout
    assert "interval_s = 5.0" in r.stdout  # defaults filled in
    assert "# factors:" in r.stdout
    # what it prints is itself a valid configuration
    body = r.stdout.split("\n# resolved at start")[0]
    assert config_mod.parse(tomllib.loads(body)).clusters["local"].pue == 1.2


def test_config_check_bad_file_exits_2_with_the_message_and_no_traceback(tmp_path):
    p = write(tmp_path / "greend.toml", '[clusters.local]\npue = 0.5\n')
    r = run_check(str(p), cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert str(p) in r.stderr and "clusters.local.pue" in r.stderr
    r = run_check(str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "no such config file" in r.stderr


@pytest.mark.parametrize("example", sorted((Path(__file__).parent.parent / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_example_config_round_trips_through_config_check(example):
    # What `greend config check` prints must be a config that loads back to the same thing,
    # arrays of tables ([[policy.rules]]) included.
    cfg = config_mod.load(example)
    text = config_mod.to_toml(cfg)
    assert config_mod.parse(tomllib.loads(text), "printed") == cfg


def test_factors_cache_rereads_a_series_only_when_its_file_changes(tmp_path):
    series = write(tmp_path / "ci.csv", SERIES)
    p = write(tmp_path / "greend.toml", """
[clusters.local]
[clusters.far]
carbon_intensity_series = "ci.csv"
""")
    cfg = config_mod.load(p)
    cache = config_mod.FactorsCache()
    first = cache.get(cfg)
    assert set(first) == {"local", "far"}
    assert cache.get(cfg)["far"] is first["far"]  # nothing changed: not read again
    series.write_text(SERIES.replace(",50", ",65"))
    os.utime(series, (series.stat().st_atime, series.stat().st_mtime + 10))
    again = cache.get(cfg)
    assert again["far"] is not first["far"] and again["local"] is first["local"]
    assert again["far"].at(ts("2024-01-01T00:30:00")).carbon_intensity_g_per_kwh == 65
    series.write_text("timestamp,g_per_kwh\nnot a time,1\n")
    os.utime(series, (series.stat().st_atime, series.stat().st_mtime + 20))
    assert set(cache.get(cfg)) == {"local"}  # a bad series leaves its cluster out, not the others
# -- where the configuration is looked up ----------------------------------------------------------
def lookup_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GREEND_CONFIG", "GREEND_STATE_DIR", "XDG_CONFIG_HOME")}
    env.update({"GREEND_SYSCONFDIR": str(tmp_path / "etc"), "HOME": str(tmp_path / "home")}, **extra)
    return env


def check_json(tmp_path: Path, env: dict, *args: str) -> dict:
    import json

    r = subprocess.run([str(GREEND), *args, "config", "check", "--json"], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_system_config_in_etc_is_found_without_flags(tmp_path):
    env = lookup_env(tmp_path)
    d = check_json(tmp_path, env)
    assert d["resolved"]["config_file"]["path"] is None
    assert "embedded default" in d["resolved"]["config_file"]["why"]
    etc = write(tmp_path / "etc" / "greend" / "greend.toml",
                'cluster = "jz"\n[clusters.jz]\npue = 1.2\n')
    d = check_json(tmp_path, env)
    assert d["cluster"] == "jz"
    assert d["resolved"]["config_file"] == {"path": str(etc), "why": "system configuration"}
    r = subprocess.run([str(GREEND), "config", "check"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=60)
    assert f"# configuration file in force: {etc} (system configuration)" in r.stdout


def test_lookup_order_flag_env_user_system(tmp_path):
    write(tmp_path / "etc" / "greend" / "greend.toml", 'cluster = "sys"\n[clusters.sys]\n')
    user = write(tmp_path / "xdg" / "greend" / "greend.toml", 'cluster = "usr"\n[clusters.usr]\n')
    env_file = write(tmp_path / "env.toml", 'cluster = "env"\n[clusters.env]\n')
    flag = write(tmp_path / "flag.toml", 'cluster = "flag"\n[clusters.flag]\n')
    env = lookup_env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    if os.geteuid() != 0:  # root never reads a user configuration
        assert check_json(tmp_path, env)["resolved"]["config_file"]["path"] == str(user)
    else:
        assert check_json(tmp_path, env)["cluster"] == "sys"
    env["GREEND_CONFIG"] = str(env_file)
    assert check_json(tmp_path, env)["cluster"] == "env"
    assert check_json(tmp_path, env, "--config", str(flag))["cluster"] == "flag"


def test_user_config_is_read_for_an_unprivileged_user(tmp_path, greendtest_dir):
    from daemonproc import greend_argv

    top = greendtest_dir
    write(top / "greend" / "greend.toml", 'cluster = "mine"\n[clusters.mine]\n')
    for p in top.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    env = lookup_env(tmp_path, XDG_CONFIG_HOME=str(top))
    r = subprocess.run([*greend_argv("greendtest"), "config", "check", "--json"],
                       capture_output=True, text=True, cwd="/tmp", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"cluster": "mine"' in r.stdout and "user configuration" in r.stdout


def test_unreadable_config_is_an_error_not_the_default(tmp_path):
    """/etc/greend/greend.toml there but not readable (mode 0600): an error naming it, never the
    embedded default (which would book a node's jobs under cluster "local")."""
    import shutil
    import tempfile

    from daemonproc import greend_argv

    user = None
    if os.geteuid() == 0:  # root reads any file: be the test user
        try:
            import pwd

            pwd.getpwnam("greendtest")
        except KeyError:
            pytest.skip("as root, needs user greendtest (made by the testbed or bin/test)")
        user = "greendtest"
    top = Path(tempfile.mkdtemp(prefix="greend-etc-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        p = write(top / "greend" / "greend.toml", 'cluster = "x"\n[clusters.x]\n')
        os.chmod(top / "greend", 0o755)
        os.chmod(p, 0o600 if user else 0)
        env = lookup_env(tmp_path, GREEND_SYSCONFDIR=str(top))
        argv = greend_argv(user) if user else [str(GREEND)]
        r = subprocess.run([*argv, "config", "check"], capture_output=True, text=True, cwd="/tmp",
                           env=env, timeout=60)
        assert r.returncode == 2, r.stdout
        assert f"{p}: cannot read: Permission denied" in r.stderr
    finally:
        shutil.rmtree(top)
