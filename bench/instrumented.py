"""The real worker app, plus a record of each tree's largest message (bench only).

A tree's record is written only when this process sees a larger message of it than before,
a few times a tree, so the measuring adds next to nothing to the Redis commands counted."""

from __future__ import annotations

import json
from typing import Any

import redis
from celery import signals

from bench.shapes import max_message_key
from workers import app

_r = redis.Redis.from_url(app.conf.broker_url)
_largest: dict[str, int] = {}


@signals.before_task_publish.connect(weak=False)
def _measure(body: Any = None, headers: Any = None, **_: Any) -> None:
    size = len(json.dumps(body, default=str)) + len(json.dumps(headers, default=str))
    args = body[0] if isinstance(body, (list, tuple)) and body else ()
    first = args[0] if args else None  # a node's payload, or a synthesis's tree id
    tree_id = str(first.get("tree_id") if isinstance(first, dict) else first)
    if size <= _largest.get(tree_id, 0):
        return
    _largest[tree_id] = size
    _r.eval(
        "if tonumber(redis.call('GET', KEYS[1]) or 0) < tonumber(ARGV[1]) then "
        "redis.call('SET', KEYS[1], ARGV[1]) end",
        1,
        max_message_key(tree_id),
        size,
    )
