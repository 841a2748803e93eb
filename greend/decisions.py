"""Routing decisions in a ledger (the `decisions` table, ledger migration 3): validation of a
decision posted to /api/v1/decisions, storage (idempotent by token), reading for the API and the
aggregates behind the greend_route_* metrics.

A decision as posted is the row `greend submit` writes (policies/submit.py DecisionLog) with
`decision` and `tried` as JSON values rather than text.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import deque

from .errors import GreendError
from .http import ApiError, bearer_ok, dumps, parse_json
from .httpclient import unix_request

DECISIONS_PATH = "/api/v1/decisions"
OUTCOMES = ("pending", "submitted", "refused", "no_cluster", "failed", "unknown")
TIERS = ("local", "site", "national")
FUTURE_SLACK_S = 300.0  # a decision's t may run ahead of the server's clock by this much, no more
MAX_CLUSTER_LABELS = 64  # distinct cluster label values of greend_route_decisions_total
_I64 = 2**63 - 1
# Integer columns with a range narrower than SQLite's 64 bits.
_RANGES = {"uid": (0, 2**32 - 1), "nice": (-2147483645, 2147483645)}
_TEXT_MAX = 4096  # any text column but script (a path) and job_id

# column -> (accepted JSON types, required)
_TEXT = (str,)
_OPT_TEXT = (str, type(None))
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
FIELDS: dict[str, tuple[tuple, bool]] = {
    "token": (_TEXT, True), "t": (_NUM, True), "user": (_TEXT, True), "uid": ((int,), True),
    "outcome": (_TEXT, True), "decision": ((dict,), True),
    "script": (_OPT_TEXT, False), "job_name": (_TEXT, False), "account": (_TEXT, False),
    "cluster": (_OPT_TEXT, False), "tier": (_OPT_TEXT, False), "partition": (_OPT_TEXT, False),
    "job_id": (_OPT_TEXT, False), "begin": (_OPT_NUM, False), "nice": ((int, type(None)), False),
    "energy_j": (_OPT_NUM, False), "carbon_g": (_OPT_NUM, False), "water_l": (_OPT_NUM, False),
    "tried": ((list,), False),
}
_COLS = list(FIELDS)


class DecisionInvalid(GreendError, ValueError):
    """A decision that cannot be stored; the message names the field."""


def _utf8(name: str, v) -> None:
    """Strings SQLite can store: no lone UTF-16 surrogates (JSON allows "\\ud800")."""
    try:
        (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)).encode("utf-8")
    except UnicodeEncodeError:
        raise DecisionInvalid(f"{name}: contains a lone UTF-16 surrogate (not valid Unicode)") from None


def validate(obj, now: float | None = None) -> dict:
    """The decision as a row to store; DecisionInvalid says what is wrong (for a 400). `t` may
    not be later than now + FUTURE_SLACK_S (now: the server's clock)."""
    if not isinstance(obj, dict):
        raise DecisionInvalid("expected a JSON object (a decision)")
    unknown = sorted(set(obj) - set(FIELDS) - {"id"})
    if unknown:
        raise DecisionInvalid(f"unknown field(s): {', '.join(unknown)}")
    row = {}
    for name, (types, required) in FIELDS.items():
        if name not in obj:
            if required:
                raise DecisionInvalid(f"{name}: missing")
            row[name] = {"job_name": "", "account": "", "tried": []}.get(name)
            continue
        v = obj[name]
        if isinstance(v, bool) or not isinstance(v, types):
            raise DecisionInvalid(f"{name}: expected {' or '.join(t.__name__ for t in types)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise DecisionInvalid(f"{name}: expected a finite number")
        if isinstance(v, int):
            lo, hi = _RANGES.get(name, (-_I64, _I64))
            if not lo <= v <= hi:
                raise DecisionInvalid(f"{name}: expected an integer in {lo}..{hi}")
        if isinstance(v, float) and abs(v) > 1e300:
            raise DecisionInvalid(f"{name}: expected a number below 1e300")
        if isinstance(v, str) and len(v) > _TEXT_MAX:
            raise DecisionInvalid(f"{name}: over {_TEXT_MAX} characters")
        if isinstance(v, str | dict | list):
            _utf8(name, v)
        row[name] = v
    if not row["token"] or len(row["token"]) > 200:
        raise DecisionInvalid("token: expected 1 to 200 characters")
    if not row["user"]:
        raise DecisionInvalid("user: empty")
    if row["outcome"] not in OUTCOMES:
        raise DecisionInvalid(f"outcome: expected one of {', '.join(OUTCOMES)}")
    if row["tier"] is not None and row["tier"] not in TIERS:
        raise DecisionInvalid(f"tier: expected one of {', '.join(TIERS)}")
    now = time.time() if now is None else now
    if not 0 < row["t"] <= now + FUTURE_SLACK_S:
        raise DecisionInvalid(f"t: expected a Unix time in seconds no later than the server's clock "
                              f"(now {now:.0f}) + {FUTURE_SLACK_S:g} s")
    row["decision"] = json.dumps(row["decision"], separators=(",", ":"))
    row["tried"] = json.dumps(row["tried"], separators=(",", ":"))
    return row


def store(db: sqlite3.Connection, row: dict) -> tuple[bool, int | None]:
    """Insert, or update the row with the same token (the same decision posted again, or its
    final outcome after a pending one) when it is the same user's. (stored, decision id); stored
    is False when another user's decision holds the token."""
    cols = ", ".join(_COLS)
    marks = ", ".join(f":{c}" for c in _COLS)
    sets = ", ".join(f"{c} = excluded.{c}" for c in _COLS if c not in ("token", "user", "uid"))
    r = db.execute(
        f"INSERT INTO decisions ({cols}) VALUES ({marks}) ON CONFLICT (token) DO UPDATE SET {sets} "
        "WHERE decisions.user = excluded.user RETURNING id", row).fetchone()
    return (True, r[0]) if r else (False, None)


def decode(row) -> dict:
    d = dict(row)
    for k in ("decision", "tried"):
        try:
            d[k] = json.loads(d[k]) if d.get(k) else d.get(k)
        except ValueError:
            pass
    return d


def for_job(db: sqlite3.Connection, cluster: str, job_id: str,
            users: set[str] | None = None) -> dict | None:
    """The latest decision that submitted cluster/job_id, decoded; None when the ledger has none
    (or no decisions table). With `users` (the job's owners, from its records), only a decision
    one of them made: another user's decision naming this job id never attaches to it."""
    sql = "SELECT * FROM decisions WHERE cluster = ? AND job_id = ?"
    args: list = [cluster, job_id]
    if users is not None:
        sql += f" AND user IN ({','.join('?' * len(users))})"
        args += sorted(users)
    try:
        r = db.execute(sql + " ORDER BY t DESC, id DESC LIMIT 1", args).fetchone()
    except sqlite3.OperationalError:  # a ledger older than migration 3, read-only
        return None
    return decode(r) if r else None


def job_owners(db: sqlite3.Connection, cluster: str | None, job_id: str | None) -> set[str]:
    """The users whose records in this ledger carry cluster/job_id (empty: none yet)."""
    if not cluster or not job_id:
        return set()
    return {r[0] for r in db.execute("SELECT DISTINCT user FROM jobs WHERE cluster = ? AND job_id = ?",
                                     (cluster, job_id))}


# A decision "overflowed" when it was submitted to a cluster whose tier differs from that of a
# candidate the overflow rule held back (rejected_by = 'overflow', or 'overflow' among held_by):
# the preferred tier was too busy and the job went to another tier. When the overflow rule was
# relaxed (nothing else could take the job) the job stays in the preferred tier: not an overflow.
OVERFLOW_SQL = {
    "sqlite": """
SELECT COUNT(*) FROM decisions d
WHERE d.outcome = 'submitted' AND d.tier IS NOT NULL AND json_valid(d.decision) AND EXISTS (
    SELECT 1 FROM json_each(d.decision, '$.candidates') c
    WHERE json_extract(c.value, '$.tier') != d.tier
      AND (json_extract(c.value, '$.rejected_by') = 'overflow'
           OR EXISTS (SELECT 1 FROM json_each(c.value, '$.held_by') h WHERE h.value = 'overflow')))
""",
    # The decision column is text holding a JSON object (validate() makes sure); candidates or
    # held_by that are not arrays hold no overflow, as json_each finds none in SQLite. No "?" here:
    # the server reader turns each into a parameter (so jsonb's ? operator is written @>).
    "postgresql": """
SELECT COUNT(*) FROM decisions d
WHERE d.outcome = 'submitted' AND d.tier IS NOT NULL AND EXISTS (
    SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(d.decision::jsonb -> 'candidates')
                                            = 'array' THEN d.decision::jsonb -> 'candidates'
                                            ELSE '[]'::jsonb END) c
    WHERE c ->> 'tier' != d.tier
      AND (c ->> 'rejected_by' = 'overflow'
           OR (jsonb_typeof(c -> 'held_by') = 'array' AND c -> 'held_by' @> '["overflow"]'::jsonb)))
""",
    # MariaDB and MySQL (10.6+, 8.0+): JSON_TABLE, a row per candidate and entry of its held_by
    # (one with a NULL entry where held_by is empty or not an array).
    "mysql": """
SELECT COUNT(*) FROM decisions d
WHERE d.outcome = 'submitted' AND d.tier IS NOT NULL AND json_valid(d.decision) AND EXISTS (
    SELECT 1 FROM JSON_TABLE(d.decision, '$.candidates[*]' COLUMNS (
        tier VARCHAR(255) PATH '$.tier',
        rejected_by VARCHAR(255) PATH '$.rejected_by',
        NESTED PATH '$.held_by[*]' COLUMNS (held VARCHAR(255) PATH '$'))) c
    WHERE c.tier != d.tier AND (c.rejected_by = 'overflow' OR c.held = 'overflow'))
""",
}

COUNTS_SQL = """
SELECT COALESCE(cluster, ''), COALESCE(tier, ''), outcome, COUNT(*) FROM decisions
GROUP BY 1, 2, 3
"""


def aggregates(db) -> tuple[list[tuple[str, str, str, int]], int]:
    """([(cluster, tier, outcome, decisions)], overflowed decisions); empty without the table.
    `db` is a SQLite ledger or a server's reader (greend.sitedb.ServerReader: its `dialect` picks
    OVERFLOW_SQL's entry; COUNTS_SQL is the same on every engine).
    Label values are bounded whatever was stored: tiers and outcomes outside the known ones, and
    clusters beyond the MAX_CLUSTER_LABELS with most decisions, are counted as "other"."""
    try:
        rows = [tuple(r) for r in db.execute(COUNTS_SQL)]
        overflow = int(db.execute(OVERFLOW_SQL[getattr(db, "dialect", "sqlite")]).fetchone()[0])
    except sqlite3.OperationalError:
        return [], 0
    per_cluster: dict[str, int] = {}
    for cluster, _, _, n in rows:
        per_cluster[cluster] = per_cluster.get(cluster, 0) + n
    keep = set(sorted(per_cluster, key=lambda c: (-per_cluster[c], c))[:MAX_CLUSTER_LABELS])
    folded: dict[tuple[str, str, str], int] = {}
    for cluster, tier, outcome, n in rows:
        n = int(n)
        key = (cluster if cluster in keep else "other", tier if tier in ("", *TIERS) else "other",
               outcome if outcome in OUTCOMES else "other")
        folded[key] = folded.get(key, 0) + n
    return [(*k, n) for k, n in sorted(folded.items())], overflow


class RateLimit:
    """At most `per_minute` decisions per user in any 60 s (a sliding window, in memory)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.seen: dict[str, deque] = {}
        self.lock = threading.Lock()

    def allow(self, user: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self.lock:
            q = self.seen.setdefault(user, deque())
            while q and now - q[0] >= 60:
                q.popleft()
            if len(q) >= self.per_minute:
                return False
            q.append(now)
            if len(self.seen) > 10000:  # forget users with an empty window
                for u in [u for u, d in self.seen.items() if not d]:
                    del self.seen[u]
            return True


def post(body: bytes, caller, headers, ledger, lock, *, token_only: bytes | None = None,
         after=None, max_bytes: int | None = None, rate: RateLimit | None = None,
         clusters: set[str] | None = None) -> tuple[int, str, bytes]:
    """POST /api/v1/decisions, shared by the node daemon and the controller (token_only: the
    site token, which the controller requires). On a node the caller's identity (SO_PEERCRED)
    must be the decision's user, and the job it names must be the caller's, unless the caller is
    an admin; a TCP caller has none. Quotas: max_bytes per decision, `rate` per user, and a
    cluster among `clusters` (the configured ones). after(db, decision id) runs in the storing
    transaction (the node's outbox)."""
    if token_only is not None:
        if not bearer_ok(headers, token_only):
            raise ApiError(401, "decisions are taken from agents presenting the site token")
    elif caller.uid is None and not caller.admin:
        raise ApiError(403, "decisions are taken on the unix socket, where greend knows who asks")
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json":
        raise ApiError(415, f"Content-Type {ctype!r}: expected application/json")
    if max_bytes is not None and len(body) > max_bytes:
        raise ApiError(413, f"a decision is at most {max_bytes} bytes (daemon.decision_max_bytes); "
                            f"this one is {len(body)}")
    obj = parse_json(body or b"null", "decision")
    try:
        row = validate(obj)
    except DecisionInvalid as e:
        raise ApiError(400, f"invalid decision: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid decision: nested too deeply") from None
    if clusters is not None and row["cluster"] is not None and row["cluster"] not in clusters:
        raise ApiError(400, f"invalid decision: cluster: {row['cluster'][:100]!r} is not a configured "
                            f"cluster ({', '.join(sorted(clusters))})")
    if token_only is None and not caller.admin:
        if row["user"] != caller.user or row["uid"] != caller.uid:
            raise ApiError(403, f"you ({caller.user}, uid {caller.uid}) may only record your own "
                                f"decisions, not {row['user']}'s (uid {row['uid']})")
        if rate is not None and not rate.allow(caller.user):
            raise ApiError(429, f"over {rate.per_minute} decisions a minute from {caller.user} "
                                "(daemon.decisions_per_minute): retry later")
    with lock, ledger.transaction() as db:
        if token_only is None and not caller.admin:
            others = job_owners(db, row["cluster"], row["job_id"]) - {caller.user}
            if others:
                raise ApiError(403, f"job {row['cluster']}/{row['job_id']} is not yours: a decision "
                                    "may only name a job of its own user")
        stored, ident = store(db, row)
        if stored and after is not None:
            after(db, ident)
    if not stored:
        raise ApiError(409, f"token {row['token']!r} is another user's decision")
    return 200, "application/json", dumps({"id": ident, "token": row["token"]})


def report(socket_path, row: dict, timeout: float = 5.0) -> tuple[bool, str]:
    """POST a decision row (as DecisionLog.get returns it) to a greend daemon's unix socket:
    (stored, why not). A refused or would-block connect is retried for up to `timeout`."""
    import http.client

    body = dict(row)
    body.pop("id", None)
    for k in ("decision", "tried"):
        if isinstance(body.get(k), str):
            body[k] = json.loads(body[k])
    try:
        status, data = unix_request(socket_path, "POST", DECISIONS_PATH, json.dumps(body).encode(),
                                    {"Content-Type": "application/json"}, timeout=timeout)
    except OSError as e:
        return False, e.strerror or str(e)
    except http.client.HTTPException as e:
        return False, f"bad answer: {e}"
    if status == 200:
        return True, ""
    try:
        msg = json.loads(data).get("error") or ""
    except (ValueError, AttributeError):
        msg = data[:200].decode(errors="replace")
    return False, f"HTTP {status}: {msg}"
