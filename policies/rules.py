"""The routing rules' public names, for the configuration's users and a site's own rules.

A site adds its own rule by subclassing FilterRule, ScoreRule or AdjustRule (imported from here)
and declaring it under the entry-point group "greend.rules"; the configuration then names it like
a built-in one (docs/policy.md). The code lives in rule.py (what a rule is and returns),
filters.py, scores.py, adjustments.py (the built-in rules) and registry.py (rules by name).
"""

from __future__ import annotations

from .adjustments import period_start
from .registry import BUILTIN, DEFAULT_RULES, build_rules, instantiate, plugins, rule_class
from .rule import (
    PLUGIN_GROUP,
    Action,
    AdjustRule,
    Check,
    FilterRule,
    LowerIsBetter,
    Params,
    Rule,
    Score,
    ScoreRule,
)

__all__ = [
    "BUILTIN", "DEFAULT_RULES", "PLUGIN_GROUP", "Action", "AdjustRule", "Check", "FilterRule",
    "LowerIsBetter", "Params", "Rule", "Score", "ScoreRule", "build_rules", "instantiate",
    "period_start", "plugins", "rule_class",
]
