"""A Redis result backend for tasks that never wait on a Celery result.

Every chord that a node task fans out is frozen in the worker, and Celery's GroupResult then
subscribes (Redis pub/sub) to each child's result even though nothing will read it; the
subscriptions pile up while a tree runs and reconnect noisily after Redis goes away. tasktree
reads every outcome from the tree store, so its senders never subscribe. Chord counting
(on_chord_part_return) and result storage are unchanged.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend


class _NoSubscribe:
    def add_pending_result(self, result: Any, weak: bool = False) -> Any:
        return result

    def remove_pending_result(self, result: Any) -> Any:
        return result

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


class Backend(_NoSubscribe, RedisBackend):
    """RedisBackend without result subscriptions."""

    def __init__(self, *args: Any, url: str | None = None, app: Any = None, **kw: Any) -> None:
        super().__init__(*args, url=url or app.conf.result_backend, app=app, **kw)


class Sentinel(_NoSubscribe, SentinelBackend):
    """SentinelBackend without result subscriptions."""

    def __init__(self, *args: Any, url: str | None = None, app: Any = None, **kw: Any) -> None:
        super().__init__(*args, url=url or app.conf.result_backend, app=app, **kw)


def for_url(url: str) -> type:
    return Sentinel if url.startswith(("sentinel://", "sentinels://")) else Backend
