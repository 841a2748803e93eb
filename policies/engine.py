"""The engine: runs the configured rules over every cluster and combines their verdicts.

Filters run in order on every cluster not yet rejected; a relaxable filter (overflow) only holds a
cluster back, and held-back clusters come back when nothing else can take the job. Score rules
rank the remaining clusters (sum of weight x 0-100 score). Adjust rules act on the chosen one. The
decision is the full list of (rule, cluster, verdict, reason, numbers): it explains itself.
"""

from __future__ import annotations

import time

from greend import quantities as q

from .estimate import Estimate, estimate
from .history import History, LedgerView, Usage
from .records import Record
from .registry import build_rules
from .request import JobRequest, Resolved, resolve
from .rule import Action, Check, Rule, Score
from .site import ClusterSpec, PartitionSpec, Site
from .state import ClusterState, StateCache, Wait


class Verdict:
    """One rule's verdict on one cluster: (rule, kind, cluster, verdict, reason, numbers).

    A rule may give its reason as a string or as a function that makes it: the text is then only
    built when someone reads it, which keeps a busy router fast without losing any explanation.
    """

    __slots__ = ("_reason", "cluster", "kind", "numbers", "rule", "verdict")

    def __init__(self, rule: str, kind: str, cluster: str | None, verdict: str, reason, numbers: dict):
        self.rule = rule
        self.kind = kind
        self.cluster = cluster
        self.verdict = verdict
        self._reason = reason
        self.numbers = numbers

    @property
    def reason(self) -> str:
        r = self._reason
        if not isinstance(r, str):
            r = self._reason = str(r())
        return r

    def __repr__(self) -> str:
        return f"Verdict({self.rule!r}, {self.cluster!r}, {self.verdict!r}, {self.reason!r})"

    def to_dict(self) -> dict:
        return {"rule": self.rule, "kind": self.kind, "cluster": self.cluster, "verdict": self.verdict,
                "reason": self.reason, "numbers": {k: _round(v) for k, v in self.numbers.items()}}


class Candidate:
    __slots__ = ("_est", "_res", "_start", "_wait", "cluster", "held", "name", "partition", "rejected",
                 "scores", "total")

    def __init__(self, cluster: ClusterSpec, partition: PartitionSpec | None):
        self.cluster = cluster
        self.name = cluster.name
        self.partition = partition
        self.rejected: Verdict | None = None
        self.held: list[Verdict] = []
        self.scores: dict[str, tuple[float | None, float, float]] = {}  # rule -> (raw, 0-100, weighted)
        self.total = 0.0
        self._res: tuple[PartitionSpec | None, Resolved] | None = None
        self._est: Estimate | None = None
        self._wait: tuple[PartitionSpec | None, Wait | None] | None = None
        self._start: float | None = None


class Context:
    """What rules may ask about the request, the clusters and the ledger (computed lazily)."""

    __slots__ = ("_history", "_history_done", "ledger", "ledger_note", "now", "request", "site",
                 "state_note", "states")

    def __init__(self, site: Site, request: JobRequest, now: float,
                 states: dict[str, ClusterState] | None, state_note: str, ledger: LedgerView | None):
        self.site = site
        self.request = request
        self.now = now
        self.states = states
        self.state_note = state_note
        self.ledger = ledger
        self.ledger_note = ledger.error if ledger is not None and ledger.error else (
            "no ledger" if ledger is None else "")
        self._history: History | None = None
        self._history_done = False

    def state(self, cand: Candidate) -> ClusterState | None:
        return None if self.states is None else self.states.get(cand.cluster.name)

    def resolved(self, cand: Candidate) -> Resolved:
        p = cand.partition
        if cand._res is None or cand._res[0] is not p:
            s = self.site.settings
            cand._res = (p, resolve(self.request, p, s.default_walltime_s, s.default_mem_per_cpu_mb,
                                    p.name if p else ""))
            cand._est = None
            cand._wait = None
        return cand._res[1]

    def wait(self, cand: Candidate) -> Wait | None:
        st = self.state(cand)
        if st is None or not st.ok:
            return None
        res = self.resolved(cand)
        if cand._wait is None or cand._wait[0] is not cand.partition:
            r = self.request
            w = st.expected_wait(r.cpus, r.nodes, res.cpus_per_node, res.mem_per_node_mb,
                                 cand.partition.name if cand.partition else None, self.now)
            cand._wait = (cand.partition, w)
        return cand._wait[1]

    def start(self, cand: Candidate) -> float:
        """When the job would start there: now (or its --begin); for a deferrable job with a deadline,
        the start of that cluster's lowest-carbon window, so that clusters compare at their best."""
        if cand._start is None:
            r = self.request
            earliest = max(self.now, r.begin or 0.0)
            start = earliest
            if r.deferrable and r.deadline is not None and cand.cluster.carbon.has_series:
                res = self.resolved(cand)
                latest = r.deadline - res.walltime_s
                if latest >= earliest:
                    start = cand.cluster.carbon.lowest(earliest, latest, res.walltime_s).start
            cand._start = start
        return cand._start

    def estimate(self, cand: Candidate) -> Estimate:
        res = self.resolved(cand)
        if cand._est is None:
            cand._est = estimate(cand.cluster, self.request, res, self.start(cand), self.history())
        return cand._est

    def history(self) -> History | None:
        if not self._history_done:
            self._history_done = True
            if self.ledger is not None:
                self._history = self.ledger.similar(self.request.user, self.request.job_name, self.now)
        return self._history

    def usage(self, account: str, since: float) -> Usage | None:
        return None if self.ledger is None else self.ledger.usage(account, since)


class Plan(Record):
    """What will be submitted where: the chosen cluster and what adjust rules added."""

    cluster: str
    tier: str
    partition: str | None
    walltime_s: int
    begin: float | None
    not_before: float | None
    nice: int | None
    refused: str | None
    warnings: list[str]
    advice: list[str]
    estimate: Estimate | None
    verdicts: list[Verdict]

    __slots__ = (
        "advice", "begin", "cluster", "estimate", "nice", "not_before", "partition", "refused", "tier",
        "verdicts", "walltime_s", "warnings",
    )

    def __init__(
        self,
        cluster: str,
        tier: str,
        partition: str | None,
        walltime_s: int,
        begin: float | None = None,
        not_before: float | None = None,
        nice: int | None = None,
        refused: str | None = None,
        warnings: list[str] | None = None,
        advice: list[str] | None = None,
        estimate: Estimate | None = None,
        verdicts: list[Verdict] | None = None,
    ):
        self.cluster = cluster
        self.tier = tier
        self.partition = partition
        self.walltime_s = walltime_s
        self.begin = begin
        self.not_before = not_before
        self.nice = nice
        self.refused = refused
        self.warnings = [] if warnings is None else warnings
        self.advice = [] if advice is None else advice
        self.estimate = estimate
        self.verdicts = [] if verdicts is None else verdicts

    def sbatch_options(self, request: JobRequest) -> list[str]:
        """Options greend adds on sbatch's command line (they override the script's directives)."""
        opts = list(request.sbatch_args)
        if self.partition:
            opts = [o for o in opts if not o.startswith("--partition=")]
            opts.append(f"--partition={self.partition}")
        if self.begin is not None and self.begin > (request.begin or 0):
            opts.append(f"--begin={q.slurm_time_point(self.begin)}")
        if self.nice is not None:
            opts.append(f"--nice={max(self.nice, request.nice or 0)}")
        return opts

    def to_dict(self, request: JobRequest) -> dict:
        return {
            "cluster": self.cluster, "tier": self.tier, "partition": self.partition,
            "begin": q.iso(self.begin), "nice": self.nice, "refused": self.refused,
            "warnings": list(self.warnings), "advice": list(self.advice),
            "sbatch_options": self.sbatch_options(request),
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


class Decision(Record):
    request: JobRequest
    now: float
    verdicts: list[Verdict]
    candidates: list[Candidate]
    ranking: list[Candidate]
    plan: Plan | None
    relaxed: list[str]
    state_note: str
    ledger_note: str
    context: Context

    __slots__ = (
        "candidates", "context", "ledger_note", "now", "plan", "ranking", "relaxed", "request", "state_note",
        "verdicts",
    )

    def __init__(
        self,
        request: JobRequest,
        now: float,
        verdicts: list[Verdict],
        candidates: list[Candidate],
        ranking: list[Candidate],
        plan: Plan | None,
        relaxed: list[str],
        state_note: str,
        ledger_note: str,
        context: Context,
    ):
        self.request = request
        self.now = now
        self.verdicts = verdicts
        self.candidates = candidates
        self.ranking = ranking
        self.plan = plan
        self.relaxed = relaxed
        self.state_note = state_note
        self.ledger_note = ledger_note
        self.context = context

    @property
    def outcome(self) -> str:
        if self.plan is None:
            return "no_cluster"
        return "refused" if self.plan.refused else "route"

    @property
    def cluster(self) -> str | None:
        return self.plan.cluster if self.plan else None

    @property
    def fallbacks(self) -> list[str]:
        return [c.name for c in self.ranking[1:]]

    def stage(self, cluster: str | None = None) -> list[dict]:
        """The job's --data stores that `cluster` (the chosen one) lacks, each with the clusters
        whose data_stores hold it: what must be staged there before the job can run."""
        name = cluster or self.cluster
        if name is None:
            return []
        site = self.context.site
        to = site.cluster(name)
        return [{"store": s, "from": [c.name for c in site.clusters if s in c.data_stores], "to": name}
                for s in self.request.data_stores if s not in to.data_stores]

    def summary(self) -> str:
        """One paragraph: where and why, and why not elsewhere."""
        if self.plan is None:
            why = "; ".join(f"{c.name}: {c.rejected.reason}" for c in self.candidates if c.rejected)
            return f"no cluster can take this job ({why})"
        best = self.ranking[0]
        where = f"{best.name}" + (f"/{self.plan.partition}" if self.plan.partition else "")
        parts = []
        if len(self.ranking) > 1:
            second = self.ranking[1]
            parts.append(f"highest score {best.total:.0f} (next: {second.name} {second.total:.0f})")
        elif best.scores:
            parts.append(f"score {best.total:.0f}, the only cluster left")
        else:
            parts.append("the only cluster left")
        for c in self.candidates:
            if c is best:
                continue
            if c.rejected is not None:
                parts.append(f"not {c.name}: {c.rejected.reason} [{c.rejected.rule}]")
            elif c.held and c not in self.ranking:
                parts.append(f"not {c.name}: {c.held[0].reason} [{c.held[0].rule}]")
        for name in self.relaxed:
            parts.append(f"{name} kept although over its overflow threshold: nothing else can take the job")
        head = "refused" if self.plan.refused else f"-> {where} (tier {self.plan.tier})"
        if self.plan.refused:
            parts.insert(0, self.plan.refused)
        if self.plan.begin is not None:
            parts.append(f"begins {q.iso(self.plan.begin)}")
        if self.plan.nice:
            parts.append(f"nice {self.plan.nice}")
        if not self.plan.refused:
            for st in self.stage():
                parts.append(f"data to stage first: {st['store']} ("
                             + (f"on {', '.join(st['from'])}" if st["from"] else "on no configured cluster")
                             + f", not on {st['to']})")
        return f"{head}: " + "; ".join(parts)

    def to_dict(self) -> dict:
        r = self.request
        cands = []
        for c in self.candidates:
            d = {
                "cluster": c.name, "tier": c.cluster.tier, "hds": c.cluster.hds,
                "transport": c.cluster.slurm.describe(),
                "partition": c.partition.name if c.partition else None,
                "eligible": c in self.ranking,
                "rejected_by": c.rejected.rule if c.rejected else None,
                "held_by": [v.rule for v in c.held],
                "score": round(c.total, 3) if c in self.ranking else None,
                "scores": {k: {"raw": _round(raw), "score": _round(s), "weighted": _round(w)}
                           for k, (raw, s, w) in c.scores.items()},
            }
            try:
                d["estimate"] = self.context.estimate(c).to_dict()
            except Exception as e:  # an estimate that cannot be made is stated, not raised
                d["estimate"] = {"error": str(e)}
            st = self.context.state(c)
            d["state"] = st.summary() if st is not None else {"ok": None, "note": self.state_note}
            w = self.context.wait(c) if st is not None and st.ok else None
            d["expected_wait_s"] = None if w is None or w.seconds == float("inf") else round(w.seconds, 1)
            cands.append(d)
        return {
            "outcome": self.outcome,
            "cluster": self.cluster,
            "summary": self.summary(),
            "decided_at": q.iso(self.now),
            "request": r.to_dict(),
            "plan": self.plan.to_dict(r) if self.plan else None,
            # How the chosen cluster is reached and why (docs/slurm.md, "Transports").
            "transport": self.context.site.cluster(self.plan.cluster).slurm.describe() if self.plan else None,
            # Data to stage first: the --data stores the chosen cluster lacks, and where each lives.
            "stage": self.stage() if self.plan and not self.plan.refused else [],
            "fallbacks": self.fallbacks,
            "relaxed": list(self.relaxed),
            "candidates": cands,
            "rules": [v.to_dict() for v in self.verdicts],
            "live_state": self.state_note or "used",
            "ledger": self.ledger_note or "used",
        }


def _round(x):
    """Numbers as JSON shows them: floats to 4 decimals, infinity as null."""
    if isinstance(x, float):
        return None if x in (float("inf"), float("-inf")) or x != x else round(x, 4)
    return x


class Engine:
    """Decides with a site's rules; give it live states (a StateCache) and a ledger to use them."""

    def __init__(self, site: Site, rules: list[Rule] | None = None, ledger: LedgerView | None = None,
                 states: StateCache | None = None, clock=time.time):
        self.site = site
        self.rules = rules if rules is not None else build_rules(site.config.policy.rules, site)
        self.filters = [r for r in self.rules if r.kind == "filter"]
        self.scorers = [r for r in self.rules if r.kind == "score"]
        self.adjusters = [r for r in self.rules if r.kind == "adjust"]
        self.ledger = ledger
        self.states = states
        self.clock = clock

    # -- deciding ---------------------------------------------------------------------------------
    def decide(self, request: JobRequest, now: float | None = None,
               states: dict[str, ClusterState] | None = None,
               only: frozenset[str] | set[str] | None = None) -> Decision:
        """Decide for one request. `only` limits the clusters considered (greend route --cluster)."""
        now = self.clock() if now is None else now
        note = ""
        if states is None:
            if self.states is not None:
                states = self.states.snapshot()
            else:
                note = "live state off"
        ctx = Context(self.site, request, now, states, note, self.ledger)
        cands = [Candidate(c, self._preferred_partition(c, request)) for c in self.site.clusters]
        verdicts: list[Verdict] = []
        if only is not None:
            for cand in cands:
                if cand.name not in only:
                    asked = ", ".join(sorted(only))
                    cand.rejected = Verdict("only", "filter", cand.name, "reject",
                                            f"not among the clusters asked for ({asked})", {})
                    verdicts.append(cand.rejected)

        add = verdicts.append
        for rule in self.filters:
            name, check = rule.name, rule.filter
            for cand in cands:
                if cand.rejected is not None:
                    continue
                res = check(ctx, cand)
                if type(res) is not Check:  # a plugin's (passes, reason, numbers): still accepted
                    res = Check(*res)
                if res.passes:
                    if res.partition is not None:
                        cand.partition = res.partition  # the partition the filter chose there
                    add(Verdict(name, "filter", cand.name, "pass", res.reason, res.numbers))
                elif rule.relaxable:
                    v = Verdict(name, "filter", cand.name, "hold", res.reason, res.numbers)
                    cand.held.append(v)
                    add(v)
                else:
                    v = Verdict(name, "filter", cand.name, "reject", res.reason, res.numbers)
                    cand.rejected = v
                    add(v)

        alive = [c for c in cands if c.rejected is None]
        feasible = [c for c in alive if not c.held]
        relaxed: list[str] = []
        if not feasible and alive:
            feasible = alive
            for c in alive:
                relaxed.append(c.name)
                verdicts.append(Verdict(c.held[0].rule, "filter", c.name, "relaxed",
                                        f"kept: no cluster without a hold can take the job, so it waits "
                                        f"here ({c.held[0].reason})", c.held[0].numbers))

        for rule in self.scorers:
            if not feasible:
                break
            raws, reasons = [], []
            for cand in feasible:
                sc = rule.score(ctx, cand)
                if type(sc) is not Score:
                    sc = Score(*sc)
                raws.append(sc.raw)
                reasons.append((sc.reason, sc.numbers))
            norm = rule.normalize(raws)
            for cand, raw, s, (reason, nums) in zip(feasible, raws, norm, reasons, strict=True):
                weighted = s * rule.weight
                cand.scores[rule.name] = (raw, s, weighted)
                cand.total += weighted
                nums = {**nums, "score": s, "weight": rule.weight, "weighted": weighted}
                verdicts.append(Verdict(rule.name, "score", cand.name, "score", reason, nums))

        ranking = sorted(feasible, key=lambda c: (-c.total, c.cluster.index))
        plan = self._plan(ctx, ranking[0], verdicts) if ranking else None
        return Decision(request, now, verdicts, cands, ranking, plan, relaxed, note, ctx.ledger_note, ctx)

    def plan_for(self, decision: Decision, cluster: str) -> Plan:
        """The plan (adjust rules applied) for another eligible cluster, e.g. when the first choice's
        controller does not answer at submission."""
        for cand in decision.ranking:
            if cand.name == cluster:
                return self._plan(decision.context, cand, decision.verdicts)
        raise KeyError(cluster)

    def _plan(self, ctx: Context, cand: Candidate, verdicts: list[Verdict]) -> Plan:
        res = ctx.resolved(cand)
        plan = Plan(cand.name, cand.cluster.tier, cand.partition.name if cand.partition else None,
                    res.walltime_s)
        for rule in self.adjusters:
            for a in rule.adjust(ctx, cand, plan):
                if type(a) is not Action:
                    a = Action(*a)
                v = Verdict(rule.name, "adjust", cand.name, a.verdict, a.reason, a.numbers)
                plan.verdicts.append(v)
                verdicts.append(v)
        est = ctx.estimate(cand)
        if plan.begin is not None and abs(plan.begin - est.start) > 1:
            est = estimate(cand.cluster, ctx.request, res, plan.begin, ctx.history())
        plan.estimate = est
        return plan

    @staticmethod
    def _preferred_partition(c: ClusterSpec, r: JobRequest) -> PartitionSpec | None:
        for name in r.partitions:
            p = c.partition(name)
            if p is not None:
                return p
        return c.default_partition
