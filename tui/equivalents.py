"""Everyday equivalents of a job's footprint, each from a cited figure (listed in docs/tui.md)."""

from __future__ import annotations

from dataclasses import dataclass

from greend import units

# gCO2/km: average type-approval (WLTP) tailpipe emissions of new passenger cars registered in
# Europe in 2022, EEA indicator "CO2 performance of new passenger cars in Europe".
CAR_G_PER_KM = 108.1
CAR_SOURCE = "EEA: new cars in Europe, 2022, 108.1 gCO2/km (WLTP)"

BOTTLE_L = 0.5
BOTTLE_SOURCE = "a small bottle holds 0.5 L"

# The metric teaspoon (5 mL) and the metric drop (0.05 mL, 20 drops to the millilitre), the
# measures of pharmacy and of nutrition labels.
TEASPOON_L = 0.005
TEASPOON_SOURCE = "metric teaspoon: 5 mL"
DROP_L = 0.00005
DROP_SOURCE = "metric drop: 0.05 mL (20 drops per mL)"

# Litres: the average shower in the Residential End Uses of Water study, version 2 (Water Research
# Foundation, 2016): 59.8 L over 7.8 minutes.
SHOWER_L = 59.8
SHOWER_SOURCE = "REUWS v2 (Water Research Foundation 2016): 59.8 L"

# Joules to heat 1 kg of water from 20 to 100 degC: 4186 J/(kg.K) x 80 K, losses left out.
KETTLE_J = 4186 * 80
KETTLE_SOURCE = "1 L from 20 to 100 °C, 4.186 kJ/(kg·K), no losses"


@dataclass(frozen=True, slots=True)
class Equivalent:
    quantity: str  # "carbon", "water", "energy"
    text: str
    source: str


def _count(x: float) -> str:
    """Two significant digits below 10, whole numbers above: the quantities here are scaled so that
    a count is never a tiny fraction."""
    if x == 0:
        return "0"
    if x < 10:
        return f"{x:.2g}"
    return f"{x:,.0f}"


def _distance(km: float) -> str:
    if km <= 0:
        return "0 m"
    for factor, unit in ((1, "km"), (1e-3, "m"), (1e-5, "cm"), (1e-6, "mm")):
        if km >= factor:
            return f"{_count(km / factor)} {unit}"
    return f"{_count(km / 1e-9)} µm"


def _many(x: float, one: str, many: str) -> str:
    n = _count(x)
    return f"{n} {one if n == '1' else many}"


def _water(litres: float) -> Equivalent:
    if litres >= SHOWER_L / 2:
        return Equivalent("water", _many(litres / SHOWER_L, "shower", "showers"), SHOWER_SOURCE)
    if litres >= BOTTLE_L / 2:
        return Equivalent("water", _many(litres / BOTTLE_L, "bottle", "bottles") + " of 0.5 L",
                          BOTTLE_SOURCE)
    if litres >= TEASPOON_L:
        return Equivalent("water", f"{units.water(litres)}: "
                          + _many(litres / TEASPOON_L, "teaspoon", "teaspoons"), TEASPOON_SOURCE)
    if litres >= DROP_L:
        return Equivalent("water", f"{units.water(litres)}: " + _many(litres / DROP_L, "drop", "drops"),
                          DROP_SOURCE)
    if litres > 0:
        return Equivalent("water", f"{units.water(litres)}: less than a drop", DROP_SOURCE)
    return Equivalent("water", "none", BOTTLE_SOURCE)


def equivalents(carbon_g: float, water_l: float, it_energy_j: float) -> list[Equivalent]:
    """Carbon as a distance driven, water as showers, bottles, teaspoons or drops, energy as water
    boiled; each in the unit that keeps its number readable (km down to µm, L down to µL)."""
    boiled_l = it_energy_j / KETTLE_J
    return [
        Equivalent("carbon", f"driving {_distance(carbon_g / CAR_G_PER_KM)} in an average new car",
                   CAR_SOURCE),
        _water(water_l),
        Equivalent("energy", f"boiling {units.water(boiled_l) if boiled_l else '0 L'} of water in a kettle",
                   KETTLE_SOURCE),
    ]
