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

DECISIONS_PATH = "/api/v1/decisions"
OUTCOMES = ("pending", "submitted", "refused", "no_cluster", "failed", "unknown")

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


class DecisionInvalid(ValueError):
    pass


def validate(obj) -> dict:
    """The decision as a row to store; DecisionInvalid says what is wrong (for a 400)."""
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
        row[name] = v
    if not row["token"] or len(row["token"]) > 200:
        raise DecisionInvalid("token: expected 1 to 200 characters")
    if not row["user"]:
        raise DecisionInvalid("user: empty")
    if row["outcome"] not in OUTCOMES:
        raise DecisionInvalid(f"outcome: expected one of {', '.join(OUTCOMES)}")
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


def for_job(db: sqlite3.Connection, cluster: str, job_id: str) -> dict | None:
    """The latest decision that submitted cluster/job_id, decoded; None when the ledger has none
    (or no decisions table)."""
    try:
        r = db.execute("SELECT * FROM decisions WHERE cluster = ? AND job_id = ? ORDER BY t DESC, id DESC "
                       "LIMIT 1", (cluster, job_id)).fetchone()
    except sqlite3.OperationalError:  # a ledger older than migration 3, read-only
        return None
    return decode(r) if r else None


# A decision "overflowed" when it was submitted to a cluster whose tier differs from that of a
# candidate the overflow rule held back (rejected_by = 'overflow', or 'overflow' among held_by):
# the preferred tier was too busy and the job went to another tier. When the overflow rule was
# relaxed (nothing else could take the job) the job stays in the preferred tier: not an overflow.
OVERFLOW_SQL = """
SELECT COUNT(*) FROM decisions d
WHERE d.outcome = 'submitted' AND d.tier IS NOT NULL AND json_valid(d.decision) AND EXISTS (
    SELECT 1 FROM json_each(d.decision, '$.candidates') c
    WHERE json_extract(c.value, '$.tier') != d.tier
      AND (json_extract(c.value, '$.rejected_by') = 'overflow'
           OR EXISTS (SELECT 1 FROM json_each(c.value, '$.held_by') h WHERE h.value = 'overflow')))
"""

COUNTS_SQL = """
SELECT COALESCE(cluster, ''), COALESCE(tier, ''), outcome, COUNT(*) FROM decisions
GROUP BY 1, 2, 3
"""


def aggregates(db: sqlite3.Connection) -> tuple[list[tuple[str, str, str, int]], int]:
    """([(cluster, tier, outcome, decisions)], overflowed decisions); empty without the table."""
    try:
        counts = [tuple(r) for r in db.execute(COUNTS_SQL)]
        overflow = db.execute(OVERFLOW_SQL).fetchone()[0]
    except sqlite3.OperationalError:
        return [], 0
    return counts, overflow


def post(body: bytes, caller, headers, ledger, lock, *, token_only: bytes | None = None,
         after=None) -> tuple[int, str, bytes]:
    """POST /api/v1/decisions, shared by the node daemon and the controller (token_only: the
    site token, which the controller requires). On a node the caller's identity (SO_PEERCRED)
    must be the decision's user, unless the caller is an admin; a TCP caller has none. after(db,
    decision id) runs in the storing transaction (the node's outbox)."""
    from .api import ApiError, bearer_ok

    if token_only is not None:
        if not bearer_ok(headers, token_only):
            raise ApiError(401, "decisions are taken from agents presenting the site token")
    elif caller.uid is None and not caller.admin:
        raise ApiError(403, "decisions are taken on the unix socket, where greend knows who asks")
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json":
        raise ApiError(415, f"Content-Type {ctype!r}: expected application/json")
    try:
        obj = json.loads(body or b"null")
    except ValueError as e:
        raise ApiError(400, f"not JSON: {e}") from None
    try:
        row = validate(obj)
    except DecisionInvalid as e:
        raise ApiError(400, f"invalid decision: {e}") from None
    if token_only is None and not caller.admin and (row["user"] != caller.user or row["uid"] != caller.uid):
        raise ApiError(403, f"you ({caller.user}, uid {caller.uid}) may only record your own decisions, "
                            f"not {row['user']}'s (uid {row['uid']})")
    with lock, ledger.transaction() as db:
        stored, ident = store(db, row)
        if stored and after is not None:
            after(db, ident)
    if not stored:
        raise ApiError(409, f"token {row['token']!r} is another user's decision")
    return 200, "application/json", (json.dumps({"id": ident, "token": row["token"]}) + "\n").encode()


def report(socket_path, row: dict, timeout: float = 5.0) -> tuple[bool, str]:
    """POST a decision row (as DecisionLog.get returns it) to a greend daemon's unix socket:
    (stored, why not)."""
    import http.client
    import socket

    body = dict(row)
    body.pop("id", None)
    for k in ("decision", "tried"):
        if isinstance(body.get(k), str):
            body[k] = json.loads(body[k])
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.sock = sock
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        conn.request("POST", DECISIONS_PATH, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    except OSError as e:
        return False, e.strerror or str(e)
    except http.client.HTTPException as e:
        return False, f"bad answer: {e}"
    finally:
        conn.close()
    if r.status == 200:
        return True, ""
    try:
        msg = json.loads(data).get("error") or ""
    except (ValueError, AttributeError):
        msg = data[:200].decode(errors="replace")
    return False, f"HTTP {r.status}: {msg}"
