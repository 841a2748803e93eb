"""Plain record classes for the engine's objects.

Records are written as ordinary classes with __slots__ and an explicit __init__ rather than
dataclasses: a dataclass compiles its methods when its module is imported, and `greend route` must
start fast. This base gives them a readable repr and a plain-dict form.
"""

from __future__ import annotations

_HIDDEN = frozenset({"config", "context"})  # large back-references, left out of repr


class Record:
    __slots__ = ()

    def _fields(self) -> list[str]:
        names: list[str] = []
        for cls in reversed(type(self).__mro__):
            names.extend(n for n in getattr(cls, "__slots__", ()) if n not in names)
        return names

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={getattr(self, n, None)!r}" for n in self._fields()
                          if n not in _HIDDEN and not n.startswith("_"))
        return f"{type(self).__name__}({parts})"

    def to_plain(self) -> dict:
        """Public fields as a dict, records and lists of records included (for JSON files)."""
        out = {}
        for n in self._fields():
            if n.startswith("_") or n in _HIDDEN:
                continue
            v = getattr(self, n)
            if isinstance(v, Record):
                v = v.to_plain()
            elif isinstance(v, list | tuple):
                v = [x.to_plain() if isinstance(x, Record) else x for x in v]
            out[n] = v
        return out
