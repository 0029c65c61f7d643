"""Control of a whole tree: cancel it, interrupt it and resume it, end it when nobody is left
to, delete it; each one atomic in Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tasktree import keys
from tasktree.errors import InputError, NotFoundError, StoreError
from tasktree.models import Tree
from tasktree.states import TREE_IDLE, TREE_TERMINAL, NodeStatus, Step, TreeStatus
from tasktree.store import Freed, Store


class Control:
    """Tree-level transitions on one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def cancel(self, tree_id: str) -> str:
        """Stop a running tree: no LLM call starts after this returns; queued nodes close now."""
        tree_keys = [keys.tree(tree_id), keys.events(tree_id)]
        res = self.store.script("cancel", tree_keys, [time.time()])
        if res[0] == "MISSING":
            raise NotFoundError(f"no tree {tree_id}")
        if res[0] == "NOOP" and res[1] == TreeStatus.INTERRUPTED:  # nobody works on it: end it
            return self.settle(tree_id, "cancelled by user")
        if res[0] == "OK":
            for nid in self.store.call(lambda: self.store.r.lrange(keys.nodes(tree_id), 0, -1)):
                self.store.finish(
                    tree_id,
                    nid,
                    NodeStatus.CANCELLED,
                    only_if=NodeStatus.QUEUED,
                    note="cancelled by user",
                )
        return str(res[1])

    def cancel_subtree(self, tree_id: str, node_id: str) -> list[str]:
        """Cancel one node and everything under it; the rest of the tree goes on, and the
        parent synthesizes from what it has. No model call starts in the subtree after this
        returns: its open nodes close now, the gate refuses closed nodes, and a decision or
        result that comes back from a call in flight is refused and recorded as waste.
        Returns the ids it closed."""
        if node_id == keys.ROOT:
            self.cancel(tree_id)
            return [keys.ROOT]
        tree = self.store.tree(tree_id)  # NotFoundError
        if tree.status != TreeStatus.RUNNING:
            raise InputError(f"tree {tree_id} is {tree.status}: only a running tree's nodes cancel")
        if not any(n.id == node_id for n in tree.nodes):
            raise InputError(f"tree {tree_id} has no node {node_id}")
        closed: list[str] = []
        note = f"cancelled by user (subtree {node_id})"
        for _ in range(20):  # a decision stored meanwhile may have added children: read again
            under = [n for n in tree.nodes if n.id == node_id or n.id.startswith(node_id + ".")]
            open_ = sorted((n for n in under if not n.terminal), key=lambda n: -n.depth)
            if not open_:
                return closed
            for n in open_:  # leaves first, the subtree's root last
                if self.store.finish(tree_id, n.id, NodeStatus.CANCELLED, note=note) == "OK":
                    closed.append(n.id)
            tree = self.store.tree(tree_id)
        raise StoreError(f"subtree {node_id} of tree {tree_id} kept growing; try again")

    def interrupt(self, tree_id: str, note: str = "") -> str:
        """Stop all work on a running tree, keeping what it stored; returns the tree's status.
        Calls in flight finish and are stored; `resume` continues the tree."""
        tree_keys = [keys.tree(tree_id), keys.events(tree_id)]
        res = self.store.script("interrupt", tree_keys, [time.time(), note])
        if res[0] == "MISSING":
            raise NotFoundError(f"no tree {tree_id}")
        return str(res[1])

    def _with_nodes(
        self,
        name: str,
        tree_id: str,
        per_node: Callable[[str], list[str]],
        args: list[Any],
        more: tuple[str, ...] = (),
    ) -> list[Any]:
        """Run a script over every node of a tree, retrying if a node is added meanwhile.
        Its keys: tree, events, nodes, the `more` keys, then each node's `per_node` keys."""
        for _ in range(10):
            ids = self.store.call(lambda: self.store.r.lrange(keys.nodes(tree_id), 0, -1))
            node_keys = [k for nid in ids for k in per_node(nid)]
            res: list[Any] = self.store.script(
                name,
                [keys.tree(tree_id), keys.events(tree_id), keys.nodes(tree_id), *more, *node_keys],
                args,
            )
            if res[0] == "MISSING":
                raise NotFoundError(f"no tree {tree_id}")
            if res[0] != "RETRY":
                return res
        raise StoreError(f"tree {tree_id} kept changing; try again")

    def resume(self, tree_id: str) -> int:
        """Make an interrupted tree run again on this store's queues; returns its open nodes.

        Raises InputError when the tree is not interrupted."""
        queues = (self.store.settings.node_queue, self.store.settings.synth_queue)
        res = self._reopen(tree_id, [], queues, "resumed", {}, resume=True)
        if res[0] == "NOOP":
            raise InputError(f"tree {tree_id} is {res[1]}, not interrupted: nothing to resume")
        return int(res[1])

    def settle(self, tree_id: str, note: str = "cancelled: nobody was left to finish it") -> str:
        """End a cancelling (or interrupted) tree now: open nodes close as cancelled."""
        res = self._with_nodes(
            "settle",
            tree_id,
            lambda nid: [keys.node(tree_id, nid)],
            [time.time(), note, keys.node_prefix(tree_id)],
            more=(keys.calls(tree_id),),
        )
        return str(res[1])

    def retry(
        self,
        tree_id: str,
        node_ids: list[str],
        queues: tuple[str, str],
        updates: dict[str, Any] | None = None,
        descendants: bool = True,
    ) -> list[str]:
        """Open an ended tree again in place: the named nodes and their descendants (none
        named: every node without a result), and the ancestors that synthesize from them.
        Everything else keeps what it stored. `updates`: tree fields to set (budgets,
        model). Returns the reopened ids; raises InputError when there is nothing to retry."""
        tree = self.store.tree(tree_id)  # NotFoundError
        if tree.status == TreeStatus.INTERRUPTED:
            raise InputError(f"tree {tree_id} is interrupted: continue it with tasktree resume")
        if tree.status not in TREE_TERMINAL:
            raise InputError(f"tree {tree_id} is {tree.status}, not ended: nothing to retry yet")
        ordered = to_reopen(tree, node_ids, descendants)

        why = f"retry of {', '.join(node_ids)}" if node_ids else "retry of the unfinished nodes"
        if not descendants:
            why = "continued after the budget was raised"
        res = self._reopen(tree_id, ordered, queues, why, updates or {}, resume=False)
        if res[0] == "NOOP":
            raise InputError(f"tree {tree_id} is {res[1]}, not ended")
        return ordered

    def _reopen(
        self,
        tree_id: str,
        ordered: list[str],
        queues: tuple[str, str],
        why: str,
        updates: dict[str, Any],
        resume: bool,
    ) -> list[Any]:
        """One reopen.lua for both: `retry` (the `ordered` nodes of an ended tree) and
        `resume` (every open node of an interrupted one). The tree runs again on `queues`."""

        def per_node(nid: str) -> list[str]:
            return [
                keys.node(tree_id, nid),
                *(keys.claim(tree_id, nid, s) for s in Step),
                keys.synthesis_sent(tree_id, nid),
            ]

        args = [time.time(), *queues, why, json.dumps(ordered), json.dumps(updates)]
        res = self._with_nodes(
            "reopen",
            tree_id,
            per_node,
            [*args, "1" if resume else "0"],
            more=(keys.calls(tree_id),),
        )
        if res[0] != "NOOP":
            self.store.call(lambda: self.store.r.zadd(keys.RUNNING, {tree_id: time.time()}))
        return list(res)

    def raise_budget(self, tree_id: str, add: dict[str, float]) -> str:
        """Raise a tree's budgets by `add` (max_nodes, max_cost, max_tokens, max_depth) in one
        step; returns the tree's status. A cost or token budget it does not have is refused."""
        if not add:
            raise InputError(
                "give at least one of --add-nodes, --add-cost, --add-tokens, --add-depth"
            )
        tree_keys = [keys.tree(tree_id), keys.events(tree_id), keys.nodes(tree_id)]
        args = [time.time(), json.dumps(add), keys.node_prefix(tree_id)]
        res = self.store.script("topup", tree_keys, args)
        if res[0] == "MISSING":
            raise NotFoundError(f"no tree {tree_id}")
        if res[0] == "NONE":
            what = "cost" if res[1] == "max_cost" else "token"
            raise InputError(f"tree {tree_id} has no {what} budget to raise (it has no limit)")
        return str(res[1])

    def delete(self, tree_id: str, force: bool = False) -> Freed:
        """Remove a tree and all it stored. A tree being worked on is refused, unless `force`:
        then it is cancelled first (its running calls end without writing anything)."""
        status = self.store.tree(tree_id, with_nodes=False).status  # NotFoundError
        if status not in TREE_IDLE:
            if not force:
                raise InputError(
                    f"tree {tree_id} is {status}: cancel it first, or delete it with --force"
                )
            self.cancel(tree_id)
        return self.store.delete_tree(tree_id)

    def prune(self, older_than: float, statuses: frozenset[str] = TREE_TERMINAL) -> Freed:
        """Delete the trees in `statuses` (never one being worked on) that ended more than
        `older_than` seconds ago; returns what that freed."""
        if not statuses <= TREE_IDLE:
            busy = ", ".join(sorted(statuses - TREE_IDLE))
            raise InputError(f"prune removes only trees nobody works on, not {busy} ones")
        freed = Freed(0, 0, 0)
        for tid in self.store.ended_before(time.time() - older_than, statuses):
            freed += self.store.delete_tree(tid)
        return freed

    def abandon_open_trees(self) -> list[str]:
        """Mark every running tree interrupted (and end cancelling ones): for an embedded store
        that no process works on. Returns the ids it changed."""
        changed = []
        for tid in self.store.call(lambda: self.store.r.zrange(keys.RUNNING, 0, -1)):
            status = self.store.call(lambda t=tid: self.store.r.hget(keys.tree(t), "status"))  # type: ignore[misc]
            if status == TreeStatus.RUNNING:
                self.interrupt(tid)
                changed.append(tid)
            elif status == TreeStatus.CANCELLING:
                self.settle(tid)
                changed.append(tid)
        return changed


def to_reopen(tree: Tree, node_ids: list[str], descendants: bool = True) -> list[str]:
    """A retry's nodes, in tree order: the named ones and (with `descendants`) everything
    under them (none named: every node without a result), and their ancestors, which
    synthesize again."""
    by_id = {n.id: n for n in tree.nodes}
    for nid in node_ids:
        if nid not in by_id:
            raise InputError(f"tree {tree.id} has no node {nid}")
    if node_ids:
        under = descendants
        rerun = {n for n in by_id for m in node_ids if n == m or (under and n.startswith(m + "."))}
    else:
        rerun = {n.id for n in tree.nodes if n.status != NodeStatus.COMPLETED}
    if not rerun:
        raise InputError(
            f"tree {tree.id} completed: every node has its result; name the nodes to run again"
        )
    reopen = rerun | {a for nid in rerun for a in keys.ancestors(nid)}
    return [n.id for n in tree.nodes if n.id in reopen]
