"""Human formatting of quantities with their units (J, Wh, gCO2e, L), for reports and the TUI."""

from __future__ import annotations


def _scaled(value: float, steps: list[tuple[float, str]], digits: int = 3) -> str:
    for factor, unit in steps:
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {unit}"
    factor, unit = steps[-1]
    return f"{value / factor:.{digits}g} {unit}" if value else f"0 {steps[-1][1]}"


def energy(j: float) -> str:
    """Joules up to a few kJ, then watt-hours, which is what people compare with."""
    if abs(j) < 3600:
        return _scaled(j, [(1e3, "kJ"), (1, "J"), (1e-3, "mJ")])
    return _scaled(j / 3600, [(1e9, "GWh"), (1e6, "MWh"), (1e3, "kWh"), (1, "Wh")])


def carbon(g: float) -> str:
    return _scaled(g, [(1e6, "tCO2e"), (1e3, "kgCO2e"), (1, "gCO2e"), (1e-3, "mgCO2e"),
                       (1e-6, "µgCO2e")])


def water(litres: float) -> str:
    return _scaled(litres, [(1e3, "m³"), (1, "L"), (1e-3, "mL"), (1e-6, "µL")])


def power(w: float) -> str:
    return _scaled(w, [(1e6, "MW"), (1e3, "kW"), (1, "W"), (1e-3, "mW")])


def duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
    d, h = divmod(h, 24)
    return f"{d}d {h}:{m:02d}:{sec:02d}"
