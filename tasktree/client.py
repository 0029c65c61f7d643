"""Submit, wait on, steer and read trees: tasktree's API, embedded or against a shared Redis."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from typing import Any

from tasktree import messages, preflight
from tasktree.connection import redact
from tasktree.control import Control
from tasktree.errors import InputError, NotFoundError, StoreError, TaskTreeError, WaitTimeout
from tasktree.keys import ROOT, check_node_id, check_tree_id
from tasktree.models import Node, Tree, TreeSpec
from tasktree.settings import Settings, load
from tasktree.states import TREE_IDLE, NodeStatus, TreeStatus
from tasktree.store import Store

#: What a retry may change for the rest of the tree's run.
RETRY_CHANGES = frozenset(
    {"model", "max_depth", "max_children", "max_nodes", "max_cost", "max_tokens"}
)

log = logging.getLogger(__name__)

Events = list[tuple[str, dict[str, str]]]


class Client:
    """One settings object's view of the trees and of the workers that run them.

    With TASKTREE_REDIS_URL set, the client talks to that Redis and its workers. Without it,
    use it as a context manager: while the block runs it uses the embedded Redis of
    TASKTREE_DATA_DIR and (with `worker=True`) an in-process worker. A tree it started that is
    still running when the block ends, Ctrl-C included, is interrupted: nothing it stored is
    lost, and `resume` continues it.

        with tasktree.Client() as client:
            tree = client.wait(client.submit("Plan a launch. This includes pricing, and channels."))
    """

    def __init__(self, settings: Settings | None = None, *, worker: bool = True) -> None:
        self.settings = settings or load()
        self.embedded = not self.settings.redis_url
        self._want_worker = worker
        self._server: Any = None
        self._worker: Any = None
        self._mine: list[str] = []  # trees this embedded client runs

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Client:
        if not self.embedded:
            self.store.ping()  # an unreachable Redis is one quick error, not a long retry
            return self
        from tasktree.embedded import EmbeddedRedis, InProcessWorker

        self._server = EmbeddedRedis(self.settings.data_dir)
        url = self._server.start()
        # Queues of this process's own: no other process's worker ever takes its messages,
        # and its sweeper re-drives no other process's tree.
        queue = f"tasktree.embedded.{secrets.token_hex(4)}"
        self.settings = self.settings.model_copy(
            update={"redis_url": url, "node_queue": queue, "synth_queue": f"{queue}.synthesize"}
        )
        try:
            if self._server.sole_user:  # nobody else works on this store: open trees are orphans
                for tid in self.control.abandon_open_trees():
                    log.info("tree %s had no process left working on it: interrupted", tid)
            if self._want_worker:
                self._worker = InProcessWorker(self.settings)
                self._worker.start()
        except BaseException:
            self._server.stop()
            raise
        return self

    def __exit__(self, exc_type: Any, *_: object) -> None:
        if exc_type is KeyboardInterrupt:
            self.after_interrupt()
        self.close(wait=0.5 if exc_type is KeyboardInterrupt else 2.0)

    def after_interrupt(self) -> None:
        """Drop this client's Redis connections after a KeyboardInterrupt in its thread. The
        interrupt may strike between a command and its reply (a blocking XREAD, most often);
        that connection goes back to the pool, and the next command on it reads the old
        reply. Fresh connections are made on the next command."""
        if "store" in self.__dict__:
            self.store.r.connection_pool.disconnect()

    def close(self, wait: float = 2.0) -> None:
        """Interrupt the trees this embedded client still runs, stop its worker, leave Redis."""
        if self._server is None:
            return
        try:
            for tid in self._mine:
                try:
                    status = self.control.interrupt(tid)
                except NotFoundError:  # deleted, or expired after it ended
                    continue
                if status == TreeStatus.INTERRUPTED:
                    log.info("tree %s interrupted; continue it with: tasktree resume %s", tid, tid)
        except TaskTreeError as e:
            log.warning("could not interrupt the running trees: %s", e)
        finally:
            if self._worker is not None:
                self._worker.stop(wait)
                self._worker = None
            self._server.stop()
            self._server = None

    def _require_running(self) -> None:
        if self.embedded and self._server is None:
            raise TaskTreeError(
                "without TASKTREE_REDIS_URL the client runs its own Redis: "
                "use it as `with tasktree.Client() as client:`"
            )

    @cached_property
    def store(self) -> Store:
        return Store.from_settings(self.settings)

    @cached_property
    def control(self) -> Control:
        return Control(self.store)

    @property
    def app(self) -> Any:
        """The Celery app that sends this client's messages and asks the workers."""
        if self._worker is not None:
            return self._worker.app
        return self._sender

    @cached_property
    def _sender(self) -> Any:
        return messages.sender(self.settings)

    # -- trees ----------------------------------------------------------------------------

    def submit(self, task: str | TreeSpec, **budgets: Any) -> str:
        """Check the configuration, write the tree and enqueue its root; returns the tree id.

        `budgets` are TreeSpec fields: persona, model, max_depth, max_children, max_nodes,
        max_cost, max_tokens, on_child_failure, single_call. Raises a TaskTreeError (nothing
        written) for bad input or a configuration that could not run the tree."""
        self._require_running()
        spec = (
            task if isinstance(task, TreeSpec) else TreeSpec.build(self.settings, task, **budgets)
        )
        preflight.check(self.settings, spec.model, spec.max_cost)
        if self.embedded and self._worker is None:
            raise TaskTreeError("this embedded client has no worker (worker=False)")
        self._check_memory()
        tree_id = self.store.create_tree(spec)
        if self.embedded:
            self._mine.append(tree_id)
        try:
            # The root as just written: its message needs no read back.
            self._send_root(tree_id, Node(id=ROOT, persona=spec.persona, instructions=spec.task))
        except StoreError:
            self.store.delete_tree(tree_id)
            raise
        return tree_id

    def _check_memory(self) -> None:
        """Refuse a tree while Redis is near its maxmemory: with `noeviction` (as a broker
        needs) a full Redis refuses writes, and the queue would stop mid-tree."""
        used, limit = self.store.memory()
        guard = self.settings.memory_guard
        if limit and used >= guard * limit:
            raise StoreError(
                f"Redis uses {used / limit:.0%} of its maxmemory ({used:,} of {limit:,} bytes), "
                f"above TASKTREE_MEMORY_GUARD={guard:g}: free space with `tasktree prune "
                f"--older-than DURATION` or raise Redis's maxmemory"
            )

    def _send_root(self, tree_id: str, root: Node | None = None) -> None:
        req = (root or self.store.node(tree_id, ROOT)).request(tree_id)
        try:
            messages.send_node(self.store, req, self.settings.node_queue)
        except StoreError as e:
            raise StoreError(f"cannot enqueue the root task: {e}") from None

    def resume(self, tree_id: str) -> int:
        """Continue an interrupted tree, reusing every stored result; returns its open nodes.

        Only nodes without a result call the model again."""
        self._require_running()
        check_tree_id(tree_id)
        if self.embedded and self._worker is None:
            raise TaskTreeError("this embedded client has no worker (worker=False)")
        open_nodes = self.control.resume(tree_id)
        if self.embedded:
            self._mine.append(tree_id)
        self._send_root(tree_id)  # every finished node answers at once from the store
        return open_nodes

    def retry(
        self, tree_id: str, nodes: Sequence[str] = (), *, descendants: bool = True, **changes: Any
    ) -> list[str]:
        """Run an ended tree's unfinished nodes again (or the named nodes and their
        descendants), reusing every stored result, then re-synthesize their ancestors up to
        the root. `changes`: model, max_depth, max_nodes, max_cost, max_tokens for the tree
        from now on. Returns the reopened node ids."""
        self._require_running()
        check_tree_id(tree_id)
        node_ids = [check_node_id(n) for n in nodes]
        if self.embedded and self._worker is None:
            raise TaskTreeError("this embedded client has no worker (worker=False)")
        unknown = set(changes) - RETRY_CHANGES
        if unknown:
            raise InputError(f"retry cannot change {', '.join(sorted(unknown))}")
        updates = {k: v for k, v in changes.items() if v is not None}
        preflight.check(self.settings, updates.get("model"), updates.get("max_cost", 0.0))
        queues = (self.settings.node_queue, self.settings.synth_queue)
        reopened = self.control.retry(tree_id, node_ids, queues, updates, descendants)
        if self.embedded:
            self._mine.append(tree_id)
        self._send_root(tree_id)  # every node that kept its result answers at once
        return reopened

    def raise_budget(self, tree_id: str, **add: float | None) -> list[str]:
        """Raise a tree's budgets by the amounts given (max_nodes, max_cost, max_tokens,
        max_depth). A running tree's next calls see them at once; a tree that ended on its
        budget continues: its nodes stopped by the budget run again, and everything stored
        is reused. Returns the nodes reopened (none for a running tree)."""
        self._require_running()
        check_tree_id(tree_id)
        amounts = {k: v for k, v in add.items() if v is not None}
        status = self.control.raise_budget(tree_id, amounts)
        if status != TreeStatus.BUDGET_EXHAUSTED:
            return []
        stopped = [
            n.id for n in self.store.tree(tree_id).nodes if n.status == NodeStatus.BUDGET_EXHAUSTED
        ]
        return self.retry(tree_id, stopped, descendants=False)

    def tree(self, tree_id: str, with_nodes: bool = True) -> Tree:
        self._require_running()
        return self.store.tree(check_tree_id(tree_id), with_nodes)

    def cancel(self, tree_id: str) -> str:
        """Stop a tree: no model call starts after this returns. Returns its status."""
        self._require_running()
        return self.control.cancel(check_tree_id(tree_id))

    def cancel_subtree(self, tree_id: str, node_id: str) -> list[str]:
        """Cancel one node and its descendants; the rest of the tree goes on. No model call
        starts in the subtree after this returns. Returns the node ids it closed."""
        self._require_running()
        return self.control.cancel_subtree(check_tree_id(tree_id), check_node_id(node_id))

    def interrupt(self, tree_id: str, note: str = "") -> str:
        """Stop all work on a running tree, keeping everything; `resume` continues it."""
        self._require_running()
        return self.control.interrupt(check_tree_id(tree_id), note)

    def pause(self, tree_id: str) -> None:
        """Pause a running tree: no model call starts until `resume`; calls in flight finish
        and are stored. Raises InputError when the tree is not running."""
        status = self.interrupt(tree_id, "paused by user")
        if status != TreeStatus.INTERRUPTED:
            raise InputError(f"tree {tree_id} is {status}: only a running tree pauses")

    # -- waiting --------------------------------------------------------------------------

    def follow(
        self,
        tree_id: str,
        *,
        timeout: float | None = None,
        on_stall: Callable[[str], None] | None = None,
    ) -> Iterator[Events]:
        """Batches of the tree's events, from its first, until no worker works on it.

        Every `quiet_seconds` without an event it asks whether any worker consumes the tree's
        queue and reports what it finds through `on_stall`. Raises WaitTimeout after
        `timeout` seconds, NotFoundError if the tree disappears."""
        self._require_running()
        check_tree_id(tree_id)
        tree = self.store.tree(tree_id, with_nodes=False)  # NotFoundError for an unknown id
        deadline = time.monotonic() + timeout if timeout else None
        quiet_since, said = time.monotonic(), ""
        for batch in self.store.follow(tree_id):
            now = time.monotonic()
            if batch:
                quiet_since = now
                yield batch
                if any(ev.get("tree") in TREE_IDLE for _, ev in batch):
                    tree = self.store.tree(tree_id, with_nodes=False)
                    if tree.idle:  # not resumed since
                        return
            elif not self.store.exists(tree_id):
                raise NotFoundError(f"tree {tree_id} no longer exists (the store was reset?)")
            elif now - quiet_since >= self.settings.quiet_seconds:
                quiet_since = now
                tree = self.store.tree(tree_id, with_nodes=False)
                if tree.idle:
                    return
                news = self._stall_report(tree)
                if on_stall and news != said:
                    on_stall(news)
                said = news
            if deadline is not None and now >= deadline:
                raise WaitTimeout(
                    f"gave up waiting after {timeout:g} s: tree {tree_id} is still {tree.status}"
                )

    def wait(
        self,
        tree_id: str,
        on_events: Callable[[Events], None] | None = None,
        *,
        timeout: float | None = None,
        on_stall: Callable[[str], None] | None = None,
    ) -> Tree:
        """Block until no worker works on the tree (it ended, or was interrupted); returns it."""
        for batch in self.follow(tree_id, timeout=timeout, on_stall=on_stall):
            if on_events:
                on_events(batch)
        return self.store.tree(tree_id)

    def watch(self, tree_id: str, *, timeout: float | None = None) -> Iterator[dict[str, str]]:
        """Each event of the tree as it happens (from the first), until it ends."""
        for batch in self.follow(tree_id, timeout=timeout):
            for event_id, event in batch:
                yield {"id": event_id, **event}

    def consumers(self, queue: str) -> list[str] | None:
        """The live workers that consume `queue` (None if the question went unanswered)."""
        try:
            replies = self.app.control.inspect(timeout=1.5).active_queues() or {}
        except Exception as e:  # noqa: BLE001 - kombu raises several classes while the broker is away
            log.debug("cannot ask the workers: %s", e)
            return None
        return sorted(w for w, qs in replies.items() if any(q.get("name") == queue for q in qs))

    def _stall_report(self, tree: Tree) -> str:
        queue = tree.queue or self.settings.node_queue
        workers = self.consumers(queue)
        quiet = f"{self.settings.quiet_seconds:g} s"
        if workers is None:
            return f"no progress on tree {tree.id} for {quiet}, and the workers did not answer"
        if workers:
            return (
                f"no progress on tree {tree.id} for {quiet}; {len(workers)} worker(s) consume "
                f"its queue, so a model call may be slow"
            )
        if queue.startswith("tasktree.embedded."):
            return (
                f"no process is working on tree {tree.id}: the one that ran it has gone; "
                f"continue it with: tasktree resume {tree.id}"
            )
        return (
            f"no worker consumes queue {queue!r} on {redact(self.settings.redis_url or '')}; "
            "start one with `celery -A workers worker` and the same TASKTREE_REDIS_URL"
        )


def submit(task: str, settings: Settings | None = None, **budgets: Any) -> Tree:
    """Run one tree to its end and return it: embedded without TASKTREE_REDIS_URL, else on the
    workers of that Redis. Ctrl-C (KeyboardInterrupt) interrupts an embedded tree at once."""
    with Client(settings or load()) as client:
        return client.wait(client.submit(task, **budgets))


def read_task(text: str | None, path: str | None, stdin: Any) -> str:
    """The task from an argument, `-` (standard input) or a file."""
    if path is not None and text is not None:
        raise InputError("give the task as an argument or with --file, not both")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"{path} is not UTF-8 text") from None
    if text == "-":
        try:
            return str(stdin.read())
        except UnicodeDecodeError:
            raise InputError("standard input is not UTF-8 text") from None
    if text is None:
        raise InputError("no task: give it as an argument, `-` for standard input, or --file PATH")
    return text
