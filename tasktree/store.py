"""The tree in Redis: create, gate LLM calls, atomic transitions, read, follow, cancel."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, TypeVar

import redis

from tasktree import keys
from tasktree.connection import connect
from tasktree.errors import FencedError, NotFoundError, StoreError
from tasktree.keys import check_tree_id, new_tree_id
from tasktree.limits import Limit
from tasktree.models import Node, NodeResult, Reply, Tree, TreeSpec
from tasktree.scrub import Scrubber
from tasktree.settings import Settings
from tasktree.states import NODE_TERMINAL, TreeStatus, lua_prelude

T = TypeVar("T")


def _load_script(name: str) -> str:
    lua = resources.files("tasktree.lua")
    parts = [
        lua_prelude(),
        lua.joinpath("_lib.lua").read_text(),
        lua.joinpath(f"{name}.lua").read_text(),
    ]
    return "\n".join(parts)


#: How long a follower of a tree's events waits after a batch before it reads again (s): at
#: most 50 reads a second per watcher, and at most this much later to see an event.
GATHER = 0.02

#: How long a call waiting for a slot of its model waits on its own list before it looks
#: again (s): whether its node or tree closed, and to renew its place in the queue (a slot is
#: handed to it at once, not found by looking). Each look costs three round trips, and a
#: big tree keeps hundreds of calls waiting: looking every second took a quarter of the
#: worker's CPU and doubled the time a slot stood idle between calls (BENCHMARKS.md).
SLOT_POLL = 3.0


@dataclass(frozen=True)
class Freed:
    """What deleting trees freed: trees, keys, bytes (as Redis's MEMORY USAGE counts them)."""

    trees: int
    keys: int
    bytes: int

    def __add__(self, other: Freed) -> Freed:
        return Freed(self.trees + other.trees, self.keys + other.keys, self.bytes + other.bytes)


class Decided(NamedTuple):
    """A node's stored decision, its children, and whether this call stored it."""

    decision: str
    children: list[str]
    fresh: bool


class CallRecord(NamedTuple):
    """One model call of a step as `record` (and `finish`, with it) store it: its reply and
    usage, the token of the run that made it, and the call's id within that run."""

    step: str
    reply: Reply
    token: str = ""
    call_id: str = ""

    def args(self, node_id: str, keep: bool = True) -> list[Any]:
        """The scripts' arguments (the reply's text only to `keep` it): the call id is made
        unique in its tree by the node's id."""
        r, call = self.reply, f"{node_id}:{self.call_id or secrets.token_hex(8)}"
        known = "0" if r.cost_known else "1"
        usage = [r.prompt_tokens, r.completion_tokens, repr(float(r.cost_usd)), known]
        text = r.text if keep else ""
        return [self.step, r.model, *usage, repr(float(r.latency)), self.token, text, call]


@dataclass(frozen=True)
class Gate:
    """The answer of the gate before an LLM call."""

    verdict: str  # OK, DONE, BUSY, CANCELLED, INTERRUPTED, EXHAUSTED, MISSING
    detail: str = ""


class Store:
    """The tree state in Redis. All writes that belong together are one script or one MULTI."""

    def __init__(self, client: redis.Redis, settings: Settings, url: str = "") -> None:
        self.r = client
        self.settings = settings
        self.url = url
        self.scrub = Scrubber.of(settings)  # every error and note is scrubbed before it is stored
        lua = resources.files("tasktree.lua")
        names = [f.name[:-4] for f in lua.iterdir() if f.name.endswith(".lua") and f.name[0] != "_"]
        self._scripts = {name: client.register_script(_load_script(name)) for name in names}

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None) -> Store:
        url = url or settings.redis_url
        if not url:
            raise StoreError("no Redis URL: set TASKTREE_REDIS_URL")
        return cls(connect(url, settings), settings, url)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a Redis operation, turning redis-py's errors into one StoreError."""
        try:
            return fn()
        except redis.AuthenticationError as e:
            raise StoreError(f"Redis refused the credentials: {e}") from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreError(f"cannot reach Redis: {e}") from None
        except redis.ResponseError as e:
            raise StoreError(f"Redis error: {e}") from None

    def script(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        """Run one of tasktree/lua/*.lua on these keys and arguments."""
        return self.call(lambda: self._scripts[name](keys=keys_, args=args))

    def ping(self) -> None:
        """Fail fast (no retries) when Redis cannot be reached at all."""
        quick = connect(self.url, self.settings, patient=False) if self.url else self.r
        self.call(quick.ping)

    # -- writes -------------------------------------------------------------------------

    def create_tree(self, spec: TreeSpec, tree_id: str | None = None) -> str:
        """Write a tree and its queued root in one transaction; returns the tree id."""
        tid = tree_id or new_tree_id()
        now = time.time()
        tree = {
            **spec.model_dump(exclude={"model", "single_call", "envelopes"}),
            "id": tid,
            "status": TreeStatus.RUNNING,
            "model": spec.model or "",
            "created_at": now,
            "single_call": int(spec.single_call),
            "envelopes": int(spec.envelopes),
            "queue": self.settings.node_queue,
            "synth_queue": self.settings.synth_queue,
            "reserved": 1,
            "done": 0,
            "events_maxlen": self.settings.events_maxlen,
            "ttl": self.settings.tree_ttl,
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
        if spec.envelopes:  # the root's envelope is the whole tree's budget
            root["env_nodes"] = spec.max_nodes - 1
            if spec.max_tokens:
                root["env_tokens"] = spec.max_tokens
            if spec.max_cost:
                root["env_cost"] = spec.max_cost

        tree_keys = [keys.tree(tid), keys.node(tid, keys.ROOT), keys.nodes(tid), keys.events(tid)]
        self.script("create", tree_keys, [json.dumps(tree), json.dumps(root), now])

        def index() -> None:  # outside the tree's slot, so written after the tree
            self.r.zadd(keys.TREES, {tid: now})
            self.r.zadd(keys.RUNNING, {tid: now})

        self.call(index)
        return tid

    def enqueue(self, queue: str, message: str) -> None:
        """Put a task message (messages.node_message) at the back of a Celery queue."""
        self.call(lambda: self.r.lpush(keys.queue(queue), message))

    def send_chord(self, queue: str, messages: list[str], size_key: str, ttl: int) -> None:
        """A fan-out: its chord's size (under Celery's key, for its join) and its children's
        messages (messages.chord_messages), in one round trip. Sent again after a lost
        connection, a child runs twice and its chord counts it once."""

        def send() -> None:
            pipe = self.r.pipeline(transaction=False)
            pipe.set(size_key, len(messages), ex=ttl or None)
            pipe.lpush(keys.queue(queue), *messages)
            pipe.execute()

        self.call(send)

    def delete_tree(self, tree_id: str) -> Freed:
        """Remove every key of a tree and its index entries; returns what that freed. A run
        still working on it writes nothing afterwards: every script checks its tree first."""

        # A run still at work may add nodes (a decision) while this lists them: the list is
        # watched, and the delete is tried again on the longer list.
        def delete() -> Freed:
            with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        return delete_listed(pipe)
                    except redis.WatchError:
                        continue

        def delete_listed(pipe: Any) -> Freed:
            pipe.watch(keys.nodes(tree_id))
            ids = pipe.lrange(keys.nodes(tree_id), 0, -1)
            names = keys.of_tree(tree_id, ids or [keys.ROOT])
            sizing = self.r.pipeline(transaction=False)  # one round trip, beside the watch
            for name in names:
                sizing.memory_usage(name, samples=0)
            sizes = sizing.execute(raise_on_error=False)  # a Redis without MEMORY counts 0
            pipe.multi()
            pipe.delete(*names)
            pipe.zrem(keys.TREES, tree_id)
            pipe.zrem(keys.RUNNING, tree_id)
            pipe.zrem(keys.EXPIRING, tree_id)
            deleted = pipe.execute()[0]
            return Freed(1, int(deleted), sum(s for s in sizes if isinstance(s, int)))

        return self.call(delete)

    def ended_before(self, cutoff: float, statuses: frozenset[str]) -> list[str]:
        """The trees in one of `statuses` that ended (interrupted: were submitted) before
        `cutoff` (epoch seconds), oldest first."""
        ids = self.call(lambda: self.r.zrangebyscore(keys.TREES, "-inf", cutoff))

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for tid in ids:
                pipe.hmget(keys.tree(tid), "status", "finished_at", "created_at")
            replies: list[Any] = pipe.execute()
            return replies

        found, replies = [], self.call(read) if ids else []
        for tid, (status, finished, created) in zip(ids, replies, strict=True):
            when = finished or created
            if status in statuses and when and float(when) < cutoff:
                found.append(tid)
        return found

    def memory(self) -> tuple[int, int]:
        """(bytes Redis uses, its maxmemory; 0: no limit)."""
        info = self.call(lambda: self.r.info("memory"))
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))

    def begin_run(
        self, tree_id: str, node_id: str, token: str, live: tuple[str, str] | None = None
    ) -> tuple[dict[str, str], dict[str, str], int]:
        """Start of every task run: the tree's fields a run reads (begin.lua lists them; not
        the task text), the node, and how many runs have not ended. With `live` (queue,
        member), the run's message is listed in the live index too."""
        tree_keys = [keys.tree(tree_id), keys.node(tree_id, node_id)]
        args = [token]
        if live:
            tree_keys.append(keys.live(live[0]))
            args.append(live[1])
        tree, node, open_runs = self.script("begin", tree_keys, args)

        def pairs(flat: list[str]) -> dict[str, str]:
            return dict(zip(flat[::2], flat[1::2], strict=True))

        return pairs(tree), pairs(node), int(open_runs)

    def end_run(self, tree_id: str, node_id: str, token: str) -> None:
        """A run of an existing node ended without a crash (returned, retried or replaced)."""
        self.script("end", [keys.node(tree_id, node_id)], [token])

    def gate(
        self,
        tree_id: str,
        node_id: str,
        step: str,
        token: str,
        running_status: str,
        worker: str,
        reserve: tuple[int, int, float, float] = (0, 0, 0.0, 0.0),
        by_depth: tuple[str, str] | None = None,
    ) -> Gate:
        """Atomically: cancelled? budget left? step already done? claim the step for `token`.
        `reserve` (completion cap, prompt tokens, USD per input and output token): with a
        token or cost budget, the call's worst case is reserved and the verdict's detail is
        the cap that fits ("0": nothing reserved). `by_depth` (reason, note): the execute
        gate of an undecided node at the depth limit stores its decision to execute, in the
        same round trip (UNDECIDED if the limit was raised since)."""
        lease_ms = int(self.settings.lease_seconds * 1000)
        res = self.script(
            "gate",
            [
                keys.tree(tree_id),
                keys.node(tree_id, node_id),
                keys.claim(tree_id, node_id, step),
                keys.events(tree_id),
            ],
            [
                *(node_id, step, token, lease_ms, running_status, time.time(), worker, *reserve),
                *(by_depth or ()),
            ],
        )
        return Gate(res[0], res[1] if len(res) > 1 else "")

    def release(self, tree_id: str, node_id: str, step: str, token: str) -> None:
        """Drop our claim on a step (before a rescheduled retry), if we still hold it, and the
        budget our call of it reserved."""
        self.script(
            "release",
            [keys.claim(tree_id, node_id, step), keys.tree(tree_id), keys.node(tree_id, node_id)],
            [token, step],
        )

    def call_failed(
        self,
        tree_id: str,
        node_id: str,
        step: str,
        error: str,
        retry_at: float,
        *,
        call_id: str = "",
    ) -> int:
        """Count a transiently failed model call of a step, once per `call_id`; returns the
        step's failures so far (-1: no such node)."""
        call = f"{node_id}:{call_id or secrets.token_hex(8)}"
        n = self.script(
            "fail_call",
            [
                keys.tree(tree_id),
                keys.node(tree_id, node_id),
                keys.events(tree_id),
                keys.calls(tree_id),
            ],
            [node_id, step, self.scrub(error)[:500], repr(retry_at), time.time(), call],
        )
        return int(n)

    def record(self, tree_id: str, node_id: str, rec: CallRecord) -> int:
        """Add one model call's usage to its node and tree, once per call id, if its token
        still holds the step's claim (else as waste), and keep its reply until the step's
        outcome is stored. Returns 1, 0 (already), 2 (waste), -1 (no tree)."""
        res = self.script(
            "record",
            [
                keys.tree(tree_id),
                keys.node(tree_id, node_id),
                keys.claim(tree_id, node_id, rec.step),
            ],
            rec.args(node_id),
        )
        return int(res)

    def decide(
        self,
        tree_id: str,
        node_id: str,
        decision: str,
        reason: str,
        sub_tasks: list[dict[str, Any]],
        notes: list[str],
        worker: str,
        token: str = "",
    ) -> Decided:
        """Store the decision once; returns the stored decision and the children it created."""
        doc = {"decision": decision, "reason": reason, "notes": notes, "sub_tasks": sub_tasks}
        child_keys = [
            keys.node(tree_id, keys.child_id(node_id, i)) for i in range(1, len(sub_tasks) + 1)
        ]
        res = self.script(
            "decide",
            [
                keys.tree(tree_id),
                keys.node(tree_id, node_id),
                keys.events(tree_id),
                keys.nodes(tree_id),
                keys.claim(tree_id, node_id, "decide"),
                *child_keys,
            ],
            [node_id, time.time(), worker, json.dumps(doc), token],
        )
        if res[0] == "MISSING":
            raise NotFoundError(f"node {node_id} of tree {tree_id} does not exist")
        if res[0] == "FENCED":
            raise FencedError(f"node {node_id}: another run holds the decision's claim")
        return Decided(res[0], [c for c in res[1].split(",") if c], res[2] == "1")

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
        token: str = "",
        call: CallRecord | None = None,
    ) -> str:
        """Close a node once; returns OK, ALREADY, SKIPPED, FENCED or MISSING. With `token`
        (the run's), the run that closed it also ends (no separate end_run). With `call` (of
        the same step), the call whose reply this stores is recorded first, in the same
        script; a call that lost its claim is recorded as waste and closes nothing (FENCED)."""
        limit = self.settings.max_result_chars
        if len(result) > limit:
            result = result[:limit]
            note = note or f"result truncated to {limit} characters"
        res = self.script(
            "finish",
            [
                keys.tree(tree_id),
                keys.node(tree_id, node_id),
                keys.events(tree_id),
                keys.claim(tree_id, node_id, step),
                keys.nodes(tree_id),
                keys.calls(tree_id),
            ],
            [
                node_id,
                status,
                self.scrub.secrets_only(result),
                self.scrub(error)[:2000],
                time.time(),
                worker,
                only_if,
                self.scrub(note),
                json.dumps(context_keys) if context_keys else "",
                token,
                keys.node_prefix(tree_id),
                *(call.args(node_id, keep=False) if call else ()),
            ],
        )
        return str(res[0])

    def renew(
        self,
        claims: list[tuple[str, str, str, str]],
        held: dict[str, list[str]],
        released: list[tuple[str, str]],
        lease_seconds: float,
        slots: dict[str, list[str]] | None = None,
        check: bool = True,
    ) -> int:
        """One heartbeat, in one round trip: extend each (tree, node, step, token) claim its
        token still holds, and each model's call `slots`; score each queue's `held` live
        members now (unless `check` is off, taking off those whose node has closed); take the
        `released` (queue, member) pairs off. Returns how many claims were extended."""
        ms = int(lease_seconds * 1000)

        def renew(loaded: bool = False) -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for tree_id, node_id, step, token in claims:
                self._pipe_script(pipe, "renew", [keys.claim(tree_id, node_id, step)], [token, ms])
            for model, tokens in (slots or {}).items():
                self._pipe_script(pipe, "reslot", [keys.slots(model)], [ms, *tokens])
            for queue, members in held.items():
                nodes = map(keys.node_of_live_member, members) if check else ()
                self._pipe_script(pipe, "live", [keys.live(queue), *nodes], members)
            gone: dict[str, list[str]] = {}
            for queue, member in released:
                gone.setdefault(queue, []).append(member)
            for queue, members in gone.items():
                pipe.zrem(keys.live(queue), *members)
            try:
                replies: list[Any] = pipe.execute()
            except redis.exceptions.NoScriptError:
                if loaded:
                    raise
                for name in ("renew", "reslot", "live"):  # Redis lost its scripts (a restart):
                    self.r.script_load(self._scripts[name].script)  # load them and beat again
                replies = renew(loaded=True)  # (each part of a beat is safe to repeat)
            return replies

        return sum(int(x) for x in self.call(renew)[: len(claims)])

    def _pipe_script(self, pipe: Any, name: str, keys_: list[str], args: list[Any]) -> None:
        """A script call in a pipeline by its SHA alone: redis-py would ask SCRIPT EXISTS first
        on every execute; a Redis that lost its scripts answers NOSCRIPT instead."""
        pipe.evalsha(self._scripts[name].sha, len(keys_), *keys_, *args)

    def take_slot(self, model: str, token: str, limit: Limit) -> tuple[str, float] | None:
        """A slot for one call of `model` under its shared limit (and any cut a 429 made):
        None when taken (or handed to this call while it waited), else (what is full, seconds
        worth waiting). A full concurrency puts the call in the model's queue, or renews its
        place there, until a slot is handed to it or it gives its place up (`free_slot`)."""
        res = self.script(
            "slot",
            [
                *(keys.slots(model), keys.calls_last_minute(model), keys.adapted(model)),
                *(keys.waiting(model), keys.waiting_lapse(model)),
            ],
            [
                *(token, self._lease_ms(), limit.concurrency, limit.rpm, keys.grant(model)),
                int(SLOT_POLL * 3000),  # three looks missed: the waiter's worker is gone
            ],
        )
        return None if res[0] == "OK" else (str(res[1]), int(res[2]) / 1000)

    def free_slot(self, model: str, token: str, outcome: str, limit: Limit) -> None:
        """The call ended ("200" answered, "429" rate limited, "0" failed or never made): free
        its slot, or its place in the queue, and hand the free slots to the first waiters. A
        429 cuts the model's concurrency for every worker; an answer grows a cut back."""
        hold_ms = int(self.settings.llm_limit_hold * 1000)
        self.script(
            "unslot",
            [
                *(keys.slots(model), keys.adapted(model), keys.waiting(model)),
                *(keys.waiting_lapse(model), keys.calls_last_minute(model)),
            ],
            [
                token,
                outcome,
                hold_ms,
                limit.concurrency,
                limit.rpm,
                self._lease_ms(),
                keys.grant(model),
            ],
        )

    def await_slot(self, model: str, token: str, seconds: float) -> bool:
        """Wait up to `seconds` (at most SLOT_POLL) for a call that ends to hand this waiting
        call its slot: True when it did (the slot is this call's now)."""
        timeout = max(0.01, min(seconds, SLOT_POLL))
        key = keys.grant(model, token)
        return self.call(lambda: self.r.blpop([key], timeout=timeout)) is not None

    def _lease_ms(self) -> int:
        return int(self.settings.lease_seconds * 1000)

    def stopped(self, tree_id: str, node_id: str) -> bool:
        """Whether a node's run has nothing left to do: its tree no longer runs (cancelled,
        interrupted, deleted) or the node closed."""

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            pipe.hget(keys.tree(tree_id), "status")
            pipe.hget(keys.node(tree_id, node_id), "status")
            replies: list[Any] = pipe.execute()
            return replies

        tree, node = self.call(read)
        return tree != TreeStatus.RUNNING or node is None or node in NODE_TERMINAL

    def note_waiting(self, tree_id: str, node_id: str, why: str) -> None:
        """Say once, on the node and in its events, that its call waits for a shared limit."""
        tree_keys = [keys.tree(tree_id), keys.node(tree_id, node_id), keys.events(tree_id)]
        self.script("wait", tree_keys, [node_id, why, time.time()])

    def synthesis_due(self, tree_id: str, node_id: str) -> str | None:
        """Once `node_id` closed outside its parent's chord: for the one caller that should
        send the parent's synthesis (every sibling closed, none sent it yet), the tree's
        synthesis queue ('-' if the tree names none); else None."""
        parent = keys.parent_id(node_id)
        children = self.call(lambda: self.r.hget(keys.node(tree_id, parent), "children")) or ""
        child_keys = [keys.node(tree_id, c) for c in children.split(",") if c]
        marker = keys.synthesis_sent(tree_id, parent)
        script_keys = [keys.tree(tree_id), keys.node(tree_id, parent), marker, *child_keys]
        due = self.script("synthesis_due", script_keys, [60_000])
        return None if due in (None, "", 0) else str(due)

    # -- reads --------------------------------------------------------------------------

    def node(self, tree_id: str, node_id: str) -> Node:
        h = self.call(lambda: self.r.hgetall(keys.node(tree_id, node_id)))
        if not h:
            raise NotFoundError(f"no node {node_id} in tree {tree_id}")
        return Node.from_hash(h)

    def nodes(self, tree_id: str, node_ids: list[str]) -> list[Node]:
        """Several nodes in one round trip; missing ones are skipped."""

        def read() -> list[dict[str, str]]:
            pipe = self.r.pipeline(transaction=False)
            for nid in node_ids:
                pipe.hgetall(keys.node(tree_id, nid))
            replies: list[Any] = pipe.execute()
            return replies

        return [Node.from_hash(h) for h in self.call(read) if h]

    def results(self, tree_id: str, node_ids: list[str]) -> list[NodeResult]:
        """Several nodes' results (persona, status, result, error) in one round trip, without
        building whole Nodes; missing nodes are skipped."""

        def read() -> list[list[str | None]]:
            pipe = self.r.pipeline(transaction=False)
            for nid in node_ids:
                pipe.hmget(keys.node(tree_id, nid), "persona", "status", "result", "error")
            replies: list[list[str | None]] = pipe.execute()
            return replies

        return [
            NodeResult(nid, persona or "", status, result or "", error or "")
            for nid, (persona, status, result, error) in zip(node_ids, self.call(read), strict=True)
            if status is not None
        ]

    def tree(self, tree_id: str, with_nodes: bool = True) -> Tree:
        """A whole tree in two round trips (summary and node ids, then every node)."""
        check_tree_id(tree_id)

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(keys.tree(tree_id))
            pipe.lrange(keys.nodes(tree_id), 0, -1)
            replies: list[Any] = pipe.execute()
            return replies

        h, ids = self.call(read)
        if not h:
            raise NotFoundError(f"no tree {tree_id}")
        if "created_at" not in h:  # keys a late write left behind after the store was reset
            raise NotFoundError(f"tree {tree_id} no longer exists (the store was reset?)")
        return Tree.from_hash(h, self.nodes(tree_id, ids) if with_nodes else None)

    def exists(self, tree_id: str) -> bool:
        return bool(self.call(lambda: self.r.exists(keys.tree(tree_id))))

    def list_trees(self, limit: int = 20, results: bool = True) -> list[tuple[Tree, str]]:
        """The newest trees first: each summary with its result ("" without `results`; one
        round trip for the ids, one for the rest)."""
        ids = self.call(lambda: self.r.zrevrange(keys.TREES, 0, limit - 1))

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for tid in ids:
                pipe.hgetall(keys.tree(tid))
                if results:
                    pipe.hget(keys.node(tid, keys.ROOT), "result")
            replies: list[Any] = pipe.execute()
            return replies

        replies = self.call(read) if ids else []
        step = 2 if results else 1
        hashes = replies[::step]
        texts = replies[1::2] if results else [""] * len(hashes)
        gone = [tid for tid, h in zip(ids, hashes, strict=True) if not h]
        if gone:  # expired or deleted: the index follows the trees it lists
            self.call(lambda: self.r.zrem(keys.TREES, *gone))
        return [
            (Tree.from_hash(h), result or "") for h, result in zip(hashes, texts, strict=True) if h
        ]

    def follow(
        self, tree_id: str, last_id: str = "0", block_ms: int = 1000, gather: float = GATHER
    ) -> Iterator[list[tuple[str, dict[str, str]]]]:
        """Yield batches of events as they arrive (blocking XREAD), forever; the caller stops.
        After a batch it waits `gather` seconds before it reads again, so the transitions of
        a busy tree come in batches, not one XREAD each."""
        stream = keys.events(tree_id)
        while True:
            res = self.call(
                lambda since=last_id: self.r.xread({stream: since}, count=500, block=block_ms)  # type: ignore[misc]
            )
            batch: list[tuple[str, dict[str, str]]] = []
            for _, entries in res or []:
                batch.extend(entries)
            if batch:
                last_id = batch[-1][0]
            yield batch
            if batch and gather:
                time.sleep(gather)

    def events(self, tree_id: str) -> list[tuple[str, dict[str, str]]]:
        """Every stored event of a tree, oldest first."""
        return self.call(lambda: self.r.xrange(keys.events(tree_id)))
