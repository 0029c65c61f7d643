"""The prompt templates of the generic agent: decide, execute, synthesize, repair."""

from __future__ import annotations

import json

# Step tags: the first token of the step's message, so logs and the offline model can tell steps apart.
DECIDE_TAG = "[tasktree:decide]"
SINGLE_TAG = "[tasktree:single]"
SYNTH_TAG = "[tasktree:synthesize]"

_DECIDE_RULES = """Answer with one JSON object and nothing else:
{{"decision": "execute" | "delegate", "reason": "<one sentence>",{answer} "sub_tasks": [{{"requested_persona": "<system prompt for the specialist>", "task_details": "<self-contained instructions>", "depends_on": [<1-based numbers of the sub-tasks it needs first; usually empty>], "weight": <optional: its relative share of the budget, e.g. 2 for twice an even share>}}]}}
Choose "execute" when one specialist with the persona below can do the task well in one pass.
Choose "delegate" when the task spans several domains or steps, or is too broad. Then give between 2 and {max_children} sub-tasks that are self-contained and together cover the whole task. They run in parallel and cannot see each other, except that a sub-task may name in "depends_on" the sub-tasks that must finish first: it then starts after them and receives their results. Use it only for a real order (design before code). Leave "sub_tasks" empty when you execute."""

Message = dict[str, str]


def _task_block(persona: str, task: str) -> str:
    return f"Persona:\n<persona>\n{persona}\n</persona>\n\nTask:\n<task>\n{task}\n</task>"


def decide(persona: str, task: str, max_children: int, single_call: bool = False) -> list[Message]:
    """The decomposition meta-prompt: execute alone, or delegate to sub-tasks (JSON)."""
    tag = SINGLE_TAG if single_call else DECIDE_TAG
    answer = ' "answer": "<your complete answer, when you execute>",' if single_call else ""
    system = (
        f"{tag} You decide how a task is handled in a tree of specialist agents.\n"
        + _DECIDE_RULES.format(max_children=max_children, answer=answer)
    )
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": _task_block(persona, task)},
    ]


def repair(messages: list[Message], bad_output: str, error: str) -> list[Message]:
    """One more turn asking for valid JSON after an invalid decision."""
    return [
        *messages,
        {"role": "assistant", "content": bad_output[:4000]},
        {
            "role": "user",
            "content": f"That reply was not valid ({error}). Answer again with only the JSON object.",
        },
    ]


def _context_block(context: dict[str, str]) -> str:
    return "\n\n".join(
        f"<context key={json.dumps(k)}>\n{v}\n</context>" for k, v in context.items()
    )


def execute(persona: str, task: str, context: dict[str, str] | None = None) -> list[Message]:
    """Persona as the system message, the task (and any context data) as the user message."""
    user = f"<task>\n{task}\n</task>"
    if context:
        user += "\n\nContext:\n" + _context_block(context)
    return [{"role": "system", "content": persona}, {"role": "user", "content": user}]


def synthesize(
    persona: str, task: str, context: dict[str, str], failed: dict[str, str]
) -> list[Message]:
    """The parent's objective plus every child's result as context: write one cohesive result."""
    user = (
        f"{SYNTH_TAG} Your objective:\n<task>\n{task}\n</task>\n\n"
        "Specialists each worked on one part of it; their results follow as context. "
        "Combine them into one cohesive, complete result for the objective. "
        "Do not mention the specialists."
    )
    if failed:
        parts = "; ".join(f"{k}: {v}" for k, v in failed.items())
        user += f"\nThese parts failed and have no result; say what is missing: {parts}"
    user += "\n\nContext:\n" + _context_block(context)
    return [{"role": "system", "content": persona}, {"role": "user", "content": user}]
