"""A job request: what a batch script's #SBATCH and #GREEND lines and the command line ask for.

#SBATCH lines are read as sbatch reads them: from the top of the script, up to the first line that is
neither blank nor a comment. #GREEND lines, in the same header, carry greend's own options (data
class, deadline, deferrable, data stores). Options on the command line win over the script's, as
with sbatch. Every error names the file and line.
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

from greend import quantities as q

from .records import Record


class RequestError(Exception):
    """A request greend cannot read; the message names the file, line and option."""


# sbatch options greend reads. Value: (field, takes_value). Short forms map to the long name.
_SHORT = {
    "J": "job-name", "A": "account", "p": "partition", "q": "qos", "t": "time", "N": "nodes",
    "n": "ntasks", "c": "cpus-per-task", "G": "gpus", "b": "begin", "a": "array", "M": "clusters",
    "o": "output", "e": "error", "D": "chdir", "d": "dependency", "C": "constraint", "w": "nodelist",
    "x": "exclude", "i": "input", "L": "licenses", "F": "nodefile", "S": "core-spec",
    "m": "distribution", "B": "extra-node-info",
}
_SHORT_FLAGS = frozenset("HQvWhVsOkI")
_KNOWN_WITH_VALUE = frozenset({
    "job-name", "account", "partition", "qos", "time", "nodes", "ntasks", "ntasks-per-node",
    "cpus-per-task", "mem", "mem-per-cpu", "mem-per-gpu", "gres", "gpus", "gpus-per-node",
    "gpus-per-task", "begin", "deadline", "comment", "array", "clusters", "cluster",
    "output", "error", "chdir", "dependency", "constraint", "nodelist", "exclude", "input",
    "licenses", "mail-type", "mail-user", "export", "time-min", "wckey", "reservation",
    "signal", "open-mode", "cpu-freq", "gpu-bind", "gpu-freq", "tmp", "uid", "gid",
    "distribution", "mcs-label", "prefer", "cluster-constraint", "container", "nodefile",
    "core-spec", "extra-node-info", "threads-per-core", "cores-per-socket", "sockets-per-node",
    "ntasks-per-core", "ntasks-per-socket", "ntasks-per-gpu", "hint", "mem-bind", "network",
    "profile", "propagate", "power", "priority", "switches", "thread-spec", "tres-per-task",
    "delay-boot", "burst-buffer", "bb", "bbf", "acctg-freq", "batch", "wrap",
})
_GREEND_OPTIONS = ("data-class", "deadline", "deferrable", "data", "interactive", "debug")


class JobRequest(Record):
    """What a job asks for, as totals over the whole job; None means "not said" (defaults apply)."""

    job_name: str
    user: str
    account: str | None
    partitions: tuple[str, ...]
    qos: str | None
    walltime_s: int | None
    nodes: int
    ntasks: int
    cpus_per_task: int
    mem_mb: float | None
    """Total memory of the job; None: the partition's default per CPU."""
    mem_whole_node: bool
    gpus: int
    gpu_type: str | None
    array_tasks: int
    array: str | None
    """--array as given (e.g. "0-15%4"); slurmrestd takes it as the job's `array`."""
    data_class: str
    data_stores: tuple[str, ...]
    deadline: float | None
    deferrable: bool
    begin: float | None
    nice: int | None
    comment: str | None
    flags: frozenset[str]
    """interactive, debug."""
    script: Path | None
    sbatch_args: list[str]
    """Command-line options to pass on to sbatch (they override the script's, as for greend)."""
    origin: dict[str, str]
    """Where each field was set: "job.sh:4", "command line"."""
    notes: list[str]

    __slots__ = (
        "account", "array", "array_tasks", "begin", "comment", "cpus_per_task", "data_class", "data_stores",
        "deadline", "deferrable", "flags", "gpu_type", "gpus", "job_name", "mem_mb", "mem_whole_node", "nice",
        "nodes", "notes", "ntasks", "origin", "partitions", "qos", "sbatch_args", "script", "user",
        "walltime_s",
    )

    def __init__(
        self,
        job_name: str = "",
        user: str = "",
        account: str | None = None,
        partitions: tuple[str, ...] = (),
        qos: str | None = None,
        walltime_s: int | None = None,
        nodes: int = 1,
        ntasks: int = 1,
        cpus_per_task: int = 1,
        mem_mb: float | None = None,
        mem_whole_node: bool = False,
        gpus: int = 0,
        gpu_type: str | None = None,
        array_tasks: int = 1,
        data_class: str = "",
        data_stores: tuple[str, ...] = (),
        deadline: float | None = None,
        deferrable: bool = False,
        begin: float | None = None,
        nice: int | None = None,
        comment: str | None = None,
        flags: frozenset[str] = frozenset(),
        script: Path | None = None,
        sbatch_args: list[str] | None = None,
        origin: dict[str, str] | None = None,
        notes: list[str] | None = None,
        array: str | None = None,
    ):
        self.job_name = job_name
        self.user = user
        self.account = account
        self.partitions = partitions
        self.qos = qos
        self.walltime_s = walltime_s
        self.nodes = nodes
        self.ntasks = ntasks
        self.cpus_per_task = cpus_per_task
        self.mem_mb = mem_mb
        self.mem_whole_node = mem_whole_node
        self.gpus = gpus
        self.gpu_type = gpu_type
        self.array_tasks = array_tasks
        self.array = array
        self.data_class = data_class
        self.data_stores = data_stores
        self.deadline = deadline
        self.deferrable = deferrable
        self.begin = begin
        self.nice = nice
        self.comment = comment
        self.flags = flags
        self.script = script
        self.sbatch_args = [] if sbatch_args is None else sbatch_args
        self.origin = {} if origin is None else origin
        self.notes = [] if notes is None else notes

    @property
    def cpus(self) -> int:
        return self.ntasks * self.cpus_per_task

    def to_dict(self) -> dict:
        return {
            "script": str(self.script) if self.script else None,
            "job_name": self.job_name, "user": self.user, "account": self.account,
            "partitions": list(self.partitions), "qos": self.qos,
            "walltime_s": self.walltime_s, "nodes": self.nodes, "ntasks": self.ntasks,
            "cpus_per_task": self.cpus_per_task, "cpus": self.cpus, "mem_mb": self.mem_mb,
            "gpus": self.gpus, "gpu_type": self.gpu_type, "array_tasks": self.array_tasks,
            "array": self.array,
            "data_class": self.data_class, "data_stores": list(self.data_stores),
            "deadline": q.iso(self.deadline), "deferrable": self.deferrable,
            "begin": q.iso(self.begin), "flags": sorted(self.flags), "origin": dict(self.origin),
            "notes": list(self.notes),
        }


class _Builder:
    """Collects raw option values with their origin, then turns them into a JobRequest."""

    def __init__(self, now: float):
        self.now = now
        self.values: dict[str, tuple[str | None, str]] = {}  # option -> (value, origin)

    def set(self, option: str, value: str | None, origin: str) -> None:
        self.values[option] = (value, origin)

    def build(self, script: Path | None, user: str) -> JobRequest:
        r = JobRequest(user=user, script=script)
        v = self.values

        def val(opt: str) -> tuple[str | None, str] | None:
            return v.get(opt)

        def err(opt: str, msg: str) -> RequestError:
            where = v[opt][1]
            return RequestError(f"{where}: --{opt}: {msg}")

        def positive_int(opt: str, allow_zero: bool = False) -> int | None:
            got = val(opt)
            if got is None:
                return None
            text = (got[0] or "").strip()
            if opt == "nodes" and "-" in text:
                text = text.split("-", 1)[0]  # min-max: the minimum is what the job may get
            if not text.isdigit() or (int(text) == 0 and not allow_zero):
                raise err(opt, f"expected a {'non-negative' if allow_zero else 'positive'} integer, "
                          f"got {got[0]!r}")
            r.origin[opt] = got[1]
            return int(text)

        def text_opt(opt: str) -> str | None:
            got = val(opt)
            if got is None:
                return None
            if not got[0]:
                raise err(opt, "expected a value")
            r.origin[opt] = got[1]
            return got[0]

        if (got := val("clusters")) is not None:
            raise RequestError(
                f"{got[1]}: --clusters: greend chooses the cluster itself; remove this option "
                "(or submit with sbatch directly)"
            )
        r.job_name = text_opt("job-name") or (script.name if script else "sbatch")
        r.account = text_opt("account")
        if (p := text_opt("partition")) is not None:
            r.partitions = tuple(x.strip() for x in p.split(",") if x.strip())
        r.qos = text_opt("qos")
        if (t := text_opt("time")) is not None:
            try:
                r.walltime_s = q.parse_duration(t)
            except ValueError as e:
                raise err("time", str(e)) from None
        r.nodes = positive_int("nodes") or 1
        tpn = positive_int("ntasks-per-node")
        n = positive_int("ntasks")
        r.ntasks = n if n is not None else (r.nodes * tpn if tpn else r.nodes)
        r.cpus_per_task = positive_int("cpus-per-task") or 1

        gpus, gtype = self._gpus(r, err)
        r.gpus, r.gpu_type = gpus, gtype

        for opt in ("mem", "mem-per-cpu", "mem-per-gpu"):
            got = val(opt)
            if got is None:
                continue
            try:
                mb = q.parse_memory_mb(got[0] or "")
            except ValueError as e:
                raise err(opt, str(e)) from None
            r.origin["mem"] = got[1]
            if opt == "mem":
                if mb == 0:
                    r.mem_whole_node = True  # --mem=0: all the memory of each node
                else:
                    r.mem_mb = mb * r.nodes
            elif opt == "mem-per-cpu":
                r.mem_mb = mb * r.cpus
            else:
                r.mem_mb = mb * max(r.gpus, 1)
            break

        if (a := text_opt("array")) is not None:
            try:
                r.array_tasks = _array_count(a)
                r.array = a.strip()
            except ValueError as e:
                raise err("array", str(e)) from None
        for opt, attr in (("begin", "begin"), ("deadline", "deadline")):
            if (t := text_opt(opt)) is not None:
                try:
                    setattr(r, attr, q.parse_time_point(t, self.now))
                except ValueError as e:
                    raise err(opt, str(e)) from None
        if (got := val("nice")) is not None:
            text = got[0] or "100"
            try:
                r.nice = int(text)
            except ValueError:
                raise err("nice", f"expected an integer, got {text!r}") from None
        r.comment = text_opt("comment")

        # greend's own options
        if (dc := text_opt("data-class")) is not None:
            r.data_class = dc.strip().lower()
        if (d := text_opt("data")) is not None:
            r.data_stores = tuple(x.strip() for x in d.split(",") if x.strip())
        if (got := val("deferrable")) is not None:
            word = (got[0] or "yes").strip().lower()
            if word not in ("yes", "no", "true", "false", "1", "0"):
                raise err("deferrable", f"expected yes or no, got {got[0]!r}")
            r.deferrable = word in ("yes", "true", "1")
            r.origin["deferrable"] = got[1]
        flags = set()
        for flag in ("interactive", "debug"):
            if val(flag) is not None:
                flags.add(flag)
        if r.qos == "debug" or "debug" in r.partitions:
            flags.add("debug")
        r.flags = frozenset(flags)
        if r.deferrable and r.deadline is None:
            r.notes.append("deferrable without a deadline: greend will not defer it "
                           "(give #GREEND --deadline=...)")
        if r.deadline is not None and r.deadline <= self.now:
            raise RequestError(f"{v['deadline'][1]}: --deadline: {q.iso(r.deadline)} is already past")
        return r

    def _gpus(self, r: JobRequest, err) -> tuple[int, str | None]:
        v = self.values
        for opt, scale in (("gpus", 1), ("gpus-per-node", r.nodes), ("gpus-per-task", r.ntasks)):
            if opt in v:
                try:
                    gtype, n = _gpu_spec(v[opt][0] or "")
                except ValueError as e:
                    raise err(opt, str(e)) from None
                r.origin["gpus"] = v[opt][1]
                return n * scale, gtype
        if "gres" in v:
            for item in (v["gres"][0] or "").split(","):
                parts = item.strip().split(":")
                if parts[0] != "gpu":
                    continue
                try:
                    gtype, n = _gpu_spec(":".join(parts[1:]) or "1")
                except ValueError as e:
                    raise err("gres", str(e)) from None
                r.origin["gpus"] = v["gres"][1]
                return n * r.nodes, gtype
        return 0, None


def _gpu_spec(text: str) -> tuple[str | None, int]:
    """[type:]count -> (type, count)."""
    parts = [p for p in text.strip().split(":") if p]
    if not parts:
        raise ValueError("expected [TYPE:]COUNT")
    count = parts[-1]
    gtype = parts[0] if len(parts) >= 2 else None
    if not count.isdigit():
        if len(parts) == 1:  # gpu:a100 means one a100
            return parts[0], 1
        raise ValueError(f"expected [TYPE:]COUNT, got {text!r}")
    return gtype, int(count)


def _array_count(text: str) -> int:
    spec = text.split("%", 1)[0]
    n = 0
    for part in spec.split(","):
        part = part.strip()
        step = 1
        if ":" in part:
            part, s = part.split(":", 1)
            if not s.isdigit() or int(s) == 0:
                raise ValueError(f"bad step in {text!r}")
            step = int(s)
        if "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()) or int(b) < int(a):
                raise ValueError(f"expected ranges like 0-9, 1,3,5 or 0-15:4, got {text!r}")
            n += (int(b) - int(a)) // step + 1
        elif part.isdigit():
            n += 1
        else:
            raise ValueError(f"expected ranges like 0-9, 1,3,5 or 0-15:4, got {text!r}")
    return max(n, 1)


def _parse_args(words: list[str], where: str, greend: bool):
    """(option, value) pairs of one directive line; options greend does not know are skipped."""
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            if greend:
                if name not in _GREEND_OPTIONS:
                    raise RequestError(
                        f"{where}: unknown #GREEND option --{name} (known: "
                        + ", ".join(f"--{o}" for o in _GREEND_OPTIONS) + ")"
                    )
                if not eq and name in ("data-class", "deadline", "data"):
                    if i < len(words) and not words[i].startswith("-"):
                        value, eq = words[i], "="
                        i += 1
                    else:
                        raise RequestError(f"{where}: #GREEND --{name} needs a value (--{name}=...)")
                yield name, (value if eq else None)
                continue
            if name == "cluster":
                name = "clusters"
            if not eq and name in _KNOWN_WITH_VALUE:
                if i < len(words):
                    value, eq = words[i], "="
                    i += 1
                else:
                    raise RequestError(f"{where}: --{name} needs a value")
            yield name, (value if eq else None)
        elif w.startswith("-") and len(w) >= 2 and not greend:
            letter, rest = w[1], w[2:]
            if letter in _SHORT:
                if rest.startswith("="):
                    rest = rest[1:]
                if not rest:
                    if i >= len(words):
                        raise RequestError(f"{where}: -{letter} needs a value")
                    rest = words[i]
                    i += 1
                yield _SHORT[letter], rest
            elif letter in _SHORT_FLAGS:
                continue
            else:
                continue  # an option greend does not read; sbatch will
        elif greend:
            raise RequestError(f"{where}: expected #GREEND --option[=value], got {w!r}")
        # else: a stray value of an option greend does not read


def read_script(path: Path, builder: _Builder, data: bytes | None = None) -> None:
    """Read the directives of the script at `path`, or of `data` (its text as sent by a caller:
    the daemon never opens a script a user names) with `path` naming it in messages."""
    try:
        if data is None:
            data = path.read_bytes()
    except FileNotFoundError:
        raise RequestError(f"{path}: no such batch script") from None
    except IsADirectoryError:
        raise RequestError(f"{path}: is a directory, not a batch script") from None
    except OSError as e:
        raise RequestError(f"{path}: cannot read: {e.strerror}") from None
    if b"\0" in data[:4096]:
        raise RequestError(f"{path}: not a text file (a batch script is expected)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RequestError(f"{path}:{line}: not valid UTF-8") from None
    lines = text.splitlines()
    if lines and not lines[0].startswith("#!"):
        raise RequestError(f"{path}:1: a batch script must start with #! (e.g. #!/bin/bash), "
                           "as sbatch requires")
    for lineno, line in enumerate(lines, 1):
        s = line.strip()
        if not s:
            continue
        if not s.startswith("#"):
            break  # sbatch stops reading directives at the first command
        for tag, greend in (("#SBATCH", False), ("#GREEND", True)):
            if s.startswith(tag) and (len(s) == len(tag) or s[len(tag)].isspace()):
                where = f"{path}:{lineno}"
                try:
                    words = shlex.split(s[len(tag):], comments=True)
                except ValueError as e:
                    raise RequestError(f"{where}: cannot split {tag} line: {e}") from None
                for opt, value in _parse_args(words, where, greend):
                    builder.set(opt, value, where)


def build_request(script: str | os.PathLike | None, cli_options: list[tuple[str, str | None]],
                  *, user: str, now: float, script_text: str | None = None) -> JobRequest:
    """The request of a script (or none) with command-line options (sbatch long names) on top.
    With script_text, the script's directives are read from it, not from the file `script`."""
    b = _Builder(now)
    path = Path(script) if script is not None else None
    if script_text is not None:
        read_script(path or Path("(script)"), b, script_text.encode("utf-8", "surrogatepass"))
    elif path is not None:
        read_script(path, b)
    sbatch_args = []
    for opt, value in cli_options:
        b.set(opt, value, "command line")
        if opt not in _GREEND_OPTIONS:
            sbatch_args.append(f"--{opt}" if value is None else f"--{opt}={value}")
    r = b.build(path, user)
    r.sbatch_args = sbatch_args
    return r


class Resolved(Record):
    """A request's walltime and memory on one partition, defaults applied, with their origin."""

    walltime_s: int
    walltime_from: str
    mem_mb: float
    mem_from: str
    cpus_per_node: int
    mem_per_node_mb: float

    __slots__ = ("cpus_per_node", "mem_from", "mem_mb", "mem_per_node_mb", "walltime_from", "walltime_s")

    def __init__(
        self,
        walltime_s: int,
        walltime_from: str,
        mem_mb: float,
        mem_from: str,
        cpus_per_node: int,
        mem_per_node_mb: float,
    ):
        self.walltime_s = walltime_s
        self.walltime_from = walltime_from
        self.mem_mb = mem_mb
        self.mem_from = mem_from
        self.cpus_per_node = cpus_per_node
        self.mem_per_node_mb = mem_per_node_mb


def resolve(r: JobRequest, partition, default_walltime_s: int, default_mem_per_cpu_mb: float,
            partition_name: str = "") -> Resolved:
    """Fill what the request leaves unsaid as Slurm would on this partition (None: no partition)."""
    pname = partition_name or "the partition"
    if r.walltime_s is not None:
        wt, wt_from = r.walltime_s, "asked"
    elif partition is not None and partition.default_walltime_s is not None:
        wt, wt_from = partition.default_walltime_s, f"{pname} default"
    elif partition is not None and partition.max_walltime_s is not None:
        wt, wt_from = partition.max_walltime_s, f"{pname} limit"
    else:
        wt, wt_from = default_walltime_s, "policy default"
    if r.mem_whole_node and partition is not None and partition.mem_per_node_mb is not None:
        mem, mem_from = partition.mem_per_node_mb * r.nodes, "--mem=0: whole nodes"
    elif r.mem_mb is not None:
        mem, mem_from = r.mem_mb, "asked"
    elif partition is not None and partition.def_mem_per_cpu_mb is not None:
        mem, mem_from = partition.def_mem_per_cpu_mb * r.cpus, f"{pname} default per CPU"
    else:
        mem, mem_from = default_mem_per_cpu_mb * r.cpus, "policy default per CPU"
    return Resolved(wt, wt_from, mem, mem_from, math.ceil(r.cpus / r.nodes), mem / r.nodes)
