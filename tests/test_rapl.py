"""RAPL through powercap sysfs: which zones count, wrap-around, and a permission-denied host."""

from __future__ import annotations

import logging
import os

import pytest
from fixtures import make_rapl
from greend.collectors.base import SourceUnavailable
from greend.collectors.rapl import RaplCollector

from greend.attribution import counter_delta


def readings(col: RaplCollector) -> dict[str, tuple[str, int, int | None]]:
    return {c.domain: (c.source, c.value_uj, c.max_range_uj) for c in col.read()}


def test_packages_and_dram_count_core_uncore_psys_and_mmio_duplicate_do_not(tmp_path):
    rapl = make_rapl(tmp_path / "sys", packages=2, dram=True, mmio=True, psys=True)
    col = RaplCollector(tmp_path / "sys")
    try:
        got = readings(col)
        assert sorted(got) == ["dram-0", "dram-1", "package-0", "package-1"]
        assert got["package-0"][0] == "cpu" and got["dram-1"][0] == "dram"
        assert all(c.provenance.startswith("measured") for c in col.read())
        # package-0 is read from the MSR zone, not its MMIO twin
        rapl.advance("package-0", 500)
        rapl.advance("mmio-package-0", 7)
        assert readings(col)["package-0"][1] == rapl.values["package-0"]
        # nested core/uncore energy is inside the package: moving them changes nothing
        before = readings(col)
        rapl.advance("core-0", 10_000)
        rapl.advance("uncore-1", 10_000)
        rapl.advance("psys", 10_000)
        assert readings(col) == before
    finally:
        col.close()


def test_counters_are_reread_through_kept_descriptors(tmp_path):
    rapl = make_rapl(tmp_path / "sys", packages=1, mmio=False, psys=False)
    col = RaplCollector(tmp_path / "sys")
    try:
        rapl.set("package-0", 42)
        rapl.set("dram-0", 7)
        assert {c.domain: c.value_uj for c in col.read()} == {"package-0": 42, "dram-0": 7}
        rapl.advance("package-0", 123_456_789)
        assert readings(col)["package-0"][1] == 42 + 123_456_789
    finally:
        col.close()


def test_mmio_only_package_is_used(tmp_path):
    # Some parts expose a package through MMIO only: then it is the package counter.
    root = tmp_path / "sys" / "class" / "powercap" / "intel-rapl-mmio:0"
    root.mkdir(parents=True)
    (root / "name").write_text("package-0\n")
    (root / "energy_uj").write_text("99\n")
    (root / "max_energy_range_uj").write_text("1000\n")
    col = RaplCollector(tmp_path / "sys")
    try:
        assert readings(col) == {"package-0": ("cpu", 99, 1000)}
    finally:
        col.close()


def test_amd_without_dram(tmp_path):
    make_rapl(tmp_path / "sys", packages=1, dram=False, mmio=False, psys=False)
    col = RaplCollector(tmp_path / "sys")
    try:
        assert sorted(readings(col)) == ["package-0"]
    finally:
        col.close()


def test_wrap_around_across_max_energy_range(tmp_path):
    rng = 1_000_000
    rapl = make_rapl(tmp_path / "sys", packages=1, dram=False, mmio=False, psys=False,
                     max_range=rng, start_uj=rng - 300)
    col = RaplCollector(tmp_path / "sys")
    try:
        (_, prev, max_range), = readings(col).values()
        assert max_range == rng
        rapl.advance("package-0", 1_000)  # goes over the top: the counter now shows 700
        (_, cur, _), = readings(col).values()
        assert cur == 700 < prev
        assert counter_delta(prev, cur, max_range) == 1_000
    finally:
        col.close()


def test_no_powercap_is_unavailable_not_an_error(tmp_path):
    with pytest.raises(SourceUnavailable):
        RaplCollector(tmp_path / "sys")
    (tmp_path / "sys" / "class" / "powercap").mkdir(parents=True)
    with pytest.raises(SourceUnavailable, match="no readable RAPL zone"):
        RaplCollector(tmp_path / "sys")


def test_unreadable_counters_warn_once_with_the_fix(tmp_path, monkeypatch, caplog):
    # Since CVE-2020-8694 energy_uj is root-only. Tests run as root, so make open() refuse it.
    make_rapl(tmp_path / "sys", packages=2)
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if os.fspath(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with caplog.at_level(logging.DEBUG, logger="greend.collectors.rapl"), \
            pytest.raises(SourceUnavailable, match="permission denied"):
        RaplCollector(tmp_path / "sys")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "CVE-2020-8694" in msg and "chgrp" in msg and "TDP" in msg
