"""The footprint model: IT energy -> facility energy, carbon and water (docs/methodology.md §3-4).

Pure functions over explicit factors, so each figure can be checked against published numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

J_PER_KWH = 3.6e6
UJ_PER_J = 1_000_000


@dataclass(frozen=True, slots=True)
class Factors:
    """The factors in force for one cluster over one interval, each with its source."""

    pue: float
    wue_site_l_per_kwh: float
    ewif_l_per_kwh: float
    carbon_intensity_g_per_kwh: float
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def key(self) -> str:
        """A stable identity for the ledger: same values and sources -> same key."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        import hashlib  # (when a key is made: not by every reader's start)

        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Footprint:
    it_energy_j: float
    facility_energy_j: float
    carbon_g: float
    water_site_l: float
    water_offsite_l: float

    @property
    def water_l(self) -> float:
        return self.water_site_l + self.water_offsite_l

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(
            self.it_energy_j + other.it_energy_j,
            self.facility_energy_j + other.facility_energy_j,
            self.carbon_g + other.carbon_g,
            self.water_site_l + other.water_site_l,
            self.water_offsite_l + other.water_offsite_l,
        )


ZERO = Footprint(0.0, 0.0, 0.0, 0.0, 0.0)


def facility_energy_j(it_energy_j: float, f: Factors) -> float:
    return it_energy_j * f.pue


def carbon_g(it_energy_j: float, f: Factors) -> float:
    """C = E_IT x PUE x CI (location-based)."""
    return it_energy_j / J_PER_KWH * f.pue * f.carbon_intensity_g_per_kwh


def water_site_l(it_energy_j: float, f: Factors) -> float:
    """On-site (scope-1) cooling water: WUE applies to IT energy, not facility energy (Li et al.)."""
    return it_energy_j / J_PER_KWH * f.wue_site_l_per_kwh


def water_offsite_l(it_energy_j: float, f: Factors) -> float:
    """Off-site (scope-2) water of the electricity: all facility energy is generated somewhere."""
    return it_energy_j / J_PER_KWH * f.pue * f.ewif_l_per_kwh


def footprint(it_energy_j: float, f: Factors) -> Footprint:
    return Footprint(
        it_energy_j=it_energy_j,
        facility_energy_j=facility_energy_j(it_energy_j, f),
        carbon_g=carbon_g(it_energy_j, f),
        water_site_l=water_site_l(it_energy_j, f),
        water_offsite_l=water_offsite_l(it_energy_j, f),
    )
