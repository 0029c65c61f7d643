"""The generic agent: decide, execute, synthesize, over an LLM callable. No Redis, no Celery."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import ValidationError

from tasktree import prompts
from tasktree.models import Decision, Reply
from tasktree.states import Step

# (step, messages, json_mode) -> Reply. The caller gates, records and retries each call.
LLMCall = Callable[[Step, list[dict[str, str]], bool], Reply]

_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass
class Plan:
    """A validated decision, with what had to be corrected on the way recorded in notes."""

    decision: str
    reason: str
    sub_tasks: list[dict[str, Any]] = field(default_factory=list)
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


def same_task_key(persona: str, task: str) -> tuple[str, str]:
    """A (persona, task) pair as the loop guard compares it: case, spacing and trailing
    punctuation do not make a task a different one."""

    def norm(text: str) -> str:
        return " ".join(text.lower().split()).rstrip(" .!;:")

    return norm(persona), norm(task)


#: What clean_sub_tasks records of each kind of sub-task it dropped or changed.
_CLEANED = {
    "blank": "dropped {n} empty sub-task(s)",
    "sibling": "loop_detected: dropped {n} duplicate sub-task(s) of a sibling",
    "ancestor": "loop_detected: dropped {n} sub-task(s) repeating this node's or an ancestor's",
    "trimmed": "trimmed {n} overlong sub-task(s)",
}


def clean_sub_tasks(
    decision: Decision,
    max_children: int,
    persona_limit: int,
    task_limit: int,
    lineage: Callable[[], set[tuple[str, str]]] = set,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Drop blank sub-tasks and loops (a sub-task repeating a sibling, or the task of this
    node or an ancestor: `lineage`, their `same_task_key`s), trim overlong ones, clamp to
    max_children."""
    counts = dict.fromkeys(_CLEANED, 0)
    seen, above = set(), lineage()
    subs: list[dict[str, Any]] = []
    origin: list[int] = []  # each kept sub-task's 1-based position in the model's list
    for index, st in enumerate(cast(list[Any], decision.sub_tasks), 1):  # from agent.proto
        persona, details = st.requested_persona.strip(), st.task_details.strip()
        if len(persona) > persona_limit or len(details) > task_limit:
            counts["trimmed"] += 1
            persona, details = persona[:persona_limit], details[:task_limit]
        key = same_task_key(persona, details)
        drop = "blank" if not details else "ancestor" if key in above else None
        drop = drop or ("sibling" if key in seen else None)
        if drop:
            counts[drop] += 1
            continue
        seen.add(key)
        sub = {"requested_persona": persona, "task_details": details}
        if st.weight > 0:  # its share of an envelope (trees with envelopes)
            sub["weight"] = st.weight
        subs.append(sub)
        origin.append(index)
    notes = [_CLEANED[kind].format(n=n) for kind, n in counts.items() if n]
    if len(subs) > max_children:
        notes.append(f"clamped: {len(subs)} sub-tasks to max_children={max_children}")
        subs, origin = subs[:max_children], origin[:max_children]
    wants = [list(st.depends_on) for st in cast(list[Any], decision.sub_tasks)]
    notes += order(subs, origin, wants)
    return subs, notes


def order(subs: list[dict[str, Any]], origin: list[int], wants: list[list[int]]) -> list[str]:
    """Give each kept sub-task its prerequisites (`after`: 1-based positions among the kept
    ones) from the model's `depends_on`. Positions out of range or a cycle: the node notes it
    and they all run in parallel; a prerequisite that was dropped is let go."""
    if not any(wants):
        return []
    bad = sorted({d for w in wants for d in w if not 1 <= d <= len(wants)})
    if bad:
        return [f"invalid dependencies (no sub-task {bad[0]}): running them in parallel"]
    position = {orig: i for i, orig in enumerate(origin, 1)}
    after = [
        sorted({position[d] for d in wants[orig - 1] if d in position and position[d] != i})
        for i, orig in enumerate(origin, 1)
    ]
    done: set[int] = set()
    while len(done) < len(after):  # peel off the sub-tasks whose prerequisites are done
        ready = {i for i, a in enumerate(after, 1) if i not in done and set(a) <= done}
        if not ready:
            return ["invalid dependencies (a cycle): running them in parallel"]
        done |= ready
    for sub, a in zip(subs, after, strict=True):
        if a:
            sub["after"] = a
    return []


def decide(
    call: LLMCall,
    persona: str,
    task: str,
    *,
    max_children: int,
    persona_limit: int,
    task_limit: int,
    single_call: bool = False,
    lineage: Callable[[], set[tuple[str, str]]] = set,
) -> Plan:
    """One decision call; invalid output gets one repair attempt, then falls back to executing."""
    messages = prompts.decide(persona, task, max_children, single_call)
    reply = call(Step.DECIDE, messages, True)
    notes: list[str] = []
    try:
        decision = parse_decision(reply.text)
    except ValueError as first:
        notes.append(f"invalid decision output ({first}); asked for a repair")
        reply = call(Step.DECIDE, prompts.repair(messages, reply.text, str(first)), True)
        try:
            decision = parse_decision(reply.text)
        except ValueError as second:
            notes.append(f"repair also invalid ({second}); executing instead")
            return Plan("execute", "fallback after invalid decision", notes=notes)
    if decision.decision == "execute":
        answer = decision.answer if single_call and decision.answer else None
        return Plan("execute", decision.reason, answer=answer, notes=notes)
    subs, more = clean_sub_tasks(decision, max_children, persona_limit, task_limit, lineage)
    notes += more
    if len(subs) < 2:
        notes.append(f"delegation with {len(subs)} usable sub-task(s); executing instead")
        return Plan("execute", decision.reason, notes=notes)
    return Plan("delegate", decision.reason, sub_tasks=subs, notes=notes)


def execute(call: LLMCall, persona: str, task: str, context: dict[str, str] | None = None) -> Reply:
    """Do the task in one pass as the persona."""
    return call(Step.EXECUTE, prompts.execute(persona, task, context), False)


def synthesize(
    call: LLMCall, persona: str, task: str, context: dict[str, str], failed: dict[str, str]
) -> Reply:
    """Combine the children's results into one result for the node's objective."""
    return call(Step.SYNTHESIZE, prompts.synthesize(persona, task, context, failed), False)


def assemble(task: str, context: dict[str, str], failed: dict[str, str], why: str) -> str:
    """The result a parent keeps when it may not call the model (cancelled, budget spent):
    the children's outputs, verbatim, so nothing already paid for is lost."""
    lines = [f"[{why}: the children's results, not synthesized]", f"Objective: {task}", ""]
    for key, value in context.items():
        lines += [f"## {key}", value, ""]
    for key, error in failed.items():
        lines += [f"## {key} (no result)", error, ""]
    return "\n".join(lines).rstrip()
