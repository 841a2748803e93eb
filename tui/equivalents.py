"""Everyday equivalents of a job's footprint, each from a cited figure (listed in docs/tui.md)."""

from __future__ import annotations

from dataclasses import dataclass

# gCO2/km: average type-approval (WLTP) tailpipe emissions of new passenger cars registered in
# Europe in 2022, EEA indicator "CO2 performance of new passenger cars in Europe".
CAR_G_PER_KM = 108.1
CAR_SOURCE = "EEA: new cars in Europe, 2022, 108.1 gCO2/km (WLTP)"

BOTTLE_L = 0.5
BOTTLE_SOURCE = "a small bottle holds 0.5 L"

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
    if x == 0:
        return "0"
    if x < 0.01:
        return "< 0.01"
    if x < 10:
        return f"{x:.2g}"
    return f"{x:,.0f}"


def _distance(km: float) -> str:
    if km >= 1:
        return f"{_count(km)} km"
    if km >= 0.001:
        return f"{_count(km * 1000)} m"
    return f"{_count(km * 1e5)} cm"


def equivalents(carbon_g: float, water_l: float, it_energy_j: float) -> list[Equivalent]:
    out = [Equivalent("carbon", f"driving {_distance(carbon_g / CAR_G_PER_KM)} in an average new car",
                      CAR_SOURCE)]
    if water_l >= SHOWER_L / 2:
        out.append(Equivalent("water", f"{_count(water_l / SHOWER_L)} showers", SHOWER_SOURCE))
    else:
        out.append(Equivalent("water", f"{_count(water_l / BOTTLE_L)} bottles of 0.5 L", BOTTLE_SOURCE))
    out.append(Equivalent("energy", f"boiling {_count(it_energy_j / KETTLE_J)} L of water in a kettle",
                          KETTLE_SOURCE))
    return out
