"""Human formatting of quantities with their units (J, Wh, gCO2e, L, bytes, durations): the one
formatter of the project; reports, `greend jobs`, policies and the TUI all call it."""

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
        return _scaled(j, [(1e3, "kJ"), (1, "J"), (1e-3, "mJ"), (1e-6, "µJ")])
    return energy_wh(j)


def energy_wh(j: float) -> str:
    """Energy in watt-hours at every scale (µWh to GWh)."""
    return _scaled(j / 3600, [(1e9, "GWh"), (1e6, "MWh"), (1e3, "kWh"), (1, "Wh"), (1e-3, "mWh"),
                              (1e-6, "µWh")])


def carbon(g: float, unit: bool = True) -> str:
    """Grams of CO2e; unit=False leaves 'CO2e' out where a column header already says it."""
    s = _scaled(g, [(1e6, "tCO2e"), (1e3, "kgCO2e"), (1, "gCO2e"), (1e-3, "mgCO2e"),
                    (1e-6, "µgCO2e"), (1e-9, "ngCO2e")])
    return s if unit else s.replace("CO2e", "")


def water(litres: float) -> str:
    return _scaled(litres, [(1e3, "m³"), (1, "L"), (1e-3, "mL"), (1e-6, "µL"), (1e-9, "nL")])


def power(w: float) -> str:
    return _scaled(w, [(1e6, "MW"), (1e3, "kW"), (1, "W"), (1e-3, "mW")])


def size(b: float | None, missing: str = "—") -> str:
    """Bytes in binary units: '512 MiB', '1.5 GiB', '24 GiB'."""
    if not b:
        return missing
    if b >= 10 * 2**30:
        return f"{b / 2**30:.0f} GiB"
    if b >= 2**30:
        return f"{b / 2**30:.1f} GiB"
    return f"{b / 2**20:.0f} MiB"


def size_mb(mb: float) -> str:
    """A size given in MB (Slurm's --mem unit) as Slurm writes one: '512 MB', '1.5 GB', '2.0 TB'."""
    if mb >= 1024 * 1024:
        return f"{mb / 1024 / 1024:.1f} TB"
    if mb >= 1024:
        return f"{mb / 1024:.1f} GB"
    return f"{mb:.0f} MB"


def duration(s: float) -> str:
    """A measured duration: '2.5 s' under a minute, then 'M:SS', 'H:MM:SS', 'Nd H:MM:SS'."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
    d, h = divmod(h, 24)
    return f"{d}d {h}:{m:02d}:{sec:02d}"


def duration_words(seconds: float) -> str:
    """A rough duration for estimates and advice: '45 s', '12 min', '3.5 h', '2.0 d'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def percent(x: float | None, missing: str = "—") -> str:
    if x is None:
        return missing
    return f"{x:.0%}" if x >= 0.01 or x == 0 else "< 1%"
