"""The vendored reference data (greend/data/): provenance, refresh from a CodeCarbon install, and the
CPU power model's choice of table entry, family or generic default (issue 17)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import make_procfs

from greend import config as config_mod
from greend import refdata
from greend.monitor import cpu_power_model

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(procfs: Path, **power) -> config_mod.Config:
    cfg = config_mod.load(None)
    return cfg.model_copy(update={
        "paths": cfg.paths.model_copy(update={"procfs": procfs}),
        "power": cfg.power.model_copy(update=power),
    })


def test_vendored_files_match_their_recorded_provenance():
    prov = refdata.provenance()
    cc = prov["codecarbon"]
    assert cc["version"] == refdata.codecarbon_version() != "unknown"
    for name, f in cc["files"].items():
        assert refdata._sha256(refdata.data_dir() / name) == f["sha256"], name
    notice = (refdata.data_dir() / refdata.CODECARBON_LICENSE_FILE).read_text()
    assert "MIT License" in notice and "Permission is hereby granted" in notice


def test_source_of_country_mix_names_the_vendored_codecarbon_version():
    assert f"CodeCarbon {refdata.codecarbon_version()} global_energy_mix.json" in \
        refdata.country_mix("FRA").source


def fake_codecarbon(site: Path, version: str, *, cpu_csv: str, mix: dict) -> Path:
    pkg = site / "codecarbon"
    (pkg / "data" / "hardware").mkdir(parents=True)
    (pkg / "data" / "private_infra").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the tracker must not be imported')\n")
    (pkg / "data" / "hardware" / "cpu_power.csv").write_text(cpu_csv)
    (pkg / "data" / "private_infra" / "global_energy_mix.json").write_text(json.dumps(mix))
    dist = site / f"codecarbon-{version}.dist-info"
    (dist / "licenses").mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.4\nName: codecarbon\nVersion: {version}\n")
    (dist / "licenses" / "LICENSE").write_text("MIT License\nfake notice\n")
    return site


def copy_data(tmp: Path) -> Path:
    dest = tmp / "data"
    shutil.copytree(refdata.data_dir(), dest)
    return dest


def run_update(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "greend.refdata", "update", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_update_rewrites_the_data_and_records_the_version(tmp_path):
    site = fake_codecarbon(tmp_path / "site", "9.9.9", cpu_csv="Name,TDP\nAMD EPYC 9999,123\n",
                           mix={"FRA": {"iso_code": "FRA", "carbon_intensity": 42.0}})
    dest = copy_data(tmp_path)
    r = run_update("--from-codecarbon", str(site), "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    assert "CodeCarbon 9.9.9" in r.stdout and "cpu_power.csv (1 entries)" in r.stdout
    prov = json.loads((dest / "PROVENANCE.json").read_text())
    assert prov["codecarbon"]["version"] == "9.9.9"
    assert prov["codecarbon"]["files"]["cpu_power.csv"]["entries"] == 1
    assert "cpu_families.csv" in prov  # the rest of the provenance is kept
    assert (dest / "cpu_power.csv").read_text() == "Name,TDP\nAMD EPYC 9999,123\n"
    assert (dest / "LICENSE.codecarbon").read_text() == "MIT License\nfake notice\n"
    assert not list(dest.glob(".*.new"))


def test_update_refuses_malformed_data_and_changes_nothing(tmp_path):
    site = fake_codecarbon(tmp_path / "site", "9.9.9", cpu_csv="Model,Watts\nX,1\n",
                           mix={"FRA": {"carbon_intensity": 1}})
    dest = copy_data(tmp_path)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    r = run_update("--from-codecarbon", str(site), "--dest", str(dest))
    assert r.returncode == 1
    assert "cpu_power.csv: expected the columns Name,TDP" in r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_update_without_codecarbon_says_how_to_get_it(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_update("--from-codecarbon", str(tmp_path / "empty"), "--dest", str(copy_data(tmp_path)))
    assert r.returncode == 1 and "not a codecarbon package directory" in r.stderr


@pytest.mark.parametrize(("model", "family", "w_per_core"), [
    ("AMD EPYC 7B13", "AMD EPYC", 4.38),
    ("AMD EPYC Processor (with IBPB)", "AMD EPYC", 4.38),
    ("Intel(R) Xeon(R) Gold 9999Z CPU @ 2.00GHz", "Intel Xeon Gold", 7.5),
    ("Intel(R) Xeon(R) CPU E5-2600 v9 @ 2.60GHz", "Intel Xeon E5", 10.5),
    ("Intel(R) Xeon Phi(TM) CPU 7250 @ 1.40GHz", "Intel Xeon Phi", 3.75),
    ("Intel(R) Xeon(R) Processor", "Intel Xeon", 9.38),  # a VM's generic name: the whole series
    ("Intel(R) Core(TM) i7-99999K CPU @ 3.60GHz", "Intel Core", 15.5),
    ("AMD Ryzen 7 9999X 8-Core Processor", "AMD Ryzen", 10.83),
])
def test_cpu_family_by_vendor_and_series(model, family, w_per_core):
    fam = refdata.cpu_family(model)
    assert fam is not None and (fam.family, fam.w_per_core) == (family, w_per_core)


@pytest.mark.parametrize("model", ["Intel(R) Pentium(R) CPU", "Totally Unknown Chip 9000", "AMD", ""])
def test_no_family_for_a_bare_or_unknown_name(model):
    assert refdata.cpu_family(model) is None


def test_unknown_epyc_slice_uses_the_epyc_family_not_the_generic_default(tmp_path):
    # A 2-vCPU cloud slice of an EPYC whose exact model is not in CodeCarbon's table: 12 W/core
    # (Green Algorithms' "Any") would model 24 W, three times the EPYC family's per-core figure.
    make_procfs(tmp_path / "proc", ncpu=2, packages=1, model="AMD EPYC 7B13")
    m = cpu_power_model(cfg_for(tmp_path / "proc"))
    assert m.tdp_w == pytest.approx(2 * 4.38)
    assert "family 'AMD EPYC', 4.38 W/core" in m.source and "x 2 cores" in m.source


def test_known_model_uses_its_table_entry_per_package(tmp_path):
    make_procfs(tmp_path / "proc", ncpu=8, packages=2)  # Xeon Gold 6248
    m = cpu_power_model(cfg_for(tmp_path / "proc"))
    assert m.tdp_w == 300.0
    assert m.source == (f"CodeCarbon {refdata.codecarbon_version()} cpu_power.csv: "
                        "Intel Xeon Gold 6248 150 W x 2 package(s)")


def test_unknown_family_falls_back_to_the_configured_per_core_default(tmp_path):
    make_procfs(tmp_path / "proc", ncpu=4, packages=1, model="Totally Unknown Chip 9000")
    m = cpu_power_model(cfg_for(tmp_path / "proc", unknown_cpu_w_per_core=10.0))
    assert m.tdp_w == 40.0
    assert "family unknown" in m.source and "10 W/core x 4 cores" in m.source


def test_configured_tdp_wins(tmp_path):
    make_procfs(tmp_path / "proc", ncpu=2, packages=1, model="AMD EPYC 7B13")
    m = cpu_power_model(cfg_for(tmp_path / "proc", cpu_tdp_w=99.0))
    assert (m.tdp_w, m.source) == (99.0, "site configuration (power.cpu_tdp_w)")


def test_config_check_says_which_cpu_entry_is_used(tmp_path):
    make_procfs(tmp_path / "proc", ncpu=2, packages=1, model="AMD EPYC 7B13")
    conf = tmp_path / "g.toml"
    conf.write_text(f'[paths]\nprocfs = "{tmp_path / "proc"}"\n')
    r = subprocess.run([sys.executable, "-m", "greend.cli", "config", "check", str(conf), "--json"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cm = json.loads(r.stdout)["resolved"]["cpu_power_model"]
    assert cm["tdp_w"] == pytest.approx(8.76) and "family 'AMD EPYC'" in cm["source"]


def test_cpu_table_read_in_one_pass_equals_each_name_tokenized_alone():
    # The table is tokenized in one substitution over all names (start-up cost of `greend measure`);
    # it must give exactly the keys, values and order that tokenizing each row alone gives.
    import csv

    expected: dict = {}
    with (refdata.data_dir() / "cpu_power.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            try:
                expected[refdata._tokens(row["Name"])] = (row["Name"], float(row["TDP"]))
            except ValueError:  # the vendored table has a few unreadable TDPs: skipped by both
                continue
    refdata._cpu_table.cache_clear()
    table = refdata._cpu_table()
    assert len(table) > 4000
    assert list(table.items()) == list(expected.items())


def test_names_with_line_breaks_or_odd_case_tokenize_as_alone():
    names = ["Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", "AMD Ryzen 7 5800X 8-Core PROCESSOR",
             "AMD Ryzen 5 PRO 4650G with Radeon Graphics", "Intel(R) Core(TM) i7, mobile", "", "x\ny"]
    assert refdata._tokens_of_names(names) == [refdata._tokens(n) for n in names]
    assert refdata._tokens_of_names(names[:-1]) == [refdata._tokens(n) for n in names[:-1]]
