"""Adjust rules: act on the plan for the chosen cluster (budget actions, carbon-aware --begin,
right-sizing advice), each step an Action (verdict, reason, numbers)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from greend import quantities as q
from greend.budgets import period_start

from .rule import Action, AdjustRule, Params


class BudgetRule(AdjustRule):
    """Per-project budgets of [[policy.budgets]]: usage this period from the ledger (+ this job)."""

    name = "budget"

    def setup(self, site):
        self.budgets = list(site.config.policy.budgets)

    def adjust(self, ctx, cand, plan):
        acct = ctx.request.account
        mine = [b for b in self.budgets if b.account == acct] if acct else []
        if not mine:
            who = f"account {acct}" if acct else "a job without --account"
            return [Action.skip("no budget for " + who)]
        out = []
        est = ctx.estimate(cand)
        for b in mine:
            start, end = period_start(b.period, ctx.now)
            use = ctx.usage(b.account, start)
            if use is None:
                out.append(Action.skip(f"budget {b.account}/{b.period}: usage unknown ({ctx.ledger_note})"))
                continue
            job_kwh = est.footprint.facility_energy_j / 3.6e6 if b.include_estimate else 0.0
            job_kg = est.footprint.carbon_g / 1000 if b.include_estimate else 0.0
            job_l = est.footprint.water_l if b.include_estimate else 0.0
            checks = []
            nums: dict[str, Any] = {"period": b.period, "period_start": q.iso(start), "jobs": use.jobs}
            for label, used, job, limit, unit in (
                ("energy", use.facility_energy_j / 3.6e6, job_kwh, b.energy_kwh, "kWh"),
                ("carbon", use.carbon_g / 1000, job_kg, b.carbon_kg, "kg CO2e"),
                ("water", use.water_l, job_l, b.water_l, "L"),
            ):
                if limit is None:
                    continue
                nums[f"{label}_used"] = round(used, 4)
                nums[f"{label}_job"] = round(job, 4)
                nums[f"{label}_limit"] = limit
                if used + job > limit:
                    checks.append(f"{label} {used:.4g} {unit} used + {job:.3g} this job > {limit:g} {unit}")
            if not checks:
                out.append(Action.ok(f"budget {b.account}/{b.period}: within limits", nums))
                continue
            what = f"budget {b.account}/{b.period} exceeded: " + "; ".join(checks)
            if b.action == "warn":
                plan.warnings.append(what)
                out.append(Action.warn(what, nums))
            elif b.action == "nice":
                plan.nice = max(plan.nice or 0, b.nice)
                out.append(Action.nice(f"{what}: priority lowered (--nice={b.nice})", nums))
            elif b.action == "defer":
                r = ctx.request
                if r.deadline is not None and end + plan.walltime_s > r.deadline:
                    plan.refused = (f"{what}; deferring to the next period ({q.iso(end)}) would miss the "
                                    f"deadline {q.iso(r.deadline)}")
                    out.append(Action.refuse(plan.refused, nums))
                else:
                    plan.not_before = max(plan.not_before or 0.0, end)
                    plan.begin = max(plan.begin or 0.0, end)
                    nums["begin"] = q.iso(end)
                    out.append(Action.defer(
                        f"{what}: deferred to the next period (--begin {q.iso(end)})", nums))
            else:
                plan.refused = what
                out.append(Action.refuse(f"{what}: not submitted", nums))
        return out


class DeferralParams(Params):
    min_saving_pct: float = Field(default=5.0, ge=0, le=100)
    """Defer only when the best window saves at least this much carbon intensity."""


class CarbonDeferral(AdjustRule):
    """A deferrable job with a deadline starts (--begin) in the lowest-carbon window that still ends
    by the deadline; Slurm holds it until then."""

    name = "carbon_deferral"
    Params = DeferralParams

    def adjust(self, ctx, cand, plan):
        r = ctx.request
        if not r.deferrable:
            return [Action.skip("not deferrable")]
        if r.deadline is None:
            return [Action.skip("deferrable but no deadline: not deferred")]
        c = cand.cluster
        if not c.carbon.has_series:
            return [Action.skip(f"{c.name} has a static carbon intensity ({c.carbon.source}): "
                                "no better window")]
        if plan.refused:
            return [Action.skip("job refused")]
        earliest = max(ctx.now, plan.not_before or 0.0, r.begin or 0.0)
        latest = r.deadline - plan.walltime_s
        est = ctx.estimate(cand)
        if latest < earliest:
            return [Action.warn(f"walltime {q.format_duration(plan.walltime_s)} from {q.iso(earliest)} ends "
                                f"after the deadline {q.iso(r.deadline)}: not deferred")]
        best = c.carbon.lowest(earliest, latest, est.runtime_s)
        first = c.carbon.mean(earliest, earliest + est.runtime_s)
        saving = (first - best.mean_g_per_kwh) / first * 100 if first > 0 else 0.0
        nums = {"earliest": q.iso(earliest), "latest_start": q.iso(latest), "deadline": q.iso(r.deadline),
                "mean_now_g_per_kwh": round(first, 2), "mean_best_g_per_kwh": round(best.mean_g_per_kwh, 2),
                "saving_pct": round(saving, 1), "best_start": q.iso(best.start)}
        if gap := c.carbon.coverage_note(earliest, r.deadline):  # a window the series does not see
            nums["coverage"] = gap
        if best.start <= earliest + 1 or saving < self.params.min_saving_pct:
            return [Action.ok(f"starting at {q.iso(earliest)} is within {self.params.min_saving_pct:g} "
                              f"% of the lowest-carbon window ({first:.4g} vs "
                              f"{best.mean_g_per_kwh:.4g} g/kWh)", nums)]
        plan.begin = best.start
        return [Action.defer(f"begin {q.iso(best.start)}: mean {best.mean_g_per_kwh:.4g} g/kWh instead of "
                             f"{first:.4g} now (-{saving:.0f} %), ends by "
                             f"{q.iso(best.start + plan.walltime_s)} "
                             f"<= deadline {q.iso(r.deadline)}", nums)]


class RightSizingParams(Params):
    min_jobs: int = Field(default=2, ge=1)
    cpu_below: float = Field(default=0.5, gt=0, le=1)
    mem_below: float = Field(default=0.5, gt=0, le=1)
    gpu_below: float = Field(default=0.2, gt=0, le=1)


class RightSizing(AdjustRule):
    """Advice when the user's similar jobs used far less than they asked."""

    name = "right_sizing"
    Params = RightSizingParams

    def adjust(self, ctx, cand, plan):
        h = ctx.history()
        p = self.params
        if h is None or h.n < p.min_jobs:
            n = 0 if h is None else h.n
            return [Action.skip(f"{n} similar job(s) in the ledger (needs {p.min_jobs})")]
        r = ctx.request
        res = ctx.resolved(cand)
        out = []
        if h.cpu_efficiency is not None and h.cpu_efficiency < p.cpu_below:
            used = max(h.peak_cpus_used, 1e-9)
            suggest = max(1, int(-(-used * 1.2 // 1)))
            msg = (f"your {h.n} similar '{h.name}' jobs used {h.cpu_efficiency:.0%} of their CPUs (at most "
                   f"{used:.1f} busy on average); asked {r.cpus}: about {suggest} would do")
            out.append(Action.advice(msg, {"cpu_efficiency": round(h.cpu_efficiency, 3),
                                        "suggest_cpus": suggest}))
        if h.mem_efficiency is not None and h.mem_efficiency < p.mem_below:
            suggest_mb = h.peak_mem_mb * 1.25
            msg = (f"your {h.n} similar jobs peaked at {q.format_memory(h.peak_mem_mb)} "
                   f"({h.mem_efficiency:.0%} of what they had); asking {q.format_memory(res.mem_mb)}: "
                   f"--mem={max(int(suggest_mb), 1)}M would do")
            out.append(Action.advice(msg, {"mem_efficiency": round(h.mem_efficiency, 3),
                                        "suggest_mem_mb": int(suggest_mb)}))
        if r.gpus and h.gpu_use is not None and h.gpu_use < p.gpu_below:
            msg = (f"the GPUs of your {h.n} similar jobs drew {h.gpu_use:.0%} of their TDP on average: "
                   "check that the job uses them, or ask for fewer")
            out.append(Action.advice(msg, {"gpu_use": round(h.gpu_use, 3)}))
        if not out:
            return [Action.ok(f"{h.n} similar jobs used what they asked for",
                              {"jobs": h.n, "cpu_efficiency": h.cpu_efficiency,
                               "mem_efficiency": h.mem_efficiency, "gpu_use": h.gpu_use})]
        plan.advice.extend(a.reason for a in out)
        return out
