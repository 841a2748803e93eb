"""The cached view of the validated configuration (greend.config_cache): the fast path of
`greend measure` and `greend route` (issues 14 and 17). It must give the same values as the
validated models, never be stale, never trust a file that is not the user's own, and fall back to
the validated load on any doubt."""

from __future__ import annotations

import json
import marshal
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from greend import config as config_mod
from greend import config_cache
from greend.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))
GREEND = str(Path(sys.executable).with_name("greend"))


def _same(model, view, where: str = "config") -> None:
    """Every field, extra key, private attribute and property of `model` equals the view's, with
    the same type (a Path stays a Path, a tuple a tuple)."""
    from pydantic import BaseModel

    if isinstance(model, BaseModel):
        assert isinstance(view, config_cache.View), f"{where}: {type(view).__name__}, not a view"
        assert list(type(view).model_fields) == list(type(model).model_fields), where
        for name in type(model).model_fields:
            _same(getattr(model, name), getattr(view, name), f"{where}.{name}")
        assert (model.model_extra is None) == (view.model_extra is None), where
        for name, value in (model.model_extra or {}).items():
            _same(value, getattr(view, name), f"{where}.{name}")
        for name, value in (model.__pydantic_private__ or {}).items():
            _same(value, getattr(view, name), f"{where}.{name}")
        props, _ = config_cache._own_members(type(model))
        for name in props:
            _same(getattr(model, name), getattr(view, name), f"{where}.{name}")
        return
    assert type(view) is type(model), f"{where}: {type(view).__name__} != {type(model).__name__}"
    if isinstance(model, dict):
        assert list(view) == list(model), where
        for k in model:
            _same(model[k], view[k], f"{where}[{k!r}]")
    elif isinstance(model, list | tuple):
        assert len(view) == len(model), where
        for i, (a, b) in enumerate(zip(model, view, strict=True)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert view == model, where


def _plain(x):
    """Records and other plain objects as nested dicts (with their type names), for comparing."""
    from greend.policies.records import Record

    if isinstance(x, Record):
        return (type(x).__name__, {k: _plain(getattr(x, k)) for k in x._fields() if k != "config"})
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return (type(x).__name__, {k: _plain(v) for k, v in vars(x).items()})
    return x


def _round_trip(cfg):
    return config_cache.view(marshal.loads(marshal.dumps(config_cache.snapshot(cfg))))


@pytest.mark.parametrize("path", [None, *EXAMPLES], ids=lambda p: "embedded default" if p is None
                         else p.name)
def test_the_view_gives_the_validated_models_values(path, tmp_path, monkeypatch):
    cfg = config_mod.load(path)
    view = _round_trip(cfg)
    _same(cfg, view)
    # The members that depend on the machine and the environment are computed, not frozen.
    assert view.node_name == cfg.node_name
    assert view.resolved_state_dir() == cfg.resolved_state_dir()
    monkeypatch.setenv("GREEND_STATE_DIR", str(tmp_path))
    assert view.resolved_state_dir() == cfg.resolved_state_dir() == tmp_path
    # What the fast paths build from it is the same: the factors of every cluster, the policy
    # engine's compiled site, the rules with their parameters.
    from greend.policies.registry import build_rules
    from greend.policies.site import compile_site

    from greend.site_factors import cluster_factors

    for name in cfg.clusters:
        a, b = cluster_factors(cfg, name), cluster_factors(view, name)
        for t in (0.0, 1.77e9, 1.7676e9):
            assert a.at(t) == b.at(t)
    sa = compile_site(cfg, path, carbon_fetch=False)
    sb = compile_site(view, path, carbon_fetch=False)
    assert _plain(sa.clusters) == _plain(sb.clusters)
    assert _plain(sa.settings) == _plain(sb.settings)
    ra, rb = build_rules(cfg.policy.rules, sa), build_rules(view.policy.rules, sb)
    assert [r.describe() for r in ra] == [r.describe() for r in rb]


def test_a_view_is_read_only_and_copies_like_a_model():
    view = _round_trip(config_mod.load(None))
    with pytest.raises(AttributeError, match="read-only"):
        view.cluster = "other"
    quick = view.sampling.model_copy(update={"measure_interval_s": 0.5})
    assert quick.measure_interval_s == 0.5 and view.sampling.measure_interval_s == 1.0
    copy = view.model_copy(update={"sampling": quick})
    copy._state_dir_flag = Path("/x")  # as load_config sets --state-dir
    assert copy.resolved_state_dir() == Path("/x") and view.resolved_state_dir() != Path("/x")


def _config(tmp_path: Path, text: str = 'cluster = "local"\nnode = "n1"\n') -> Path:
    p = tmp_path / "greend.toml"
    p.write_text(text)
    return p


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "greend"


def _snapshots(cache: Path) -> list[Path]:
    return sorted(cache.glob("config-*.snapshot"))


def test_a_validated_load_is_cached_then_read_without_validation(tmp_path, cache):
    p = _config(tmp_path)
    first = config_cache.load(p)
    assert isinstance(first, config_mod.Config)
    (snap,) = _snapshots(cache)
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    second = config_cache.load(p)
    assert isinstance(second, config_cache.ConfigView)
    _same(first, second)
    # The embedded default is cached too (no configuration file: most `measure` runs).
    assert isinstance(config_cache.load(None), config_mod.Config)
    assert isinstance(config_cache.load(None), config_cache.ConfigView)


def test_an_edit_a_touch_or_another_version_is_a_miss(tmp_path, cache, monkeypatch):
    p = _config(tmp_path)
    config_cache.load(p)
    assert isinstance(config_cache.load(p), config_cache.ConfigView)
    # An edit of the same size, with the old mtime put back: the ctime still tells.
    st = p.stat()
    p.write_text('cluster = "local"\nnode = "n2"\n')
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    cfg = config_cache.load(p)
    assert isinstance(cfg, config_mod.Config) and cfg.node == "n2"
    assert config_cache.load(p).node == "n2"
    # A touch.
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert isinstance(config_cache.load(p), config_mod.Config)
    assert isinstance(config_cache.load(p), config_cache.ConfigView)
    # Another greend version (an upgrade keeps the file) or snapshot format.
    monkeypatch.setattr(config_cache, "__version__", "99.0")
    assert isinstance(config_cache.load(p), config_mod.Config)
    assert isinstance(config_cache.load(p), config_cache.ConfigView)
    monkeypatch.setattr(config_cache, "FORMAT", 99)
    assert isinstance(config_cache.load(p), config_mod.Config)
    # The same file reached from another path (relative paths in it resolve from there).
    link = tmp_path / "sub"
    link.mkdir()
    (link / "greend.toml").symlink_to(p)
    assert isinstance(config_cache.load(link / "greend.toml"), config_mod.Config)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "magic"])
def test_a_corrupted_snapshot_is_ignored_and_replaced(tmp_path, cache, damage):
    p = _config(tmp_path)
    config_cache.load(p)
    (snap,) = _snapshots(cache)
    data = bytearray(snap.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "garbage":
        data = bytearray(config_cache.MAGIC + os.urandom(200))
    elif damage == "empty":
        data = bytearray()
    else:
        data[:4] = b"XXXX"
    snap.write_bytes(bytes(data))
    cfg = config_cache.load(p)
    assert isinstance(cfg, config_mod.Config) and cfg.node == "n1"
    assert isinstance(config_cache.load(p), config_cache.ConfigView)  # written again, whole


def test_a_snapshot_that_is_not_the_users_own_is_never_read(tmp_path, cache):
    p = _config(tmp_path)
    config_cache.load(p)
    (snap,) = _snapshots(cache)
    # Readable by others: ignored (and replaced by a 0600 one).
    snap.chmod(0o644)
    assert isinstance(config_cache.load(p), config_mod.Config)
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600
    # A symbolic link (even to the user's own snapshot): ignored.
    real = snap.with_name("elsewhere")
    snap.rename(real)
    snap.symlink_to(real)
    assert isinstance(config_cache.load(p), config_mod.Config)
    assert not snap.is_symlink()  # replaced atomically by a file
    # A directory that others may write to: neither read nor written.
    cache.chmod(0o777)
    try:
        before = snap.read_bytes()
        assert isinstance(config_cache.load(p), config_mod.Config)
        assert snap.read_bytes() == before
    finally:
        cache.chmod(0o700)
    if os.geteuid() != 0:
        return
    # Owned by another user (the test user's uid), even with mode 0600: ignored.
    os.chown(snap, 4242, 4242)
    assert isinstance(config_cache.load(p), config_mod.Config)
    assert snap.stat().st_uid == 0  # replaced by the user's own


def test_a_snapshot_is_not_used_for_a_foreign_key(tmp_path, cache):
    # A snapshot of another file copied over this one's name (e.g. a crc collision): the key in it
    # does not match, so it is a miss.
    a, b = _config(tmp_path), tmp_path / "b.toml"
    b.write_text('cluster = "local"\nnode = "other"\n')
    config_cache.load(b)
    config_cache.load(a)
    snap_a = config_cache._file_of(config_cache.key_of(a))
    snap_b = config_cache._file_of(config_cache.key_of(b))
    snap_a.write_bytes(snap_b.read_bytes())
    cfg = config_cache.load(a)
    assert isinstance(cfg, config_mod.Config) and cfg.node == "n1"


def test_errors_are_the_validated_loads_and_nothing_is_cached(tmp_path, cache):
    bad = _config(tmp_path, 'cluster = "local"\n[sampling]\ninterval_s = -1\n')
    with pytest.raises(ConfigError) as fast:
        config_cache.load(bad)
    with pytest.raises(ConfigError) as slow:
        config_mod.load(bad)
    assert str(fast.value) == str(slow.value)
    assert "sampling.interval_s" in str(fast.value)
    with pytest.raises(ConfigError, match="no such config file"):
        config_cache.load(tmp_path / "absent.toml")
    assert _snapshots(cache) == []
    # An unusable cache location (a file where the directory should be) is only a miss.
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("not a directory")
    good = _config(tmp_path)
    assert config_cache.load(good).node == "n1"
    assert config_cache.load(good).node == "n1"


def test_a_model_the_view_cannot_stand_for_is_not_cached(tmp_path, cache, monkeypatch):
    # A public method on a model (not a property of the model alone): the view could not offer it,
    # so no snapshot is made and the validated Config is used every time.
    monkeypatch.setattr(config_mod.Sampling, "every", lambda self: self.interval_s, raising=False)
    p = _config(tmp_path)
    with pytest.raises(config_cache.Unsnapshottable, match="Sampling"):
        config_cache.snapshot(config_mod.load(p))
    assert isinstance(config_cache.load(p), config_mod.Config)
    assert isinstance(config_cache.load(p), config_mod.Config)
    assert _snapshots(cache) == []


_PROBE = (
    "import sys\n"
    "from greend.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('MODULES', rc, 'pydantic' in sys.modules, 'greend.config' in sys.modules, file=sys.stderr)\n"
)


def _probe(args: list[str], env: dict, cwd: Path) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=120)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("MODULES")]
    assert line, r.stderr
    return r.stdout, line[-1]


def test_measure_imports_neither_pydantic_nor_the_models_once_cached(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "GREEND_STATE_DIR": str(tmp_path / "state")}
    args = ["measure", "-q", "--", "true"]
    # First run: validated load (here the embedded default), snapshot written.
    _, first = _probe(args, env, tmp_path)
    assert first == "MODULES 0 True True"
    _, second = _probe(args, env, tmp_path)
    assert second == "MODULES 0 False False"
    # With a configuration file, and its options applied to the view (--interval, --idle).
    cfg = _config(tmp_path, 'cluster = "lab"\n[clusters.lab]\ntier = "local"\npue = 1.3\n')
    env["GREEND_CONFIG"] = str(cfg)
    args = ["measure", "--json", "--interval", "0.5", "--idle", "unattributed", "--", "true"]
    _probe(args, env, tmp_path)
    out2 = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert out2.stderr.splitlines()[-1] == "MODULES 0 False False"
    d = json.loads(out2.stderr[: out2.stderr.rindex("MODULES")])
    assert d["job"]["cluster"] == "lab" and d["idle_power"]["rule"] == "unattributed"
    assert d["factors"][0]["pue"] == 1.3 and d["series_step_s"] == 0.5


def test_route_decides_the_same_from_the_cache(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH -c 2\n#SBATCH -t 1:00:00\n#SBATCH -A proj-green\nsrun true\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "GREEND_STATE_DIR": str(tmp_path / "state")}
    args = ["-c", str(REPO / "examples" / "site.toml"), "route", "--json", "--no-live",
            "--at", "2026-01-15T10:00:00+00:00", str(script)]
    validated, first = _probe(args, env, tmp_path)
    cached, second = _probe(args, env, tmp_path)
    assert first.split()[3] == "True" and second.split()[3] == "False"  # greend.config imported
    a, b = json.loads(validated), json.loads(cached)
    assert a == b
    assert a["outcome"] == "route"
