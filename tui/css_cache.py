"""A per-user cache of Textual's parsed stylesheets: `greend tui` does not tokenise and parse the
same CSS again at every start (docs/performance.md, "TUI start-up, fourth pass").

Textual parses, at each start, greend.tcss and the DEFAULT_CSS of every widget class on screen,
and parses the app's and the screen's again each time the theme's variables are set: three times
before the first page: ~19 ms of CPU, of a start now under 250 ms. `install()` wraps Textual's
`Stylesheet._parse_rules` (a private method: wrapped only when its parameters are the ones this
module was written for, else Textual parses as usual) with a lookup in the rules parsed before. An
entry matches on the exact CSS text (compared in full, not by a hash), where it was read from, its
kind (default or user CSS), tie-breaker, scope and the CSS variables in force, and on the stamps of
Textual's and Rich's own files (an upgrade is a miss). A miss parses as Textual does; rules with
errors are never stored. `save()` writes the new entries back (greend.usercache: the user's own
0600 file in a 0700 directory, CRC-checked, atomic); a cache that is absent, foreign, corrupted or
from another Textual is a miss, never an error.

The rules are Textual objects, stored with pickle. Unpickling runs through an allow-list (Textual's
and Rich's own classes, the selector checks of textual.css.model, functools.partial, enum members
and a dict's get and __contains__), so even a file forged by someone who could write to the user's
own cache directory cannot name any other callable.
"""

from __future__ import annotations

import enum
import functools
import io
import logging
import marshal
import os
import pickle
import sys
import types
import zlib
from pathlib import Path

from greend import __version__, usercache

log = logging.getLogger(__name__)

MAGIC = b"greend-tcss-cache-1\n"
MAX_ENTRIES = 400  # beyond this (many Textual versions or themes in turn) the file starts afresh
# The parameters of the Textual method wrapped (textual.css.stylesheet.Stylesheet._parse_rules).
PARAMS = ("self", "css", "read_from", "is_default_rules", "tie_breaker", "scope")
# Textual's and Rich's files whose stamps are part of the key (what parses, and what is stored).
STAMPED = ("textual/__init__.py", "textual/css/parse.py", "textual/css/tokenize.py",
           "textual/css/styles.py", "textual/css/model.py", "textual/css/stylesheet.py",
           "textual/css/_style_properties.py", "textual/css/scalar.py", "textual/color.py",
           "textual/style.py", "rich/__init__.py", "rich/style.py", "rich/color.py")
# Functions a parsed rule set refers to (its selectors' checks); everything else must be a class.
ALLOWED_FUNCTIONS_IN = ("textual.css.model",)
DICT_METHODS = ("get", "__contains__")  # a Styles keeps its rules' dict's get and __contains__


def _getattr(obj, name: str):
    """pickle's getattr, for the uses a parsed rule set has: an enum member by its name, and the
    bound lookups of a Styles' own rules dict."""
    if isinstance(obj, type) and issubclass(obj, enum.Enum) and not name.startswith("_"):
        return getattr(obj, name)
    if type(obj) is dict and name in DICT_METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr(..., {name!r}) is not allowed in the stylesheet cache")


class _Unpickler(pickle.Unpickler):
    """Only what parsed Textual CSS is made of: Textual's and Rich's own classes, the functions
    of ALLOWED_FUNCTIONS_IN, functools.partial, enum members and dict lookups (_getattr)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("functools", "partial"):
            return functools.partial
        if (module, name) == ("builtins", "getattr"):
            return _getattr
        if module.split(".", 1)[0] in ("textual", "rich") and not name.startswith("__"):
            obj = super().find_class(module, name)
            own = getattr(obj, "__module__", None) == module
            if own and (isinstance(obj, type) or (module in ALLOWED_FUNCTIONS_IN
                                                  and isinstance(obj, types.FunctionType))):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the stylesheet cache")


class Cache:
    """The stored rules: {(read_from, is_default, tie_breaker, scope): [[css, variables, rules]]}
    (used from the app's one thread: Textual parses there, and the app saves there)
    with rules pickled, unpickled when first used (then shared, as Textual's own in-process cache
    of parsed rules shares them: Textual does not change a parsed rule set)."""

    def __init__(self, path: Path, key: tuple) -> None:
        self.path = path
        self.key = key
        self.entries: dict[tuple, list[list]] = {}
        self.dirty = False
        self.hits = self.misses = 0

    def load(self) -> None:
        body = usercache.read(self.path, MAGIC)
        if body is None:
            return
        try:
            key, entries = marshal.loads(body)
        except Exception as e:  # a damaged file is a miss
            log.debug("%s: unreadable (%s): ignored", self.path, e)
            return
        if key == self.key and isinstance(entries, dict):
            self.entries = entries

    def get(self, where: tuple, css: str, variables: dict) -> list | None:
        for entry in self.entries.get(where, ()):
            if entry[0] == css and entry[1] == variables:
                try:
                    if len(entry) < 4:  # unpickled once per process
                        entry.append(_Unpickler(io.BytesIO(entry[2])).load())
                    return entry[3]
                except Exception as e:  # refused or damaged: parsed again (and replaced)
                    log.debug("stylesheet cache entry unusable (%s): parsed again", e)
                    self.entries[where].remove(entry)
                    return None
        return None

    def put(self, where: tuple, css: str, variables: dict, rules: list) -> None:
        """Keep rules just parsed; they are pickled when saved (after the first page is painted)."""
        if sum(len(v) for v in self.entries.values()) >= MAX_ENTRIES:
            self.entries = {}
        self.entries.setdefault(where, []).append([css, dict(variables), None, rules])
        self.dirty = True

    def save(self) -> bool:
        if not self.dirty:
            return False
        self.dirty = False
        entries: dict[tuple, list] = {}
        for where, stored in self.entries.items():
            for e in stored:
                if e[2] is None:
                    try:
                        e[2] = pickle.dumps(e[3], protocol=pickle.HIGHEST_PROTOCOL)
                    except Exception as ex:  # not picklable (a later Textual): parsed each time
                        log.debug("stylesheet rules not cached: %s", ex)
                        continue
                entries.setdefault(where, []).append(e[:3])
        body = marshal.dumps((self.key, entries))
        return usercache.write(self.path, MAGIC, body)


_cache: Cache | None = None


def _key() -> tuple:
    stamps = []
    for rel in STAMPED:
        top = rel.split("/", 1)[0]
        where = os.path.join(os.path.dirname(os.path.dirname(sys.modules[top].__file__)), rel)
        try:
            st = os.stat(where)
            stamps.append((rel, st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((rel, None))
    return (MAGIC, __version__, sys.version, tuple(stamps), os.geteuid())


def _file_name() -> str:
    """One file per Textual installation, greend installation and Python: two installations
    (nodes sharing a home directory, a development checkout) do not take turns overwriting it."""
    import textual

    where = f"{textual.__file__}\0{__file__}\0{sys.version}".encode("utf-8", "surrogateescape")
    return f"tcss-{zlib.crc32(where):08x}.cache"


def install() -> Cache | None:
    """Wrap Textual's stylesheet parsing with the cache (once per process); the cache, or None
    when Textual's method is not the one expected or there is no cache location."""
    global _cache
    if _cache is not None:
        return _cache
    import rich  # noqa: F401 - their files are stamped
    import textual  # noqa: F401
    from textual.css import stylesheet

    parse = getattr(stylesheet.Stylesheet, "_parse_rules", None)
    code = getattr(parse, "__code__", None)
    if code is None or code.co_varnames[:len(PARAMS)] != PARAMS:
        log.debug("Textual's Stylesheet._parse_rules is not the one expected: no stylesheet cache")
        return None
    try:
        path = usercache.cache_dir() / _file_name()
        cache = Cache(path, _key())
    except (OSError, RuntimeError, KeyError) as e:  # RuntimeError: no home directory
        log.debug("no stylesheet cache: %s", e)
        return None
    cache.load()

    def _parse_rules(self, css, read_from, is_default_rules=False, tie_breaker=0, scope=""):
        where = (tuple(read_from), bool(is_default_rules), tie_breaker, scope)
        variables = self._variables
        rules = cache.get(where, css, variables)
        if rules is not None:
            cache.hits += 1
            return rules
        cache.misses += 1
        rules = parse(self, css, read_from, is_default_rules, tie_breaker, scope)
        if not any(rule.errors for rule in rules):
            cache.put(where, css, variables, rules)
        return rules

    _parse_rules.__wrapped__ = parse  # type: ignore[attr-defined]
    stylesheet.Stylesheet._parse_rules = _parse_rules  # type: ignore[method-assign]
    _cache = cache
    return cache


def uninstall() -> None:
    """Put Textual's own parsing back (tests)."""
    global _cache
    from textual.css import stylesheet

    wrapped = getattr(stylesheet.Stylesheet._parse_rules, "__wrapped__", None)
    if wrapped is not None:
        stylesheet.Stylesheet._parse_rules = wrapped  # type: ignore[method-assign]
    _cache = None


def save() -> bool:
    """Write the entries parsed in this process (if any) back to the cache file."""
    return _cache.save() if _cache is not None else False
