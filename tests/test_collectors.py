"""The collector table (collectors/registry.py) and its [collectors] switches, on fixture trees."""

from __future__ import annotations

import pytest
from fake_nvml import FakeGpu, FakeNvml
from fixtures import make_cgroups, make_procfs, make_rapl
from greend.collectors.base import EnergySource, JobSource, SplitsOwnDomains
from greend.collectors.cgroups import SlurmCgroups
from greend.collectors.nvml import NvmlCollector
from greend.collectors.procscan import ProcScan
from greend.collectors.rapl import RaplCollector
from greend.collectors.registry import COLLECTORS

from greend import config as config_mod
from greend.monitor import Monitor


def cfg(tmp_path, **kw):
    return config_mod.parse({
        "node": "n1", "cluster": "c1", "clusters": {"c1": {}},
        "paths": {"procfs": str(tmp_path / "proc"), "sysfs": str(tmp_path / "sys"),
                  "cgroupfs": str(tmp_path / "cgroup")},
        **kw,
    })


@pytest.fixture
def node(tmp_path, monkeypatch):
    make_procfs(tmp_path / "proc")
    make_rapl(tmp_path / "sys")
    FakeNvml([FakeGpu("GPU-a")]).install(monkeypatch)
    return tmp_path


def test_every_registered_collector_implements_its_interface(node):
    make_cgroups(node / "cgroup", 2)
    c = cfg(node)
    where = Monitor(c, None)._where()
    for name, entry in COLLECTORS.items():
        src = entry.open(where)
        want = EnergySource if entry.kind == "energy" else JobSource
        assert isinstance(src, want), name
        assert src.name == name
    assert isinstance(COLLECTORS["nvml"].open(where), SplitsOwnDomains)


def test_auto_opens_what_exists(node):
    m = Monitor(cfg(node), None)  # no cgroup tree: the process scan stands in
    assert [type(s) for s in m.energy_sources] == [RaplCollector, NvmlCollector]
    assert isinstance(m.jobs_source, ProcScan)
    assert m.status["rapl"].present and "package-0" in m.status["rapl"].detail
    m.close()
    make_cgroups(node / "cgroup", 2)
    m = Monitor(cfg(node), None)
    assert isinstance(m.jobs_source, SlurmCgroups)
    assert str(node / "cgroup") in m.status["cgroups"].detail
    m.close()


def test_off_is_never_opened(node):
    make_cgroups(node / "cgroup", 2)
    m = Monitor(cfg(node, collectors={"rapl": "off", "nvml": "off", "cgroups": "off"}), None)
    assert m.energy_sources == []
    assert "rapl" not in m.status and "nvml" not in m.status
    assert isinstance(m.jobs_source, ProcScan)
    m.close()


def test_on_without_its_source_is_a_clear_error(node):
    with pytest.raises(config_mod.ConfigError, match=r"collector cgroups is switched on in "
                       r"\[collectors\] but its source is missing: .*cgroup"):
        Monitor(cfg(node, collectors={"cgroups": "on"}), None)
    with pytest.raises(config_mod.ConfigError, match="collector rapl is switched on"):
        Monitor(cfg(node, paths={"procfs": str(node / "proc"), "sysfs": str(node / "nowhere")},
                    collectors={"rapl": "on"}), None)


def test_older_spellings_still_switch(node):
    make_cgroups(node / "cgroup", 2)
    m = Monitor(cfg(node, power={"rapl": False}, attribution={"jobs_from": "procscan"}), None)
    assert "rapl" not in m.status and isinstance(m.jobs_source, ProcScan)
    m.close()
    (node / "cgroup").rename(node / "gone")
    with pytest.raises(config_mod.ConfigError, match="collector cgroups"):
        Monitor(cfg(node, attribution={"jobs_from": "cgroup"}), None)


def test_bad_switches_name_the_key(tmp_path):
    with pytest.raises(config_mod.ConfigError, match=r"collectors\.nvml.*'auto', 'on' or 'off'"):
        config_mod.parse({"collectors": {"nvml": "maybe"}})
    with pytest.raises(config_mod.ConfigError, match=r"collectors.*needs a job source"):
        config_mod.parse({"collectors": {"cgroups": "off", "procscan": "off"}})
    with pytest.raises(config_mod.ConfigError, match=r"collectors\.gpu.*unknown key"):
        config_mod.parse({"collectors": {"gpu": "on"}})
