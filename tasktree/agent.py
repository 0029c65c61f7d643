"""The generic agent: decide, execute, synthesize, over an LLM callable. No Redis, no Celery."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import ValidationError

from tasktree import prompts
from tasktree.llm import Reply
from tasktree.models import Decision

# (step, messages, json_mode) -> Reply. The caller gates, records and retries each call.
LLMCall = Callable[[str, list[dict[str, str]], bool], Reply]

_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass
class Plan:
    """A validated decision, with what had to be corrected on the way recorded in notes."""

    decision: str
    reason: str
    sub_tasks: list[dict[str, str]] = field(default_factory=list)
    answer: str | None = None
    notes: list[str] = field(default_factory=list)


def parse_decision(text: str) -> Decision:
    """Parse the model's JSON decision (tolerating a code fence); raises ValueError."""
    body = text.strip()
    m = _FENCE_RE.match(body)
    if m:
        body = m.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg}") from None
    try:
        return Decision.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "decision"
        raise ValueError(f"wrong shape at {where}: {err['msg']}") from None


def clean_sub_tasks(
    decision: Decision, max_children: int, persona_limit: int, task_limit: int
) -> tuple[list[dict[str, str]], list[str]]:
    """Drop blank and duplicate sub-tasks, trim overlong ones, clamp to max_children."""
    notes: list[str] = []
    seen: set[tuple[str, str]] = set()
    subs: list[dict[str, str]] = []
    dropped_blank = dropped_dup = trimmed = 0
    for st in cast(list[Any], decision.sub_tasks):  # built from agent.proto
        persona, details = st.requested_persona.strip(), st.task_details.strip()
        if not details:
            dropped_blank += 1
            continue
        if len(persona) > persona_limit or len(details) > task_limit:
            trimmed += 1
            persona, details = persona[:persona_limit], details[:task_limit]
        key = (persona, details)
        if key in seen:
            dropped_dup += 1
            continue
        seen.add(key)
        subs.append({"requested_persona": persona, "task_details": details})
    if dropped_blank:
        notes.append(f"dropped {dropped_blank} empty sub-task(s)")
    if dropped_dup:
        notes.append(f"dropped {dropped_dup} duplicate sub-task(s)")
    if trimmed:
        notes.append(f"trimmed {trimmed} overlong sub-task(s)")
    if len(subs) > max_children:
        notes.append(f"clamped: {len(subs)} sub-tasks to max_children={max_children}")
        subs = subs[:max_children]
    return subs, notes


def decide(
    call: LLMCall,
    persona: str,
    task: str,
    *,
    max_children: int,
    persona_limit: int,
    task_limit: int,
    single_call: bool = False,
) -> Plan:
    """One decision call; invalid output gets one repair attempt, then falls back to executing."""
    messages = prompts.decide(persona, task, max_children, single_call)
    reply = call("decide", messages, True)
    notes: list[str] = []
    try:
        decision = parse_decision(reply.text)
    except ValueError as first:
        notes.append(f"invalid decision output ({first}); asked for a repair")
        reply = call("decide", prompts.repair(messages, reply.text, str(first)), True)
        try:
            decision = parse_decision(reply.text)
        except ValueError as second:
            notes.append(f"repair also invalid ({second}); executing instead")
            return Plan("execute", "fallback after invalid decision", notes=notes)
    if decision.decision == "execute":
        answer = decision.answer if single_call and decision.answer else None
        return Plan("execute", decision.reason, answer=answer, notes=notes)
    subs, more = clean_sub_tasks(decision, max_children, persona_limit, task_limit)
    notes += more
    if len(subs) < 2:
        notes.append(f"delegation with {len(subs)} usable sub-task(s); executing instead")
        return Plan("execute", decision.reason, notes=notes)
    return Plan("delegate", decision.reason, sub_tasks=subs, notes=notes)


def execute(call: LLMCall, persona: str, task: str, context: dict[str, str] | None = None) -> Reply:
    """Do the task in one pass as the persona."""
    return call("execute", prompts.execute(persona, task, context), False)


def synthesize(
    call: LLMCall, persona: str, task: str, context: dict[str, str], failed: dict[str, str]
) -> Reply:
    """Combine the children's results into one result for the node's objective."""
    return call("synthesize", prompts.synthesize(persona, task, context, failed), False)


def assemble(task: str, context: dict[str, str], failed: dict[str, str], why: str) -> str:
    """The result a parent keeps when it may not call the model (cancelled, budget spent):
    the children's outputs, verbatim, so nothing already paid for is lost."""
    lines = [f"[{why}: the children's results, not synthesized]", f"Objective: {task}", ""]
    for key, value in context.items():
        lines += [f"## {key}", value, ""]
    for key, error in failed.items():
        lines += [f"## {key} (no result)", error, ""]
    return "\n".join(lines).rstrip()
