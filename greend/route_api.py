"""POST /api/v1/route: the policy engine's decision for a job, answered by a running daemon or
controller from cluster state it keeps warm, so that a Slurm cli_filter can ask at every sbatch
(docs/api.md, docs/policy.md).

The core does not import the policies: the composition root (greend/daemon_cli.py) gives the
daemon and the controller a `router`, a callable taking a `RouteQuery` and returning a
`RouteAnswer`, which raises `RouteInvalid` for a job it cannot read (400) and `RouteFailed` when
it cannot decide at all (503). This module checks who asks, bounds and validates the body, and
writes the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .decisions import RateLimit
from .errors import GreendError
from .http import ApiError, bearer_ok, dumps, parse_json

ROUTE_PATH = "/api/v1/route"
MAX_BODY = 64 << 10  # a job's options and its script's directive lines; larger: 413
MAX_SCRIPT_TEXT = 32 << 10
MAX_OPTIONS = 200
_FIELDS = ("sbatch", "script", "script_text", "cli_filter", "user")


class RouteInvalid(GreendError, ValueError):
    """A job the router cannot read; the message names the option or field."""


class RouteFailed(GreendError):
    """The router cannot decide at all (configuration, ledger): the caller's job goes as asked."""


@dataclass(slots=True)
class RouteQuery:
    """One request, validated: whose job, its sbatch options (as a cli_filter's
    slurm.json_cli_options() gives them, `argv` included), its script's directive lines as text
    (never read from disk by the daemon: the caller sends them) and, for a cli_filter, the cluster
    it runs on."""

    user: str
    options: dict
    script: str | None = None
    script_text: str | None = None
    cli_filter: str | None = None


@dataclass(slots=True)
class RouteAnswer:
    """The decision as `greend route --json` prints it, and the cli_filter's key=value lines when
    the query named a cli_filter cluster."""

    decision: dict
    lines: list[str] = field(default_factory=list)


def _text(obj: dict, name: str, limit: int = 4096) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ApiError(400, f"invalid route request: {name}: expected a string")
    if len(v) > limit:
        raise ApiError(400, f"invalid route request: {name}: over {limit} characters")
    return v


def validate(obj, user: str | None) -> RouteQuery:
    """The body as a RouteQuery; ApiError 400 naming the field otherwise. `user`: the caller's
    identity (the socket's), or None when the body must name it (a site-token caller)."""
    if not isinstance(obj, dict):
        raise ApiError(400, "invalid route request: expected a JSON object with \"sbatch\" (the "
                            "job's sbatch options)")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise ApiError(400, f"invalid route request: unknown field(s): {', '.join(unknown)[:200]} "
                            f"(expected {', '.join(_FIELDS)})")
    opts = obj.get("sbatch")
    if not isinstance(opts, dict):
        raise ApiError(400, "invalid route request: sbatch: expected an object of sbatch options "
                            "(as slurm.json_cli_options() writes them)")
    if len(opts) > MAX_OPTIONS:
        raise ApiError(400, f"invalid route request: sbatch: over {MAX_OPTIONS} options")
    for k, v in opts.items():
        if len(k) > 64:
            raise ApiError(400, f"invalid route request: sbatch: option name {k[:64]!r}...: over 64 "
                                "characters")
        if k == "argv":
            if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
                raise ApiError(400, "invalid route request: sbatch.argv: expected a list of strings")
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ApiError(400, f"invalid route request: sbatch.{k}: expected a finite number")
        if not isinstance(v, str | int | float | bool | type(None)):
            raise ApiError(400, f"invalid route request: sbatch.{k}: expected a string, number, "
                                "boolean or null")
    named = _text(obj, "user", 256)
    if user is None:
        if not named:
            raise ApiError(400, "invalid route request: user: required with the site token (whose "
                                "job is it?)")
        user = named
    elif named is not None and named != user:
        raise ApiError(403, f"you ({user}) may only route your own jobs, not {named[:64]}'s")
    return RouteQuery(user=user, options=opts, script=_text(obj, "script"),
                      script_text=_text(obj, "script_text", MAX_SCRIPT_TEXT),
                      cli_filter=_text(obj, "cli_filter", 256))


def post(body: bytes, caller, headers, router, *, token: bytes | None, rate: RateLimit | None,
         max_bytes: int = MAX_BODY) -> tuple[int, str, bytes]:
    """POST /api/v1/route, shared by the node daemon and the controller. On the unix socket the
    job is the caller's (SO_PEERCRED); a TCP caller must present the site token and name the user
    in the body. Quotas: max_bytes per request, `rate` per user (admins and token callers are not
    limited). With "cli_filter" in the body the answer is text/plain key=value lines, as
    `greend route --cli-filter` prints them; otherwise the JSON of `greend route --json`."""
    token_caller = bearer_ok(headers, token)
    if caller.uid is None and not token_caller:
        raise ApiError(403, "route requests are taken on the unix socket, where greend knows who "
                            "asks, or with the site token")
    if router is None:
        raise ApiError(503, "this greend does not route jobs (no policy router was set up)")
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json":
        raise ApiError(415, f"Content-Type {ctype!r}: expected application/json")
    if len(body) > max_bytes:
        raise ApiError(413, f"a route request is at most {max_bytes} bytes; this one is {len(body)}")
    obj = parse_json(body or b"null", "route request")
    # A socket caller routes their own jobs; an admin on the socket, or a token caller, may name
    # the user.
    who = None if (token_caller and caller.uid is None) else caller.user
    if caller.admin and isinstance(obj, dict) and obj.get("user") is not None:
        who = None
    q = validate(obj, who)
    if rate is not None and not caller.admin and not token_caller and not rate.allow(q.user):
        raise ApiError(429, f"over {rate.per_minute} route requests a minute from {q.user} "
                            "(daemon.route_per_minute): retry later")
    try:
        answer = router(q)
    except RouteInvalid as e:
        raise ApiError(400, f"invalid job: {e}") from None
    except RouteFailed as e:
        raise ApiError(503, f"greend cannot route now: {e}") from None
    if q.cli_filter is not None:
        return 200, "text/plain; charset=utf-8", "".join(f"{ln}\n" for ln in answer.lines).encode()
    return 200, "application/json", dumps(answer.decision)
