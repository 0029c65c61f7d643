"""The real worker app, plus a record of the largest message it publishes (bench only)."""

from __future__ import annotations

import json
from typing import Any

import redis
from celery import signals

from workers import app

_r = redis.Redis.from_url(app.conf.broker_url)


@signals.before_task_publish.connect(weak=False)
def _measure(body: Any = None, headers: Any = None, **_: Any) -> None:
    size = len(json.dumps(body, default=str)) + len(json.dumps(headers, default=str))
    _r.eval(
        "if tonumber(redis.call('GET', KEYS[1]) or 0) < tonumber(ARGV[1]) then "
        "redis.call('SET', KEYS[1], ARGV[1]) end",
        1,
        "bench:max-message",
        size,
    )
