"""A Redis result backend for tasks that never wait on a Celery result.

Every chord that a node task fans out is frozen in the worker, and Celery's GroupResult then
subscribes (Redis pub/sub) to each child's result even though nothing will read it; the
subscriptions pile up while a tree runs and reconnect noisily after Redis goes away. tasktree
reads every outcome from the tree store, so its senders never subscribe. Chord counting
(on_chord_part_return) and result storage are unchanged, but for its script: each child's
return takes seven Redis commands where Celery's takes thirteen or more (CHORD_PART_RETURN_LUA).
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Any

from celery.backends import redis as celery_redis
from celery.backends.redis import RedisBackend, SentinelBackend

#: Celery 5.7.0's chord-part script, which CHORD_PART_RETURN_LUA replaces (same keys, arguments
#: and reply): a Celery upgrade that changes it stops the import here.
CELERY_CHORD_PART_SHA1 = "b8fc152c83a7e634103ccebd49dcd3146a8f4366"
if hashlib.sha1(celery_redis.CHORD_PART_RETURN_LUA.encode()).hexdigest() != CELERY_CHORD_PART_SHA1:
    raise ImportError("Celery's chord-part script changed: update workers/backend.py")

#: Celery's chord-part script in seven commands per child (the call itself counted) where it
#: takes thirteen or more: SADD's reply says whether the child is new (no SISMEMBER), one MGET
#: reads the chord's size and its adjustment, and the keys' expiry is set by the first child
#: on the keys it made and refreshed on all of them only past half their life (one TTL, not
#: five EXPIREs): the same window, give or take half of result_expires.
CHORD_PART_RETURN_LUA = """
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, ordered, score = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires, group_expires = tonumber(ARGV[5]), tonumber(ARGV[6])
local claim_expires = tonumber(ARGV[7])
local claim_token = ARGV[8]

-- A late duplicate after the chord's cleanup recreates nothing.
if redis.call('GET', ckey) == 'done' then
    return {-1, 0, 0, 0}
end
-- Once per task id and header index (a reused frozen signature has its own index).
if redis.call('SADD', dkey, tid .. ':' .. score) == 1 then
    if ordered == '1' then
        redis.call('ZADD', jkey, score, value)
    else
        redis.call('RPUSH', jkey, value)
    end
end
local readycount
if ordered == '1' then
    readycount = redis.call('ZCARD', jkey)
else
    readycount = redis.call('LLEN', jkey)
end
local sizes = redis.call('MGET', tkey, skey)
local totaldiff, size = sizes[1], sizes[2]
if expires > 0 then
    local ttl = redis.call('TTL', jkey)
    if ttl == -1 then
        -- The first child: the keys it made, and the adjustment's (INCR leaves it without one).
        -- The size key and the group's got theirs when the chord was made.
        redis.call('EXPIRE', jkey, expires)
        redis.call('EXPIRE', dkey, expires)
        if totaldiff then redis.call('EXPIRE', tkey, expires) end
    elseif ttl < expires / 2 then
        for _, key in ipairs({jkey, tkey, skey, dkey}) do
            redis.call('EXPIRE', key, expires)
        end
        if group_expires > 0 then
            redis.call('EXPIRE', gkey, group_expires)
        end
    end
end
local claimed = 0
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
    if redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires) then
        claimed = 1
    end
end

return {readycount, totaldiff, size, claimed}
"""


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
