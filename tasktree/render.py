"""How trees look in a terminal (Rich) and in a document (markdown)."""

from __future__ import annotations

import time
from datetime import datetime

from rich.console import Group
from rich.text import Text
from rich.tree import Tree as RichTree

from tasktree.models import Node, Tree

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
    "running": "cyan",
}


def short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def money(cost: float, unknown: bool) -> str:
    """Cost in USD; calls litellm could not price add nothing and are marked."""
    if unknown and not cost:
        return "unpriced"
    return f"${cost:.4f}" + (" + unpriced" if unknown else "")


def elapsed(node: Node) -> float:
    if not node.started_at:
        return 0.0
    return max(0.0, (node.finished_at or time.time()) - node.started_at)


def node_label(node: Node) -> Text:
    label = Text(f"{node.id} ", style="bold")
    label.append(short(node.persona, 50))
    label.append(f"  {node.status}", style=STATUS_STYLE.get(node.status, ""))
    label.append(f"  {elapsed(node):.1f}s  {money(node.cost_usd, node.cost_unknown)}", style="dim")
    if node.worker:
        label.append(f"  {node.worker}", style="dim")
    if node.error:
        label.append(f"  {short(node.error, 80)}", style="red")
    return label


def summary(tree: Tree) -> Text:
    total = max(len(tree.nodes), tree.reserved)
    line = Text(f"tree {tree.id}  ", style="bold")
    line.append(tree.status, style=STATUS_STYLE.get(tree.status, ""))
    line.append(
        f"  nodes {tree.done}/{total}  calls {tree.calls}  tokens {tree.tokens}"
        f"  cost {money(tree.cost_usd, tree.cost_unknown)}  elapsed {tree.elapsed:.1f}s"
    )
    return line


def tree_view(tree: Tree) -> Group:
    """One line per node, nested as the tree, with a summary line under it."""
    by_parent: dict[str, list[Node]] = {}
    for n in tree.nodes:
        by_parent.setdefault(n.parent_id, []).append(n)
    root = tree.root
    if root is None:
        return Group(summary(tree))
    view = RichTree(node_label(root))

    def add(branch: RichTree, node: Node) -> None:
        for child in by_parent.get(node.id, []):
            add(branch.add(node_label(child)), child)

    add(view, root)
    return Group(view, summary(tree))


def event_line(event_id: str, ev: dict[str, str]) -> str:
    """A plain line for one event (when output is not a terminal)."""
    ts = datetime.fromtimestamp(float(ev.get("ts", "0") or 0)).strftime("%H:%M:%S.%f")[:-3]
    if "tree" in ev:
        return f"{ts} tree {ev['tree']}"
    extra = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("node", "status", "ts"))
    return f"{ts} node {ev.get('node')} {ev.get('status')}" + (f" {extra}" if extra else "")


def markdown(tree: Tree) -> str:
    """A document a person would hand on: the task, the result, then every node."""
    out = [
        f"# {short(tree.task, 80)}",
        "",
        f"Tree `{tree.id}` · status **{tree.status}** · {len(tree.nodes)} nodes · "
        f"{tree.calls} LLM calls · {tree.tokens} tokens · "
        f"cost {money(tree.cost_usd, tree.cost_unknown)}"
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
            f"cost {money(n.cost_usd, n.cost_unknown)} · worker {n.worker or '—'}",
        ]
        if n.notes:
            out.append(f"- Notes: {'; '.join(n.notes)}")
        if n.error:
            out.append(f"- Error: {n.error}")
        out += ["", n.result or "_(no output)_", ""]
    return "\n".join(out).rstrip() + "\n"
