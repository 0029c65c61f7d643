"""Submit, wait on and cancel trees: the API the CLI uses, embedded or against a shared Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

from tasktree.errors import StoreError
from tasktree.models import TREE_TERMINAL, Tree, TreeSpec
from tasktree.proto import TaskRequest, to_dict
from tasktree.settings import Settings
from tasktree.store import Store, check_tree_id

Events = list[tuple[str, dict[str, str]]]


class Client:
    """One settings object's view of the tree store and the Celery app that feeds workers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def store(self) -> Store:
        return Store.from_settings(self.settings)

    @cached_property
    def app(self) -> Any:
        from workers import create_app

        return create_app(self.settings)

    def submit(self, spec: TreeSpec) -> str:
        """Write the tree and enqueue its root; on failure nothing is left behind."""
        from workers.tasks import NODE, describe

        tree_id = self.store.create_tree(spec)
        req = TaskRequest(
            task_id=f"{tree_id}/0",
            persona_prompt=spec.persona,
            task_instructions=spec.task,
            tree_id=tree_id,
            node_id="0",
            depth=0,
        )
        try:
            self.app.send_task(
                NODE,
                args=[to_dict(req)],
                argsrepr=describe(req),
                ignore_result=True,
                retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
            )
        except Exception as e:  # kombu raises several classes for an unreachable broker
            self.store.delete_tree(tree_id)
            raise StoreError(f"cannot enqueue the root task: {e}") from None
        return tree_id

    def tree(self, tree_id: str, with_nodes: bool = True) -> Tree:
        return self.store.tree(check_tree_id(tree_id), with_nodes)

    def wait(self, tree_id: str, on_events: Callable[[Events], None] | None = None) -> Tree:
        """Block until the tree ends (following its event stream); returns the final tree."""
        check_tree_id(tree_id)
        self.store.tree(tree_id, with_nodes=False)  # NotFoundError for an unknown id
        for batch in self.store.follow(tree_id):
            if on_events and batch:
                on_events(batch)
            if any(ev.get("tree") in TREE_TERMINAL for _, ev in batch):
                break
        return self.store.tree(tree_id)

    def cancel(self, tree_id: str) -> str:
        return self.store.cancel(check_tree_id(tree_id))


@contextlib.contextmanager
def session(settings: Settings, worker: bool = False) -> Iterator[Client]:
    """A client; with no TASKTREE_REDIS_URL, on an embedded Redis (and worker, if asked)."""
    if settings.redis_url:
        client = Client(settings)
        client.store.ping()  # an unreachable Redis is one quick error, not a long retry
        yield client
        return
    import logging

    from tasktree.embedded import EmbeddedRedis, worker_thread

    if worker and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with EmbeddedRedis(settings.data_dir) as server:
        client = Client(settings.model_copy(update={"redis_url": server.url}))
        if not worker:
            yield client
            return
        with worker_thread(client.app, settings.concurrency):
            yield client
