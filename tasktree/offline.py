"""The built-in offline model: deterministic placeholder text, no network and no weights."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from typing import Any

from tasktree import prompts
from tasktree.settings import Settings, parse_latency
from tasktree.states import Step

NOTICE = (
    "[offline placeholder text: tasktree's built-in model wrote this; no real model was called]"
)

_LIST_RE = re.compile(
    r"\b(?:this\s+)?(?:includes|including|covers|covering|consists of|comprising)\b"
    r":?\s+(.+?)(?:\.(?:\s|$)|$)",
    re.IGNORECASE | re.DOTALL,
)
_TASK_RE = re.compile(r"<task>\n(.*?)\n</task>", re.DOTALL)
_CONTEXT_RE = re.compile(r'<context key="(.*?)">\n(.*?)\n</context>', re.DOTALL)


def count_tokens(text: str) -> int:
    """The offline model's token count: one token per four characters, rounded up."""
    return math.ceil(len(text) / 4)


def parts_of(task: str) -> tuple[str, list[str]]:
    """Split 'X. This includes a, b, and c.' into ('X', ['a', 'b', 'c'])."""
    objective, items, _ = ordered_parts_of(task)
    return objective, items


def ordered_parts_of(task: str) -> tuple[str, list[str], list[bool]]:
    """parts_of, and for each part whether it comes after the one before it:
    'This includes a design, then the code, then the tests.' orders all three."""
    m = _LIST_RE.search(task)
    if not m:
        return task, [], []
    raw = re.split(r",\s*(?:and\s+)?|\s+and\s+", m.group(1).strip())
    then = [bool(re.match(r"then\s+", i.strip(), flags=re.I)) for i in raw]
    items = [
        re.sub(r"^(?:then\s+)?(?:(?:the|a|an)\s+)?", "", i.strip(" .;:"), flags=re.I) for i in raw
    ]
    kept = [(i, t) for i, t in zip(items, then, strict=True) if i]
    objective = task[: m.start()].strip().rstrip(".,;:") or task
    if len(kept) < 2:
        return objective, [], []
    return objective, [i for i, _ in kept], [t for _, t in kept]


class OfflineModel:
    """Answers the three steps of the generic agent without a network or weights."""

    def __init__(self, settings: Settings) -> None:
        self.latency = parse_latency(settings.offline_latency)
        self.fanout = settings.offline_fanout
        self.seed = settings.offline_seed
        self.fail = settings.offline_fail
        self.greedy = settings.offline_greedy

    def fails(self, messages: list[dict[str, Any]]) -> bool:
        """Whether this call is one of the `offline_fail` share that fail: by a hash of the
        prompt and the seed, so the same call always answers the same way."""
        if self.fail <= 0:
            return False
        digest = hashlib.sha256(f"fail:{self.seed}:{json.dumps(messages)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fail

    def reply(self, step: Step, messages: list[dict[str, Any]]) -> str:
        """The answer to one call of `step`."""
        system = str(messages[0].get("content", "")) if messages else ""
        last = str(messages[-1].get("content", "")) if messages else ""
        task_m = _TASK_RE.search(last) or _TASK_RE.search(system)
        task = task_m.group(1) if task_m else last
        if step == Step.DECIDE:
            return self._decide(task, single=system.startswith(prompts.SINGLE_TAG))
        if step == Step.SYNTHESIZE:
            parts = _CONTEXT_RE.findall(last)
            lines = [f"- {key}: {value.splitlines()[-1][:160]}" for key, value in parts]
            return f"{NOTICE}\nSynthesis of {len(parts)} parts for: {_short(task)}\n" + "\n".join(
                lines
            )
        return f"{NOTICE}\nAs {_short(system, 60)}: a response to {_short(task)}"

    def _decide(self, task: str, single: bool) -> str:
        # With `greedy`, the first part of every delegation ("Part 1 of ...") fans out into
        # `greedy` parts: one branch asks for far more than its siblings.
        parts = self.greedy if self.greedy and task.startswith("Part 1 of ") else self.fanout
        if parts:
            subs = [
                {
                    "requested_persona": f"You are specialist {i} of {parts}.",
                    "task_details": f"Part {i} of {parts}: {_short(task, 120)}",
                }
                for i in range(1, parts + 1)
            ]
            return json.dumps(
                {"decision": "delegate", "reason": "offline fan-out", "sub_tasks": subs}
            )
        objective, items, then = ordered_parts_of(task)
        if items:
            ordered: list[dict[str, Any]] = [
                {
                    "requested_persona": f"You are an expert in {item}.",
                    "task_details": f"Produce the {item} for: {objective}.",
                    **({"depends_on": [i]} if after else {}),  # 1-based: the part before
                }
                for i, (item, after) in enumerate(zip(items, then, strict=True))
            ]
            reason = f"the task names {len(items)} parts"
            return json.dumps({"decision": "delegate", "reason": reason, "sub_tasks": ordered})
        doc: dict[str, Any] = {"decision": "execute", "reason": "a single part", "sub_tasks": []}
        if single:
            doc["answer"] = f"{NOTICE}\nA response to {_short(task)}"
        return json.dumps(doc)

    def delay(self, messages: list[dict[str, Any]]) -> float:
        low, high = self.latency
        if high <= 0:
            return 0.0
        if high == low:
            return low
        digest = hashlib.sha256(f"{self.seed}:{json.dumps(messages)}".encode()).digest()
        return random.Random(digest).uniform(low, high)


def _short(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
