"""What the sweeper asks the store: which trees went quiet, what they wait on that nothing
will deliver. Queries here never write; the writes are named as writes. One clock: Redis's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasktree import keys
from tasktree.models import Node
from tasktree.states import STEP_OF, TREE_IDLE, NodeStatus
from tasktree.store import Store


@dataclass(frozen=True)
class Stuck:
    """What a quiet tree waits on: syntheses that are due, and open nodes no run holds."""

    due: list[str]  # delegated nodes whose children are all closed
    lost: list[Node]  # open nodes with no live claim, not re-driven recently


class Recovery:
    """The sweeper's view of one store, for the trees of that store's node queue."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.r = store.r
        self.queue = store.settings.node_queue

    def now(self) -> float:
        """Redis's clock, the one the event stream ids use."""
        seconds, micros = self.store.call(self.r.time)
        return float(seconds) + float(micros) / 1e6

    def take_sweep_lock(self, seconds: float) -> bool:
        """One worker of this node queue at a time sweeps that queue's trees."""
        key = keys.sweep_lock(self.queue)
        return bool(self.store.call(lambda: self.r.set(key, "1", nx=True, px=int(seconds * 1000))))

    def quiet_trees(self, quiet_for: float) -> tuple[list[str], list[str]]:
        """(running trees of this queue with no event for `quiet_for` seconds, trees in the
        running index that ended or were interrupted)."""
        ids = self.store.call(lambda: self.r.zrange(keys.RUNNING, 0, -1))
        if not ids:
            return [], []

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for tid in ids:
                pipe.hmget(keys.tree(tid), "status", "queue")
                pipe.xrevrange(keys.events(tid), count=1)
            replies: list[Any] = pipe.execute()
            return replies

        replies = self.store.call(read)
        cutoff_ms = (self.now() - quiet_for) * 1000
        stalled, idle = [], []
        for tid, (status, queue), last in zip(ids, replies[::2], replies[1::2], strict=True):
            if status is None or status in TREE_IDLE:
                idle.append(tid)
            elif (queue or "tasktree") != self.queue:
                continue  # another deployment's tree: its own workers sweep it
            elif last and int(last[0][0].split("-")[0]) < cutoff_ms:
                stalled.append(tid)
        return stalled, idle

    def dead_runs(self, lease_seconds: float, limit: int = 200) -> list[tuple[str, str, str]]:
        """Take the runs of this queue whose heartbeat is a lease old off the live index:
        (tree, node, kind) of each taken here (a write: each dead run is taken once)."""
        live = keys.live(self.queue)
        cutoff_ms = int((self.now() - lease_seconds) * 1000)
        members = self.store.call(
            lambda: self.r.zrangebyscore(live, "-inf", cutoff_ms, start=0, num=limit)
        )
        if not members:
            return []

        def take() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for member in members:
                pipe.zrem(live, member)
            replies: list[Any] = pipe.execute()
            return replies

        taken = []  # a member another sweep removed first is its to re-send
        for member, removed in zip(members, self.store.call(take), strict=True):
            parsed = keys.parse_live_member(member) if removed else None
            if parsed is not None:
                taken.append(parsed[:3])
        return taken

    def forget(self, tree_ids: list[str]) -> None:
        """Take trees out of the running index; an ended tree's id goes to the expiring index
        (when its keys expire), a vanished tree's out of the trees index too."""
        if not tree_ids:
            return

        now, pttls = self.now(), self._pttls(tree_ids)
        expiring = {t: now + ms / 1000 for t, ms in zip(tree_ids, pttls, strict=True) if ms > 0}
        gone = [t for t, ms in zip(tree_ids, pttls, strict=True) if ms == -2]

        def write() -> None:
            pipe = self.r.pipeline(transaction=False)
            pipe.zrem(keys.RUNNING, *tree_ids)
            if expiring:
                pipe.zadd(keys.EXPIRING, expiring)
            if gone:
                pipe.zrem(keys.TREES, *gone)
            pipe.execute()

        self.store.call(write)

    def _pttls(self, tree_ids: list[str]) -> list[int]:
        """Each tree key's time to live in ms (-1: kept, -2: gone), in one round trip."""

        def read() -> list[int]:
            pipe = self.r.pipeline(transaction=False)
            for tid in tree_ids:
                pipe.pttl(keys.tree(tid))
            replies: list[int] = pipe.execute()
            return replies

        return self.store.call(read)

    def expire_index(self, limit: int = 500) -> int:
        """Take the trees whose keys expired out of the trees index; returns how many."""
        due = self.store.call(
            lambda: self.r.zrangebyscore(keys.EXPIRING, "-inf", self.now(), start=0, num=limit)
        )
        if not due:
            return 0

        now, pttls = self.now(), self._pttls(due)
        gone = [t for t, ms in zip(due, pttls, strict=True) if ms == -2]
        kept = [t for t, ms in zip(due, pttls, strict=True) if ms == -1]  # retried since
        # Not expired yet (the clocks differ): looked at again when it should be.
        later = {t: now + ms / 1000 for t, ms in zip(due, pttls, strict=True) if ms > 0}

        def write() -> None:
            pipe = self.r.pipeline(transaction=False)
            if gone:
                pipe.zrem(keys.TREES, *gone)
            if gone or kept:
                pipe.zrem(keys.EXPIRING, *gone, *kept)
            if later:
                pipe.zadd(keys.EXPIRING, later)
            pipe.execute()

        self.store.call(write)
        return len(gone)

    def stuck(self, tree_id: str, redrive_after: float) -> Stuck:
        """What a quiet tree is waiting on that nothing will deliver."""
        tree = self.store.tree(tree_id)
        by_id = {n.id: n for n in tree.nodes}
        due = [
            n.id
            for n in tree.nodes
            if n.status == NodeStatus.DELEGATED
            and all(by_id[c].terminal for c in n.children if c in by_id)
        ]
        open_nodes = [n for n in tree.nodes if n.status in STEP_OF]
        if not open_nodes:
            return Stuck(due, [])

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for n in open_nodes:
                pipe.exists(keys.claim(tree_id, n.id, STEP_OF[n.status]))
                pipe.hget(keys.node(tree_id, n.id), "redriven_at")
            replies: list[Any] = pipe.execute()
            return replies

        replies = self.store.call(read)
        now = self.now()
        lost = [
            n
            for n, held, last in zip(open_nodes, replies[::2], replies[1::2], strict=True)
            if not held and now - float(last or 0) > redrive_after
        ]
        return Stuck(due, lost)

    def mark_redriven(self, tree_id: str, nodes: list[Node]) -> None:
        """Record that these nodes' messages were sent again now (Redis's clock)."""
        if not nodes:
            return
        now = self.now()

        def mark() -> None:
            pipe = self.r.pipeline(transaction=False)
            for n in nodes:
                pipe.hset(keys.node(tree_id, n.id), "redriven_at", now)
            pipe.execute()

        self.store.call(mark)
