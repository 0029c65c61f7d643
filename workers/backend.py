"""A Redis result backend for tasks that never wait on a Celery result.

Every chord that a node task fans out is frozen in the worker, and Celery's GroupResult then
subscribes (Redis pub/sub) to each child's result even though nothing will read it; the
subscriptions pile up while a tree runs and reconnect noisily after Redis goes away. tasktree
reads every outcome from the tree store, so its senders never subscribe. Chord counting
(on_chord_part_return) and result storage are unchanged, but for one thing: each child's
return refreshes the chord keys' expiry only once half of it has run out, not five EXPIREs
every time (a fan-out of five children paid 25 of them).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery.backends import redis as celery_redis
from celery.backends.redis import RedisBackend, SentinelBackend

_REFRESH = "if expires > 0 then\n    for _, key in ipairs({jkey, tkey, skey, dkey}) do"
if _REFRESH not in celery_redis.CHORD_PART_RETURN_LUA:  # a Celery upgrade: look again
    raise ImportError("Celery's chord-part script changed: update workers/backend.py")
#: Celery's chord-part script, refreshing the keys' expiry when a key is new (TTL -1) or past
#: half its life: the same window, give or take half of result_expires.
CHORD_PART_RETURN_LUA = celery_redis.CHORD_PART_RETURN_LUA.replace(
    _REFRESH,
    _REFRESH.replace("expires > 0", "expires > 0 and redis.call('TTL', jkey) < expires / 2"),
)


class _NoSubscribe:
    def add_pending_result(self, result: Any, weak: bool = False) -> Any:
        return result

    def remove_pending_result(self, result: Any) -> Any:
        return result

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None

    @cached_property
    def _chord_part_return_script(self) -> Any:
        return self.client.register_script(CHORD_PART_RETURN_LUA)  # type: ignore[attr-defined]


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
