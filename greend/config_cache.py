"""A per-user cache of the validated configuration, read without pydantic: the fast path of the
commands that start for every job (`greend measure`, `greend route`; docs/performance.md).

After a normal validated load (greend.config.load), `load()` stores a snapshot of the result: a
plain-data tree built generically from the models (every field, extra keys and private attributes,
and the value of each property that depends on the model alone), marshalled into
$XDG_CACHE_HOME/greend (~/.cache/greend). The next run whose key matches reads it back as read-only
views with the models' attribute names and types (Path stays Path), without importing pydantic or
greend.config. The key is the file's absolute and real path, device, inode, size, mtime_ns and
ctime_ns, greend's version, the stamps of the models' own source files, the Python version and the
user: any edit, touch, upgrade or other interpreter is a miss. A miss, a cache that is not the
user's own (owner and mode checked; written atomically 0600 in a 0700 directory), a corrupted file
(CRC) or a model the view cannot stand for (a public method other than those ConfigView shares with
Config) falls back to the validated load. The configuration models remain the one source of truth:
the snapshot is only ever made from them.

What the snapshot does not freeze: files that the configuration names (a carbon intensity series,
token files) are read when used, as after a validated load; and the members of Config that depend
on the machine or the environment (node_name, resolved_state_dir) are computed by the functions
of greend.config_env, which Config itself uses.
"""

from __future__ import annotations

import logging
import marshal
import os
import sys
import zlib
from pathlib import Path
from typing import ClassVar

from . import __version__, usercache
from .config_env import node_name_of, state_dir_of

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"greend-config-snapshot-1\n"
_HERE = os.path.dirname(os.path.abspath(__file__))
# The models' own source files: a development checkout changes them without a new version.
_MODEL_SOURCES = ("config.py", "policy_config.py", "config_cache.py")


# -- the views ------------------------------------------------------------------------------------
class View:
    """A read-only view of one validated model: its fields (and extra keys) as attributes."""

    model_fields: ClassVar[dict[str, None]] = {}
    model_extra: dict | None = None

    def __setattr__(self, name: str, value) -> None:
        if not name.startswith("_"):  # the models are frozen; private attributes may be set
            raise AttributeError(f"{type(self).__name__} is read-only: cannot set {name!r}")
        object.__setattr__(self, name, value)

    def model_copy(self, *, update: dict | None = None, deep: bool = False) -> View:
        """A copy with some fields replaced, not validated (as pydantic's model_copy)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        if update:
            new.__dict__.update(update)
        return new

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.model_fields)
        return f"{type(self).__name__}({fields})"


class ConfigView(View):
    """The view of greend.config.Config, with its members that depend on the machine."""

    _state_dir_flag: Path | None = None

    @property
    def node_name(self) -> str:
        return node_name_of(self.node)

    def resolved_state_dir(self) -> Path:
        return state_dir_of(self._state_dir_flag, self.state_dir)


# Model (module.qualname) -> its view class, and the members the view computes itself (anything
# else public on a model must be a property of the model alone, stored in the snapshot).
_VIEWS: dict[str, type[View]] = {"greend.config.Config": ConfigView}
_COMPUTED: dict[str, frozenset[str]] = {"greend.config.Config": frozenset({"node_name",
                                                                          "resolved_state_dir"})}
_classes: dict[tuple[str, tuple[str, ...]], type[View]] = {}


def _view_class(name: str, fields: tuple[str, ...]) -> type[View]:
    cls = _classes.get((name, fields))
    if cls is None:
        base = _VIEWS.get(name, View)
        cls = type(name.rsplit(".", 1)[-1] + "View", (base,), {
            "__slots__": (), "model_fields": dict.fromkeys(fields), "__module__": __name__})
        _classes[(name, fields)] = cls
    return cls


# -- snapshot: models -> plain data (marshal-able), and back to views -----------------------------
class Unsnapshottable(Exception):
    """A value or a model the snapshot cannot stand for: the validated load is used instead."""


def _model_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _own_members(cls) -> tuple[list[str], list[str]]:
    """(properties, methods) that greend's model classes define publicly (pydantic's not)."""
    from pydantic import BaseModel

    props: list[str] = []
    methods: list[str] = []
    validators: set[str] = set()
    decorators = getattr(cls, "__pydantic_decorators__", None)
    if decorators is not None:
        for group in ("validators", "field_validators", "root_validators", "field_serializers",
                      "model_serializers", "model_validators", "computed_fields"):
            validators |= set(getattr(decorators, group, {}))
    for klass in cls.__mro__:
        if klass is BaseModel or not issubclass(klass, BaseModel):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in validators or name.startswith("model_"):
                continue
            if isinstance(member, property):
                props.append(name)
            elif callable(member) or isinstance(member, classmethod | staticmethod):
                methods.append(name)
    return props, methods


def snapshot(cfg) -> dict:
    """The plain-data tree of a validated Config (Unsnapshottable when it cannot be one)."""
    classes: dict[str, tuple[list[str], list[str]]] = {}  # name -> (fields, stored properties)

    def enc(v):
        if v is None or type(v) in (bool, int, float, str):
            return v
        if isinstance(v, Path) and type(v) is type(Path()):
            return ("p", str(v))
        if type(v) is list:
            return ("l", [enc(x) for x in v])
        if type(v) is tuple:
            return ("t", [enc(x) for x in v])
        if type(v) in (set, frozenset):
            return ("s" if type(v) is set else "f", [enc(x) for x in v])
        if type(v) is dict:
            if not all(type(k) is str for k in v):
                raise Unsnapshottable("a mapping with non-string keys")
            return ("d", {k: enc(x) for k, x in v.items()})
        fields = getattr(type(v), "model_fields", None)
        if fields is None:
            raise Unsnapshottable(f"a value of type {type(v).__name__}")
        cls = type(v)
        name = _model_name(cls)
        if name not in classes:
            props, methods = _own_members(cls)
            missing = [m for m in methods if m not in _COMPUTED.get(name, ())]
            if missing:
                raise Unsnapshottable(f"{name} has methods the view cannot offer: {missing}")
            classes[name] = (list(fields), [p for p in props if p not in _COMPUTED.get(name, ())])
        fields, props = classes[name]
        values = {f: enc(getattr(v, f)) for f in fields}
        values.update((p, enc(getattr(v, p))) for p in props)
        extra = v.model_extra
        private = getattr(v, "__pydantic_private__", None) or {}
        return ("m", name, values, None if extra is None else enc(dict(extra)),
                {k: enc(x) for k, x in private.items()})

    root = enc(cfg)
    return {"classes": {k: fields for k, (fields, _) in classes.items()}, "root": root}


def view(tree: dict):
    """The views of a snapshot tree."""
    classes = {name: _view_class(name, tuple(fields)) for name, fields in tree["classes"].items()}

    def dec(v):
        if type(v) is not tuple:
            return v
        tag = v[0]
        if tag == "m":
            _, name, values, extra, private = v
            obj = object.__new__(classes[name])
            d = obj.__dict__
            for k, x in values.items():
                d[k] = dec(x)
            if extra is not None:
                extra = dec(extra)
                d.update(extra)
                d["model_extra"] = extra
            for k, x in private.items():
                d[k] = dec(x)
            return obj
        if tag == "p":
            return Path(v[1])
        if tag == "d":
            return {k: dec(x) for k, x in v[1].items()}
        if tag == "l":
            return [dec(x) for x in v[1]]
        if tag == "t":
            return tuple(dec(x) for x in v[1])
        if tag == "s":
            return {dec(x) for x in v[1]}
        if tag == "f":
            return frozenset(dec(x) for x in v[1])
        raise ValueError(f"unknown tag {tag!r}")

    return dec(tree["root"])


# -- the cache file -------------------------------------------------------------------------------
cache_dir = usercache.cache_dir


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def key_of(path: str | os.PathLike | None) -> tuple:
    """What a snapshot must match (OSError when the file cannot be looked at)."""
    sources = []
    for name in _MODEL_SOURCES:
        try:
            sources.append(_stamp(os.stat(os.path.join(_HERE, name))))
        except OSError:
            sources.append(None)
    common = (FORMAT, __version__, tuple(sources), sys.version, sys.implementation.cache_tag,
              os.geteuid())
    if path is None:
        return (*common, "<embedded default>")
    where = os.path.abspath(path)
    return (*common, where, os.path.realpath(where), _stamp(os.stat(where)))


def _file_of(key: tuple) -> Path:
    """One file per configuration path, greend installation and version, and Python (so that two
    installations, e.g. nodes sharing a home directory, do not take turns overwriting each other's);
    the full key is inside it."""
    where = key[-1] if key[-1] == "<embedded default>" else key[-3]
    name = f"{where}\0{_HERE}\0{__version__}\0{sys.version}".encode("utf-8", "surrogateescape")
    return cache_dir() / f"config-{zlib.crc32(name):08x}.snapshot"


def read(key: tuple):
    """The views of the cached snapshot for `key`, or None (absent, foreign, stale or corrupted)."""
    f = _file_of(key)
    body = usercache.read(f, MAGIC)
    if body is None:
        return None
    try:
        stored_key, tree = marshal.loads(body)
        if stored_key != key:
            return None
        return view(tree)
    except Exception as e:  # a damaged file must never be more than a miss
        log.debug("%s: unreadable snapshot (%s): ignored", f, e)
        return None


def write(key: tuple, cfg) -> bool:
    """Store the snapshot of a validated Config for `key` (greend.usercache.write: atomically,
    0600, in the user's own 0700 directory). False (and nothing written) when it cannot be."""
    f = _file_of(key)
    try:
        body = marshal.dumps((key, snapshot(cfg)))
    except (ValueError, Unsnapshottable) as e:
        log.debug("configuration snapshot not written to %s: %s", f, e)
        return False
    return usercache.write(f, MAGIC, body)


def load(path: str | os.PathLike | None):
    """The configuration at `path` (None: the embedded default): the cached view when its snapshot
    is current, else greend.config.load's validated Config (and the snapshot stored for next time).
    Errors are greend.config.load's (ConfigError naming the file and key)."""
    try:
        key = key_of(path)
        _file_of(key)
    except (OSError, RuntimeError):  # RuntimeError: no home directory for the cache
        key = None  # absent or unreadable: the validated load says so clearly
    if key is not None:
        cached = read(key)
        if cached is not None:
            return cached
    from . import config as config_mod

    cfg = config_mod.load(path)
    # Only what was fully checked is cached: with the policy engine's rule check installed (the
    # composition root, greend.cli, does it), as every `greend` command has it.
    from . import wiring

    if key is not None and wiring.rule_checker is not None:
        write(key, cfg)
    return cfg
