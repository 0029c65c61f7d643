"""How trees look in a terminal (Rich) and in a document (markdown). Rich is loaded by the
first view drawn with it: a command that prints no tree never loads it."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tasktree.models import Node, Tree

if TYPE_CHECKING:
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree as RichTree

STATUS_STYLE = {
    "queued": "dim",
    "deciding": "cyan",
    "executing": "cyan",
    "delegated": "blue",
    "synthesizing": "magenta",
    "completed": "green",
    "completed_with_errors": "yellow",
    "failed": "red",
    "cancelled": "yellow",
    "cancelling": "yellow",
    "budget_exhausted": "yellow",
    "interrupted": "yellow",
    "running": "cyan",
}
RUNNING = frozenset({"deciding", "executing", "synthesizing"})
LEGEND = "node  persona — task  status  time  cost  worker"


def short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def money(cost: float, unknown: bool, calls: int = 1) -> str:
    """Cost in USD: "unpriced" where litellm had no price for a call, "-" before any call."""
    if not calls:
        return "-"
    if unknown and not cost:
        return "unpriced"
    return f"${cost:.4f}" + (" + unpriced" if unknown else "")


def size(n: int) -> str:
    """Bytes for people: 812 B, 26.4 KB, 3.1 MB (powers of 1,000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def clock(ts: float | None) -> str:
    """A local wall-clock time, or "-"."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def elapsed(node: Node) -> float:
    if not node.started_at:
        return 0.0
    return max(0.0, (node.finished_at or time.time()) - node.started_at)


def activity(node: Node, now: float | None = None) -> str:
    """What an open node is doing now: waiting for a shared model limit or a retry, or how
    long its call has run."""
    now = now or time.time()
    if node.terminal:
        return ""
    if node.waiting:
        return node.waiting
    if node.retry_at and node.retry_at > now:
        attempt = node.failed_calls + 1
        return f"attempt {attempt} in {node.retry_at - now:.0f}s: {short(node.last_error, 60)}"
    if node.status in RUNNING and node.call_at:
        return f"call {now - node.call_at:.0f}s"
    return ""


def envelope(node: Node, tree: Tree) -> str:
    """A node's envelope as used / allowed (a tree with envelopes), or ""."""
    if not tree.envelopes:
        return ""
    parts = [f"{node.sub_nodes}/{node.env_nodes} nodes"]
    if tree.max_tokens:
        parts.append(f"{node.sub_tokens}/{node.env_tokens} tokens")
    if tree.max_cost:
        parts.append(f"${node.sub_cost:.4f}/${node.env_cost:.4f}")
    return "envelope " + ", ".join(parts)


def node_label(node: Node, tree: Tree | None = None) -> Text:
    from rich.text import Text

    label = Text(f"{node.id} ", style="bold")
    label.append(short(node.persona, 40))
    label.append(" — ", style="dim")
    label.append(short(node.instructions, 60))
    label.append(f"  {node.status}", style=STATUS_STYLE.get(node.status, ""))
    doing = activity(node)
    if doing:
        waiting = "attempt" in doing or node.waiting
        label.append(f" ({doing})", style="yellow" if waiting else "cyan")
    label.append(
        f"  {elapsed(node):.1f}s  {money(node.cost_usd, node.cost_unknown, node.calls)}",
        style="dim",
    )
    if node.worker:
        label.append(f"  {node.worker}", style="dim")
    if node.clamped:
        label.append("  clamped by budget", style="yellow")
    if node.attempts:
        label.append(f"  attempt {len(node.attempts) + 1}", style="yellow")
    if node.after:
        label.append(f"  after {', '.join(node.after)}", style="dim")
    budget = envelope(node, tree) if tree is not None else ""
    if budget:
        label.append(f"  {budget}", style="dim")
    if node.waste_calls:
        label.append(f"  waste {node.waste_calls} call(s)", style="yellow")
    if node.error:
        label.append(f"  {short(node.error, 100)}", style="red")
    return label


def summary(tree: Tree) -> Text:
    from rich.text import Text

    total = max(len(tree.nodes), tree.reserved)
    running = sum(1 for n in tree.nodes if n.status in RUNNING)
    line = Text(f"tree {tree.id}  ", style="bold")
    line.append(tree.status, style=STATUS_STYLE.get(tree.status, ""))
    nodes = (
        f"running {running} / done {tree.done} / total {total}"
        if tree.nodes
        else f"done {tree.done} / total {total}"
    )
    line.append(
        f"  nodes {nodes}  calls {tree.calls}  tokens {tree.tokens}"
        f"  cost {money(tree.cost_usd, tree.cost_unknown, tree.calls)}  elapsed {tree.elapsed:.1f}s"
    )
    if tree.waste_calls:
        line.append(
            f"  waste {tree.waste_calls} calls, {tree.waste_tokens} tokens "
            "(paid for replies nobody could use: a lost claim, a cancelled subtree; "
            "not in the usage above)",
            style="yellow",
        )
    clamps = sum(1 for n in tree.nodes if n.clamped)
    if clamps:
        line.append(f"  budgets clamped {clamps} decomposition(s)", style="yellow")
    return line


def tree_view(tree: Tree) -> Group:
    """A legend, one line per node nested as the tree, and a summary line under it."""
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree as RichTree

    by_parent: dict[str, list[Node]] = {}
    for n in tree.nodes:
        by_parent.setdefault(n.parent_id, []).append(n)
    root = tree.root
    if root is None:
        return Group(summary(tree))
    view = RichTree(node_label(root, tree))

    def add(branch: RichTree, node: Node) -> None:
        for child in by_parent.get(node.id, []):
            add(branch.add(node_label(child, tree)), child)

    add(view, root)
    return Group(Text(LEGEND, style="dim"), view, summary(tree))


def node_fields(node: Node, tree: Tree) -> list[tuple[str, str]]:
    """A node as (field, text) pairs for `show`: times readable, lists as lines, the
    envelope as one line (a tree with envelopes)."""
    rows: list[tuple[str, str]] = []
    for field, value in node.model_dump().items():
        if field.startswith(("env_", "sub_")):
            if field == "env_nodes" and tree.envelopes:
                rows.append(("envelope", envelope(node, tree).removeprefix("envelope ")))
            continue
        if field == "attempts":
            text = "\n".join(attempt_line(a) for a in value) if value else "-"
        elif field.endswith("_at"):
            text = clock(value)
        elif isinstance(value, list):
            text = "\n".join(f"- {v}" for v in value) if value else "-"
        elif isinstance(value, float):
            text = f"{value:.6f}" if field == "cost_usd" else f"{value:.3f}"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        else:
            text = str(value) if value not in ("", None) else "-"
        rows.append((field, text))
    return rows


def attempt_line(attempt: dict[str, Any]) -> str:
    """One replaced attempt of a node: what it was, when it was replaced and why."""
    what = attempt.get("error") or short(str(attempt.get("result", "")), 60) or "no result"
    when = clock(float(attempt.get("replaced_at") or 0) or None)
    return f"- {attempt.get('status', '?')}: {what} (replaced {when}, {attempt.get('why', '')})"


def event_line(event_id: str, ev: dict[str, str]) -> str:
    """A plain line for one event (when output is not a terminal).

    The time is Redis's, from the event's stream id, so lines are in the order they happened."""
    ms = int(event_id.split("-")[0])
    ts = datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S.%f")[:-3]
    if "tree" in ev:
        return f"{ts} tree {ev['tree']}" + (f" ({ev['note']})" if ev.get("note") else "")
    node = ev.get("node")
    if "decision" in ev:
        into = f" into {ev.get('children')} sub-tasks" if ev["decision"] == "delegate" else ""
        why = f" ({ev['note']})" if ev.get("note") else ""
        # At the depth limit the execute step's gate decides: one event says both.
        then = f", executing worker={ev.get('worker')}" if ev.get("status") == "executing" else ""
        return f"{ts} node {node} decided {ev['decision']}{into}{why}{then}"
    if "failed_calls" in ev:
        wait = max(0.0, float(ev.get("retry_at") or 0) - ms / 1000)
        why = ev.get("error", "")
        return (
            f"{ts} node {node} call failed ({ev['failed_calls']}): {why}; next try in {wait:.1f}s"
        )
    if "note" in ev and ev.get("status") not in (
        "completed",
        "failed",
        "cancelled",
        "budget_exhausted",
    ):
        return f"{ts} node {node} note: {ev['note']}"
    skip = ("node", "status", "ts")
    extra = " ".join(f"{k}={v}" for k, v in ev.items() if k not in skip)
    return f"{ts} node {node} {ev.get('status')}" + (f" {extra}" if extra else "")


def markdown(tree: Tree) -> str:
    """A document a person would hand on: the task, the result, then every node."""
    out = [
        f"# {short(tree.task, 80)}",
        "",
        f"Tree `{tree.id}` · status **{tree.status}** · {len(tree.nodes)} nodes · "
        f"{tree.calls} LLM calls · {tree.tokens} tokens · "
        f"cost {money(tree.cost_usd, tree.cost_unknown, tree.calls)}"
        f" · {tree.elapsed:.1f}s",
        "",
        "## Task",
        "",
        tree.task,
        "",
        "## Result",
        "",
        tree.result or "_(no result)_",
        "",
        "## The tree",
        "",
    ]
    for n in tree.nodes:
        out += [
            f"### {n.id} · {short(n.persona, 70)} · {n.status}",
            "",
            f"- Instructions: {n.instructions}",
            f"- Decision: {n.decision or '—'}" + (f" ({n.reason})" if n.reason else ""),
            f"- Model: {n.model or '—'} · calls {n.calls} · tokens {n.tokens} · "
            f"cost {money(n.cost_usd, n.cost_unknown, n.calls)} · worker {n.worker or '—'}",
        ]
        if n.notes:
            out.append(f"- Notes: {'; '.join(n.notes)}")
        if n.error:
            out.append(f"- Error: {n.error}")
        out += ["", n.result or "_(no output)_", ""]
    return "\n".join(out).rstrip() + "\n"
