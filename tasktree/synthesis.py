"""A delegated node's last step: synthesize from what its children stored, or, when it may
not call the model (cancelled, budget spent), keep their results verbatim."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasktree import agent
from tasktree.models import NodeResult
from tasktree.states import NodeStatus, Step, Verdict

if TYPE_CHECKING:
    from tasktree.runner import NodeRun, Outcome


def children_of(run: NodeRun) -> tuple[list[NodeResult], dict[str, str], dict[str, str]]:
    """The node's children, their results by label, and why the others have none."""
    ids = [c for c in run.node.get("children", "").split(",") if c]
    children = run.store.results(run.tree_id, ids)
    done = {c.label: c.result for c in children if c.status == NodeStatus.COMPLETED}
    missing = {c.label: c.error or c.status for c in children if c.status != NodeStatus.COMPLETED}
    return children, done, missing


def synthesize(run: NodeRun) -> Outcome:
    """The chord callback's body."""
    from tasktree.runner import Retry

    children, context, failed = children_of(run)
    if not children or any(not c.terminal for c in children):
        # The chord fired early (a duplicate delivery counted twice): wait for the rest.
        return Retry(0.5, reason="children still open")
    task, persona = run.node["instructions"], run.node["persona"]
    failures = [c for c in children if c.status == NodeStatus.FAILED]
    if failures and run.tree.get("on_child_failure") == "fail":
        first = failures[0]
        why = f"child {first.id} failed: {first.error}"
        return run.finish(NodeStatus.FAILED, error=why, step=Step.SYNTHESIZE)
    if not context:
        return _close_empty(run, {c.status for c in children}, failed)
    reply = agent.synthesize(run.call, persona, task, context, failed)
    return run.finish(
        NodeStatus.COMPLETED, result=reply.text, context_keys=list(context), step=Step.SYNTHESIZE
    )


def _close_empty(run: NodeRun, statuses: set[str], failed: dict[str, str]) -> Outcome:
    """No child produced a result: close the parent with the reason, nothing to synthesize."""
    if NodeStatus.FAILED in statuses:
        status, why = NodeStatus.FAILED, "every child failed"
    elif NodeStatus.BUDGET_EXHAUSTED in statuses:
        status, why = NodeStatus.BUDGET_EXHAUSTED, "budget spent before any child produced a result"
    else:
        status, why = NodeStatus.CANCELLED, "tree cancelled before any child produced a result"
    return run.finish(
        status,
        error=why if status == NodeStatus.FAILED else "",
        result=agent.assemble(run.node["instructions"], {}, failed, why),
        note=why,
        step=Step.SYNTHESIZE,
    )


def close_without_model(run: NodeRun, verdict: str, detail: str) -> Outcome:
    """The gate refused the synthesis call: keep the children's results, not synthesized."""
    _, context, failed = children_of(run)
    cancelled = verdict == Verdict.CANCELLED
    status = NodeStatus.CANCELLED if cancelled else NodeStatus.BUDGET_EXHAUSTED
    why = "tree cancelled" if cancelled else f"{detail} spent"
    return run.finish(
        status,
        result=agent.assemble(run.node["instructions"], context, failed, why),
        note=f"{why}: kept the children's results without a synthesis call",
        step=Step.SYNTHESIZE,
        context_keys=list(context),
    )
