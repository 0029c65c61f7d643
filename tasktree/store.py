"""The tree in Redis: create, gate LLM calls, atomic transitions, read, follow, cancel."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis

from tasktree import keys
from tasktree.errors import InputError, NotFoundError, StoreError
from tasktree.models import TREE_TERMINAL, Node, Tree, TreeSpec
from tasktree.settings import Settings

T = TypeVar("T")


def new_tree_id() -> str:
    """A 16-hex-digit id that sorts by creation time (ms) and is unguessable enough."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)[:5]}"


def check_tree_id(tree_id: str) -> str:
    """Reject ids that are not ours before they reach a key name."""
    if not isinstance(tree_id, str) or not keys.TREE_ID_RE.match(tree_id):
        raise InputError(f"invalid tree id {tree_id!r}: expected 16 hex digits")
    return tree_id


def check_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not keys.NODE_ID_RE.match(node_id):
        raise InputError(f"invalid node id {node_id!r}: expected a path such as 0.2.1")
    return node_id


def connect(url: str, settings: Settings | None = None, patient: bool = True) -> redis.Redis:
    """A Redis client for the tree state, from a redis://, rediss://, unix:// or sentinel URL.

    A patient client retries connection errors for `redis_retry_seconds` (a Redis restart)."""
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    opts: dict[str, Any] = {"decode_responses": True, "health_check_interval": 30}
    opts["socket_connect_timeout"] = 3
    seconds = settings.redis_retry_seconds if settings and patient else 0.0
    opts["retry"] = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), int(seconds / 0.75))
    opts["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError]
    if url.startswith("rediss://") and settings is not None:
        opts["ssl_cert_reqs"] = settings.redis_ssl_cert_reqs
    if url.startswith(("sentinel://", "sentinels://")):
        return _sentinel_client(url, opts)
    try:
        return redis.Redis.from_url(url, **opts)
    except ValueError as e:
        raise StoreError(f"invalid Redis URL: {e}") from None


def _sentinel_client(url: str, opts: dict[str, Any]) -> redis.Redis:
    """sentinel://[:pw@]host:port[;sentinel://host:port...]/db?master_name=NAME (kombu's form)."""
    from urllib.parse import parse_qs, urlparse

    from redis.sentinel import Sentinel

    parts = url.split(";")
    hosts, password, db, master = [], None, 0, "mymaster"
    for part in parts:
        u = urlparse(part)
        hosts.append((u.hostname or "127.0.0.1", u.port or 26379))
        password = u.password or password
        if u.path.strip("/"):
            db = int(u.path.strip("/"))
        master = parse_qs(u.query).get("master_name", [master])[0]
    sentinel = Sentinel(hosts, socket_timeout=5)
    return sentinel.master_for(master, password=password, db=db, **opts)


def _load_script(name: str) -> str:
    lib = resources.files("tasktree.lua").joinpath("_lib.lua").read_text()
    return lib + "\n" + resources.files("tasktree.lua").joinpath(f"{name}.lua").read_text()


@dataclass(frozen=True)
class Gate:
    """The answer of the gate before an LLM call."""

    verdict: str  # OK, DONE, BUSY, CANCELLED, EXHAUSTED, MISSING
    detail: str = ""


class Store:
    """The tree state in Redis. All writes that belong together are one script or one MULTI."""

    def __init__(self, client: redis.Redis, settings: Settings, url: str = "") -> None:
        self.r = client
        self.settings = settings
        self.url = url
        self._scripts = {
            name: client.register_script(_load_script(name))
            for name in ("begin", "gate", "record", "decide", "finish", "cancel")
        }

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None) -> Store:
        url = url or settings.redis_url
        if not url:
            raise StoreError("no Redis URL: set TASKTREE_REDIS_URL")
        return cls(connect(url, settings), settings, url)

    def _run(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.AuthenticationError as e:
            raise StoreError(f"Redis refused the credentials: {e}") from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreError(f"cannot reach Redis: {e}") from None
        except redis.ResponseError as e:
            raise StoreError(f"Redis error: {e}") from None

    def _script(self, name: str, keys_: list[str], args: list[Any]) -> list[Any]:
        return self._run(lambda: self._scripts[name](keys=keys_, args=args))

    def ping(self) -> None:
        """Fail fast (no retries) when Redis cannot be reached at all."""
        quick = connect(self.url, self.settings, patient=False) if self.url else self.r
        self._run(quick.ping)

    # -- writes -------------------------------------------------------------------------

    def create_tree(self, spec: TreeSpec, tree_id: str | None = None) -> str:
        """Write a tree and its queued root in one transaction; returns the tree id."""
        tid = tree_id or new_tree_id()
        now = time.time()
        tree = {
            "id": tid,
            "task": spec.task,
            "persona": spec.persona,
            "status": "running",
            "model": spec.model or "",
            "created_at": now,
            "max_depth": spec.max_depth,
            "max_children": spec.max_children,
            "max_nodes": spec.max_nodes,
            "max_cost": spec.max_cost,
            "max_tokens": spec.max_tokens,
            "on_child_failure": spec.on_child_failure,
            "single_call": int(spec.single_call),
            "reserved": 1,
            "done": 0,
            "events_maxlen": self.settings.events_maxlen,
        }
        root = {
            "id": keys.ROOT,
            "parent": "",
            "depth": 0,
            "persona": spec.persona,
            "instructions": spec.task,
            "status": "queued",
            "created_at": now,
        }

        def write() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(keys.tree(tid), mapping=tree)
            pipe.hset(keys.node(tid, keys.ROOT), mapping=root)
            pipe.rpush(keys.nodes(tid), keys.ROOT)
            pipe.xadd(keys.events(tid), {"tree": "running", "ts": now})
            pipe.xadd(keys.events(tid), {"node": keys.ROOT, "status": "queued", "ts": now})
            pipe.execute()
            # The indexes live outside the tree's slot, so they are written after the tree.
            self.r.zadd(keys.TREES, {tid: now})
            self.r.zadd(keys.RUNNING, {tid: now})

        self._run(write)
        return tid

    def delete_tree(self, tree_id: str) -> None:
        """Remove a tree that could not be enqueued, so nothing is left half-written."""

        def delete() -> None:
            ids = self.r.lrange(keys.nodes(tree_id), 0, -1)
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(keys.tree(tree_id), keys.nodes(tree_id), keys.events(tree_id))
            for nid in ids:
                pipe.delete(keys.node(tree_id, nid))
            pipe.execute()
            self.r.zrem(keys.TREES, tree_id)
            self.r.zrem(keys.RUNNING, tree_id)

        self._run(delete)

    def begin_run(self, tree_id: str, node_id: str) -> tuple[dict[str, str], dict[str, str], int]:
        """Start of every task run: the tree, the node, and how many runs have not ended."""

        tree, node, open_runs = self._script(
            "begin", [keys.tree(tree_id), keys.node(tree_id, node_id)], []
        )

        def pairs(flat: list[str]) -> dict[str, str]:
            return dict(zip(flat[::2], flat[1::2], strict=True))

        return pairs(tree), pairs(node), int(open_runs)

    def end_run(self, tree_id: str, node_id: str) -> None:
        """A run of an existing node ended without a crash (returned, retried or replaced)."""
        self._run(lambda: self.r.hincrby(keys.node(tree_id, node_id), "open_runs", -1))

    def gate(
        self, tree_id: str, node_id: str, step: str, token: str, running_status: str, worker: str
    ) -> Gate:
        """Atomically: cancelled? budget left? step already done? claim the step for `token`."""
        lease_ms = int(self.settings.lease_seconds * 1000)
        res = self._script(
            "gate",
            [
                keys.tree(tree_id),
                keys.node(tree_id, node_id),
                keys.claim(tree_id, node_id, step),
                keys.events(tree_id),
            ],
            [node_id, step, token, lease_ms, running_status, time.time(), worker],
        )
        return Gate(res[0], res[1] if len(res) > 1 else "")

    def release(self, tree_id: str, node_id: str, step: str, token: str) -> None:
        """Drop our claim on a step (before a rescheduled retry), if we still hold it."""
        key = keys.claim(tree_id, node_id, step)

        def release() -> None:
            if self.r.get(key) == token:
                self.r.delete(key)

        self._run(release)

    def record_call(
        self,
        tree_id: str,
        node_id: str,
        step: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
        cost_known: bool,
        latency: float,
    ) -> None:
        """Add one LLM call's usage to its node and tree."""
        self._script(
            "record",
            [keys.tree(tree_id), keys.node(tree_id, node_id)],
            [
                step,
                model,
                prompt_tokens,
                completion_tokens,
                repr(float(cost_usd)),
                "0" if cost_known else "1",
                repr(float(latency)),
            ],
        )

    def decide(
        self,
        tree_id: str,
        node_id: str,
        decision: str,
        reason: str,
        sub_tasks: list[dict[str, str]],
        notes: list[str],
        worker: str,
    ) -> tuple[str, list[str]]:
        """Store the decision once; returns the stored decision and the children it created."""
        doc = {"decision": decision, "reason": reason, "notes": notes, "sub_tasks": sub_tasks}
        child_keys = [
            keys.node(tree_id, keys.child_id(node_id, i)) for i in range(1, len(sub_tasks) + 1)
        ]
        res = self._script(
            "decide",
            [
                keys.tree(tree_id),
                keys.node(tree_id, node_id),
                keys.events(tree_id),
                keys.nodes(tree_id),
                keys.claim(tree_id, node_id, "decide"),
                *child_keys,
            ],
            [node_id, time.time(), worker, json.dumps(doc)],
        )
        if res[0] == "MISSING":
            raise NotFoundError(f"node {node_id} of tree {tree_id} does not exist")
        return res[0], [c for c in res[1].split(",") if c]

    def finish(
        self,
        tree_id: str,
        node_id: str,
        status: str,
        *,
        result: str = "",
        error: str = "",
        worker: str = "",
        only_if: str = "",
        note: str = "",
        step: str = "execute",
        context_keys: list[str] | None = None,
    ) -> str:
        """Close a node once; returns OK, ALREADY, SKIPPED or MISSING."""
        limit = self.settings.max_result_chars
        if len(result) > limit:
            result = result[:limit]
            note = note or f"result truncated to {limit} characters"
        res = self._script(
            "finish",
            [
                keys.tree(tree_id),
                keys.node(tree_id, node_id),
                keys.events(tree_id),
                keys.claim(tree_id, node_id, step),
            ],
            [
                node_id,
                status,
                result,
                error[:2000],
                time.time(),
                worker,
                only_if,
                note,
                json.dumps(context_keys) if context_keys else "",
            ],
        )
        return res[0]

    def cancel(self, tree_id: str) -> str:
        """Stop a running tree: no LLM call starts after this returns; queued nodes close now."""
        res = self._script("cancel", [keys.tree(tree_id), keys.events(tree_id)], [time.time()])
        if res[0] == "MISSING":
            raise NotFoundError(f"no tree {tree_id}")
        if res[0] == "OK":
            for nid in self._run(lambda: self.r.lrange(keys.nodes(tree_id), 0, -1)):
                self.finish(tree_id, nid, "cancelled", only_if="queued", note="cancelled by user")
        return res[1]

    # -- the sweeper ----------------------------------------------------------------------

    def take_sweep_lock(self, seconds: float) -> bool:
        return bool(
            self._run(lambda: self.r.set(keys.SWEEP_LOCK, "1", nx=True, px=int(seconds * 1000)))
        )

    def stalled_trees(self, quiet_for: float) -> list[str]:
        """Running trees with no event for `quiet_for` seconds; finished ones leave the index."""
        ids = self._run(lambda: self.r.zrange(keys.RUNNING, 0, -1))

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for tid in ids:
                pipe.hget(keys.tree(tid), "status")
                pipe.xrevrange(keys.events(tid), count=1)
            return pipe.execute()

        replies = self._run(read) if ids else []
        stalled, finished = [], []
        cutoff_ms = (time.time() - quiet_for) * 1000
        for tid, status, last in zip(ids, replies[::2], replies[1::2], strict=True):
            if status is None or status in TREE_TERMINAL:
                finished.append(tid)
            elif last and int(last[0][0].split("-")[0]) < cutoff_ms:
                stalled.append(tid)
        if finished:
            self._run(lambda: self.r.zrem(keys.RUNNING, *finished))
        return stalled

    def orphaned_parents(self, tree_id: str) -> list[str]:
        """Delegated nodes whose children are all closed: their synthesis is due."""
        return self.stuck(tree_id)[0]

    def stuck(self, tree_id: str, redrive_after: float = 0.0) -> tuple[list[str], list[Node]]:
        """What a quiet tree is waiting on that nothing will deliver.

        Returns the delegated nodes whose children are all closed (their synthesis is due), and
        the open nodes that hold no live claim and were not re-driven in `redrive_after` seconds
        (their message may be lost); the latter are marked re-driven now."""
        tree = self.tree(tree_id)
        by_id = {n.id: n for n in tree.nodes}
        due = [
            n.id
            for n in tree.nodes
            if n.status == "delegated" and all(by_id[c].terminal for c in n.children if c in by_id)
        ]
        step = {
            "queued": "decide",
            "deciding": "decide",
            "executing": "execute",
            "synthesizing": "synthesize",
        }
        open_nodes = [n for n in tree.nodes if n.status in step]
        if not open_nodes:
            return due, []

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for n in open_nodes:
                pipe.exists(keys.claim(tree_id, n.id, step[n.status]))
                pipe.hget(keys.node(tree_id, n.id), "redriven_at")
            return pipe.execute()

        replies = self._run(read)
        now = time.time()
        lost = [
            n
            for n, held, last in zip(open_nodes, replies[::2], replies[1::2], strict=True)
            if not held and now - float(last or 0) > redrive_after
        ]
        if lost:

            def mark() -> None:
                pipe = self.r.pipeline(transaction=False)
                for n in lost:
                    pipe.hset(keys.node(tree_id, n.id), "redriven_at", now)
                pipe.execute()

            self._run(mark)
        return due, lost

    # -- reads --------------------------------------------------------------------------

    def tree_hash(self, tree_id: str) -> dict[str, str]:
        return self._run(lambda: self.r.hgetall(keys.tree(tree_id)))

    def node_hash(self, tree_id: str, node_id: str) -> dict[str, str]:
        return self._run(lambda: self.r.hgetall(keys.node(tree_id, node_id)))

    def node(self, tree_id: str, node_id: str) -> Node:
        h = self._run(lambda: self.r.hgetall(keys.node(tree_id, node_id)))
        if not h:
            raise NotFoundError(f"no node {node_id} in tree {tree_id}")
        return Node.from_hash(h)

    def nodes(self, tree_id: str, node_ids: list[str]) -> list[Node]:
        """Several nodes in one round trip; missing ones are skipped."""

        def read() -> list[dict[str, str]]:
            pipe = self.r.pipeline(transaction=False)
            for nid in node_ids:
                pipe.hgetall(keys.node(tree_id, nid))
            return pipe.execute()

        return [Node.from_hash(h) for h in self._run(read) if h]

    def tree(self, tree_id: str, with_nodes: bool = True) -> Tree:
        """A whole tree in two round trips (summary and node ids, then every node)."""
        check_tree_id(tree_id)

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(keys.tree(tree_id))
            pipe.lrange(keys.nodes(tree_id), 0, -1)
            return pipe.execute()

        h, ids = self._run(read)
        if not h:
            raise NotFoundError(f"no tree {tree_id}")
        return Tree.from_hash(h, self.nodes(tree_id, ids) if with_nodes else None)

    def list_trees(self, limit: int = 20) -> list[Tree]:
        """The newest trees first, summaries only (one round trip for the ids, one for the rest)."""
        ids = self._run(lambda: self.r.zrevrange(keys.TREES, 0, limit - 1))

        def read() -> list[dict[str, str]]:
            pipe = self.r.pipeline(transaction=False)
            for tid in ids:
                pipe.hgetall(keys.tree(tid))
            return pipe.execute()

        return [Tree.from_hash(h) for h in self._run(read) if h]

    def follow(
        self, tree_id: str, last_id: str = "0", block_ms: int = 1000
    ) -> Iterator[list[tuple[str, dict[str, str]]]]:
        """Yield batches of events as they arrive (blocking XREAD), forever; the caller stops."""
        stream = keys.events(tree_id)
        while True:
            res = self._run(
                lambda since=last_id: self.r.xread({stream: since}, count=500, block=block_ms)  # type: ignore[misc]
            )
            batch: list[tuple[str, dict[str, str]]] = []
            for _, entries in res or []:
                batch.extend(entries)
            if batch:
                last_id = batch[-1][0]
            yield batch

    def events(self, tree_id: str) -> list[tuple[str, dict[str, str]]]:
        """Every stored event of a tree, oldest first."""
        return self._run(lambda: self.r.xrange(keys.events(tree_id)))
