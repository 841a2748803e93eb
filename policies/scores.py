"""Score rules: each ranks the clusters left by the filters (Score: raw value, reason, numbers); the
rule normalises raw values to 0-100 and the engine sums them, weighted by the configuration."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from greend import quantities as q

from .rule import LowerIsBetter, Params, Score, ScoreRule, _dur


class TierPreferenceParams(Params):
    tiers: dict[str, float] = Field(default_factory=lambda: {"site": 1.0, "national": 0.6, "local": 0.3})
    """Preference of each tier, 0-1 ("priorité au site, débordement au national")."""

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v):
        for k, x in v.items():
            if k not in ("local", "site", "national"):
                raise ValueError(f"unknown tier {k!r}: expected local, site, national")
            if not 0 <= x <= 1:
                raise ValueError(f"tier {k}: expected a preference between 0 and 1, got {x}")
        return v


class TierPreference(ScoreRule):
    name = "tier_preference"
    Params = TierPreferenceParams
    default_weight = 4.0

    def score(self, ctx, cand):
        tier = cand.cluster.tier
        v = self.params.tiers.get(tier, 0.0)
        return Score(100.0 * v, lambda: f"tier {tier}: preference {v:g}", {"preference": v})


class CarbonScore(LowerIsBetter):
    name = "carbon"

    def score(self, ctx, cand):
        e = ctx.estimate(cand)
        ci = e.factors.carbon_intensity_g_per_kwh
        return Score(e.carbon_g, lambda: f"{e.carbon_g:.4g} g CO2e at {ci:.4g} g/kWh, PUE {e.factors.pue:g}",
                     {"carbon_g": e.carbon_g, "carbon_intensity_g_per_kwh": ci})


class WaterScore(LowerIsBetter):
    name = "water"

    def score(self, ctx, cand):
        e = ctx.estimate(cand)
        f = e.footprint
        return Score(f.water_l, lambda: (f"{f.water_l:.4g} L ({f.water_site_l:.3g} on site + "
                                   f"{f.water_offsite_l:.3g} off site)"), {"water_l": f.water_l})


class EnergyScore(LowerIsBetter):
    name = "energy"

    def score(self, ctx, cand):
        e = ctx.estimate(cand)
        kwh = e.footprint.facility_energy_j / 3.6e6
        return Score(kwh, lambda: f"{kwh:.4g} kWh facility energy", {"energy_kwh": kwh})


class WaitParams(Params):
    half_score_wait: Any = "1h"
    """The wait that scores 50 (score = 100 x h / (h + wait))."""

    _v = field_validator("half_score_wait")(classmethod(lambda cls, v: _dur(v)))


class ExpectedWait(ScoreRule):
    name = "expected_wait"
    Params = WaitParams
    default_weight = 2.0

    def setup(self, site):
        self.h = float(q.parse_duration(self.params.half_score_wait) or 3600)

    def score(self, ctx, cand):
        w = ctx.wait(cand)
        if w is None:
            return Score(None, f"unknown ({ctx.state_note})", {})
        if w.seconds == float("inf"):
            return Score(w.seconds, w.reason, {"expected_wait_s": None})
        return Score(w.seconds, lambda: f"{q.human_duration(w.seconds)}: {w.reason}",
                     {"expected_wait_s": w.seconds})

    def normalize(self, raws):
        h = self.h
        return [50.0 if r is None else (0.0 if r == float("inf") else 100.0 * h / (h + r)) for r in raws]


class DataLocality(ScoreRule):
    name = "data_locality"

    def score(self, ctx, cand):
        want = ctx.request.data_stores
        if not want:
            return Score(100.0, "no data stores declared", {})
        have = [d for d in want if d in cand.cluster.data_stores]
        missing = [d for d in want if d not in cand.cluster.data_stores]
        frac = len(have) / len(want)
        reason = f"{len(have)}/{len(want)} data stores local" + (f" (to move: {', '.join(missing)})"
                                                                if missing else "")
        return Score(100.0 * frac, reason, {"local_stores": have, "missing_stores": missing})
