"""What the composition root (greend.cli) hands down to the lower layers, so that they never import
the higher ones (docs/architecture.md): set at start, read where needed. Light to import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

rule_checker: Callable[[Any], None] | None = None
"""Checks one [[policy.rules]] entry (greend.policy_config.RuleSpec: its rule name and parameters)
against the policy engine's rules, raising ValueError that names what is wrong. Unset: only the
entry's shape is checked when the configuration is read, and the engine checks the rule when it
builds it."""
