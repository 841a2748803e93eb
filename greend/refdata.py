"""Reference data bundled with CodeCarbon (CPU TDP table, per-country energy mix), read from its files.

CodeCarbon's package __init__ imports its whole tracker (pandas, requests, ...: ~28 MB of RSS), so the
data directory is located through the import system without executing the package.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

# Li, Yang, Islam, Ren, "Making AI Less Thirsty" (arXiv 2304.03271), official code, from Macknick et
# al. 2012: water consumed off-site per kWh generated, by fuel, L/kWh.
EWIF_BY_FUEL_L_PER_KWH: dict[str, float] = {
    "coal": 1.703,
    "gas": 1.136,
    "nuclear": 2.271,
    "oil": 1.325,
    "other": 1.798,
    "solar": 0.0,
    "wind": 0.0,
    "hydro": 0.0,
}
EWIF_SOURCE = "Li et al. 2023 (arXiv 2304.03271) per-fuel EWIF (Macknick et al. 2012)"
WORLD_CARBON_INTENSITY_G_PER_KWH = 475.0
WORLD_CARBON_INTENSITY_SOURCE = "IEA 2019 world average (CodeCarbon, Green Algorithms)"


class RefDataError(RuntimeError):
    """The bundled reference data could not be found or read."""


@functools.cache
def codecarbon_data_dir() -> Path:
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        raise RefDataError("the codecarbon package is not installed (needed for its reference data)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.cache
def codecarbon_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("codecarbon")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class CountryMix:
    iso_code: str
    name: str
    year: int
    carbon_intensity_g_per_kwh: float
    ewif_l_per_kwh: float
    source: str


@functools.cache
def _energy_mix() -> dict:
    path = codecarbon_data_dir() / "private_infra" / "global_energy_mix.json"
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RefDataError(f"cannot read {path}: {e}") from e


def ewif_of_mix(row: dict) -> float:
    """Generation-weighted off-site water intensity of a country's mix (docs/methodology.md §4)."""
    gen = {
        "coal": row.get("coal_TWh", 0.0),
        "gas": row.get("gas_TWh", 0.0),
        "nuclear": row.get("nuclear_TWh", 0.0),
        "oil": row.get("oil_TWh", 0.0),
        # biofuel and other renewables (geothermal, biomass...) count as "other" in Li et al.
        "other": row.get("biofuel_TWh", 0.0) + row.get("other_renewable_exc_biofuel_TWh", 0.0),
        "solar": row.get("solar_TWh", 0.0),
        "wind": row.get("wind_TWh", 0.0),
        "hydro": row.get("hydroelectricity_TWh", 0.0),
    }
    total = sum(gen.values())
    if total <= 0:
        raise RefDataError(f"no generation data for {row.get('iso_code', '?')}")
    return sum(gen[k] * EWIF_BY_FUEL_L_PER_KWH[k] for k in gen) / total


def country_mix(iso_code: str) -> CountryMix:
    """Carbon intensity and derived EWIF for an ISO 3166-1 alpha-3 country code."""
    mix = _energy_mix()
    row = mix.get(iso_code.upper())
    if row is None:
        raise KeyError(iso_code)
    return CountryMix(
        iso_code=row["iso_code"],
        name=row.get("country_name", iso_code),
        year=int(row.get("year", 0)),
        carbon_intensity_g_per_kwh=float(row["carbon_intensity"]),
        ewif_l_per_kwh=ewif_of_mix(row),
        source=f"CodeCarbon {codecarbon_version()} global_energy_mix.json "
        f"({row.get('country_name', iso_code)} {row.get('year', '')}, Our World in Data / Ember)",
    )


def known_countries() -> list[str]:
    return sorted(_energy_mix())


_NOISE = re.compile(
    r"\((?:r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\bwith radeon.*$|\b\d+-core\b|\bcore\(tm\)",
    re.IGNORECASE,
)


def _tokens(name: str) -> tuple[str, ...]:
    return tuple(_NOISE.sub(" ", name).lower().replace(",", " ").split())


@functools.cache
def _cpu_table() -> dict[tuple[str, ...], tuple[str, float]]:
    path = codecarbon_data_dir() / "hardware" / "cpu_power.csv"
    table: dict[tuple[str, ...], tuple[str, float]] = {}
    try:
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    table[_tokens(row["Name"])] = (row["Name"], float(row["TDP"]))
                except (KeyError, ValueError):
                    continue
    except OSError as e:
        raise RefDataError(f"cannot read {path}: {e}") from e
    return table


def cpu_tdp_w(model_name: str) -> tuple[str, float] | None:
    """TDP of one CPU package by model name, as (matched table name, watts), or None if unknown.

    An exact match of the normalised name wins; otherwise the longest table entry whose words all
    appear in the model name (so "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz" finds "Intel Xeon Gold
    6248" but never "...6248R"). A bare family name ("AMD EPYC") matches nothing: better the
    documented fallback than a guess.
    """
    table = _cpu_table()
    toks = _tokens(model_name)
    if toks in table:
        return table[toks]
    have = set(toks)
    best: tuple[int, tuple[str, float]] | None = None
    for key, value in table.items():
        if len(key) >= 2 and set(key) <= have and (best is None or len(key) > best[0]):
            best = (len(key), value)
    return best[1] if best else None
