"""The built-in offline model: deterministic placeholder text, registered as a litellm provider."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from typing import Any

from tasktree import prompts
from tasktree.settings import Settings, parse_latency

PROVIDER = "tasktree-offline"
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
    m = _LIST_RE.search(task)
    if not m:
        return task, []
    items = re.split(r",\s*(?:and\s+)?|\s+and\s+", m.group(1).strip())
    items = [re.sub(r"^(?:the|a|an)\s+", "", i.strip(" .;:"), flags=re.I) for i in items]
    items = [i for i in items if i]
    objective = task[: m.start()].strip().rstrip(".,;:") or task
    return objective, items if len(items) >= 2 else []


class OfflineModel:
    """Answers the three steps of the generic agent without a network or weights."""

    def __init__(self, settings: Settings) -> None:
        self.latency = parse_latency(settings.offline_latency)
        self.fanout = settings.offline_fanout
        self.seed = settings.offline_seed

    def reply(self, messages: list[dict[str, Any]]) -> str:
        system = str(messages[0].get("content", "")) if messages else ""
        last = str(messages[-1].get("content", "")) if messages else ""
        task_m = _TASK_RE.search(last) or _TASK_RE.search(system)
        task = task_m.group(1) if task_m else last
        if system.startswith((prompts.DECIDE_TAG, prompts.SINGLE_TAG)):
            return self._decide(task, single=system.startswith(prompts.SINGLE_TAG))
        if last.startswith(prompts.SYNTH_TAG):
            parts = _CONTEXT_RE.findall(last)
            lines = [f"- {key}: {value.splitlines()[-1][:160]}" for key, value in parts]
            return f"{NOTICE}\nSynthesis of {len(parts)} parts for: {_short(task)}\n" + "\n".join(
                lines
            )
        return f"{NOTICE}\nAs {_short(system, 60)}: a response to {_short(task)}"

    def _decide(self, task: str, single: bool) -> str:
        if self.fanout:
            subs = [
                {
                    "requested_persona": f"You are specialist {i} of {self.fanout}.",
                    "task_details": f"Part {i} of {self.fanout}: {_short(task, 120)}",
                }
                for i in range(1, self.fanout + 1)
            ]
            return json.dumps(
                {"decision": "delegate", "reason": "offline fan-out", "sub_tasks": subs}
            )
        objective, items = parts_of(task)
        if items:
            subs = [
                {
                    "requested_persona": f"You are an expert in {item}.",
                    "task_details": f"Produce the {item} for: {objective}.",
                }
                for item in items
            ]
            reason = f"the task names {len(items)} parts"
            return json.dumps({"decision": "delegate", "reason": reason, "sub_tasks": subs})
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


def make_provider(settings: Settings) -> Any:
    """The litellm CustomLLM handler for the offline model (imports litellm)."""
    import litellm
    from litellm.llms.custom_llm import CustomLLM

    model = OfflineModel(settings)

    class Handler(CustomLLM):  # type: ignore[misc]
        def completion(self, *args: Any, **kwargs: Any) -> Any:
            messages = kwargs.get("messages") or []
            pause = model.delay(messages)
            if pause:
                time.sleep(pause)
            text = model.reply(messages)
            prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages)
            completion_tokens = count_tokens(text)
            return litellm.ModelResponse(
                model=kwargs.get("model", ""),
                choices=[
                    {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                usage={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            )

    return Handler()
