"""The footprint model against the published numbers of docs/methodology.md (§3-4) and CodeCarbon's data."""

from __future__ import annotations

import pytest

from greend import refdata
from greend.footprint import J_PER_KWH, ZERO, Factors, carbon_g, footprint, water_offsite_l, water_site_l

KWH = J_PER_KWH  # 1 kWh of IT energy, in joules


def test_france_carbon_intensity_comes_from_codecarbon_data():
    mix = refdata.country_mix("FRA")
    assert mix.carbon_intensity_g_per_kwh == pytest.approx(56.039)
    assert mix.year == 2023
    assert "global_energy_mix.json" in mix.source
    assert refdata.country_mix("fra") == mix  # codes are case-insensitive


def test_unknown_country_is_a_key_error():
    with pytest.raises(KeyError):
        refdata.country_mix("XYZ")


def test_ewif_of_the_2023_french_mix_is_about_1_62_l_per_kwh():
    # docs/methodology.md §4 (derived): Li et al.'s per-fuel factors on the 2023 French mix.
    assert refdata.country_mix("FRA").ewif_l_per_kwh == pytest.approx(1.62, abs=0.01)


def test_ewif_of_a_mix_is_generation_weighted():
    row = {"nuclear_TWh": 3.0, "wind_TWh": 1.0}
    assert refdata.ewif_of_mix(row) == pytest.approx(3 * 2.271 / 4)
    with pytest.raises(refdata.RefDataError):
        refdata.ewif_of_mix({"iso_code": "NIL"})


def test_microsoft_fleet_example_water_per_kwh():
    # Li et al.: U.S. fleet PUE 1.17, WUE_site 0.55, EWIF 3.142 -> 0.55 + 1.17 x 3.142 L/kWh.
    f = Factors(pue=1.17, wue_site_l_per_kwh=0.55, ewif_l_per_kwh=3.142, carbon_intensity_g_per_kwh=0)
    fp = footprint(KWH, f)
    assert fp.water_site_l == pytest.approx(0.55)
    assert fp.water_offsite_l == pytest.approx(1.17 * 3.142)
    assert fp.water_l == pytest.approx(0.55 + 1.17 * 3.142)  # 4.226 L
    assert fp.water_l == pytest.approx(4.22614)


def test_site_water_applies_to_it_energy_not_facility_energy():
    # CodeCarbon multiplies WUE by facility energy; Li et al. (and greend) do not.
    f = Factors(pue=2.0, wue_site_l_per_kwh=1.0, ewif_l_per_kwh=0.0, carbon_intensity_g_per_kwh=0)
    assert water_site_l(KWH, f) == pytest.approx(1.0)
    assert water_offsite_l(KWH, f) == 0


def test_carbon_is_energy_times_pue_times_intensity():
    f = Factors(pue=1.2, wue_site_l_per_kwh=0, ewif_l_per_kwh=0, carbon_intensity_g_per_kwh=56.039)
    assert carbon_g(10 * KWH, f) == pytest.approx(10 * 1.2 * 56.039)
    fp = footprint(10 * KWH, f)
    assert fp.facility_energy_j == pytest.approx(12 * KWH)
    assert fp.carbon_g == pytest.approx(672.468)


def test_footprints_add_up():
    f = Factors(1.5, 0.5, 1.6, 56.0)
    a, b = footprint(1000.0, f), footprint(3000.0, f)
    total = ZERO + a + b
    assert total.it_energy_j == 4000.0
    assert total.carbon_g == pytest.approx(footprint(4000.0, f).carbon_g)
    assert total.water_l == pytest.approx(footprint(4000.0, f).water_l)


def test_factor_set_key_identifies_values_and_sources():
    a = Factors(1.2, 0.1, 1.6, 56.0, {"pue": "measured 2024"})
    assert a.key() == Factors(1.2, 0.1, 1.6, 56.0, {"pue": "measured 2024"}).key()
    assert a.key() != Factors(1.2, 0.1, 1.6, 57.0, {"pue": "measured 2024"}).key()
    assert a.key() != Factors(1.2, 0.1, 1.6, 56.0, {"pue": "vendor figure"}).key()


@pytest.mark.parametrize(("model", "expected"), [
    ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", ("Intel Xeon Gold 6248", 150.0)),
    ("Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz", ("Intel Xeon Gold 6248R", 205.0)),
    ("AMD EPYC 7763 64-Core Processor", ("AMD EPYC 7763", 280.0)),
    ("AMD EPYC", None),
    ("", None),
    ("Totally Unknown Chip 9000", None),
])
def test_cpu_tdp_lookup(model, expected):
    assert refdata.cpu_tdp_w(model) == expected
