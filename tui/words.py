"""Counts in words: '1 job', '2 jobs', '1 cluster open'."""

from __future__ import annotations

IRREGULAR = {"was": "were", "is": "are"}


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 job', '3 jobs', '1,204 jobs'; `many` for a plural that is not word + 's'."""
    if n == 1:
        return f"1 {word}"
    return f"{n:,} {many or IRREGULAR.get(word) or word + 's'}"
