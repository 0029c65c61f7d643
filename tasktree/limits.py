"""Limits on model calls shared by every worker: calls in flight and calls per minute, per
model, enforced in Redis before each call; and the cut a 429 makes, for every worker at once.

Configured by TASKTREE_LLM_CONCURRENCY and TASKTREE_LLM_RPM (every model), overridden per
model by TASKTREE_LLM_LIMITS, rules separated by ";", the first whose pattern matches wins:

    TASKTREE_LLM_LIMITS='openai/gpt-4o-mini=60rpm,8; anthropic/*=20'

`N` is calls at once, `Nrpm` calls per minute; patterns are shell-style (`*`, `?`).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass

_ITEM_RE = re.compile(r"(\d+)\s*(rpm)?")


@dataclass(frozen=True)
class Limit:
    """A model's limits: calls in flight and calls per minute (0: none)."""

    concurrency: int = 0
    rpm: int = 0

    def __bool__(self) -> bool:
        return bool(self.concurrency or self.rpm)

    def __str__(self) -> str:
        parts = [f"{self.concurrency} at once"] * bool(self.concurrency)
        return ", ".join(parts + [f"{self.rpm} per minute"] * bool(self.rpm)) or "none"


def parse(text: str) -> list[tuple[str, Limit]]:
    """The rules of a TASKTREE_LLM_LIMITS value; ValueError names the part that is wrong."""
    rules = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        pattern, sep, spec = part.partition("=")
        if not sep or not pattern.strip():
            raise ValueError(f"{part!r}: expected MODEL=LIMITS, e.g. openai/gpt-4o-mini=60rpm,8")
        concurrency = rpm = 0
        for item in (i.strip().lower() for i in spec.split(",")):
            m = _ITEM_RE.fullmatch(item)
            if not m or not 1 <= int(m.group(1)) <= 100_000_000:
                raise ValueError(
                    f"{item!r} in {part!r}: expected N (calls at once) or Nrpm (calls per "
                    "minute), N from 1 to 100,000,000"
                )
            if m.group(2):
                rpm = int(m.group(1))
            else:
                concurrency = int(m.group(1))
        rules.append((pattern.strip(), Limit(concurrency, rpm)))
    return rules


@functools.lru_cache(maxsize=16)
def rules_of(text: str) -> tuple[tuple[str, Limit], ...]:
    """`parse`, once per value: the limits are looked up before every model call."""
    return tuple(parse(text))


def limit_for(model: str, rules: tuple[tuple[str, Limit], ...], default: Limit) -> Limit:
    """The first rule whose pattern matches the model, else the default."""
    for pattern, limit in rules:
        if fnmatch.fnmatchcase(model, pattern):
            return limit
    return default
