"""Redis URLs to clients: redis://, rediss://, unix:// and Sentinel, for the store and Celery."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from tasktree.errors import StoreError
from tasktree.settings import Settings

T = TypeVar("T")
_retrying = threading.local()  # inside a Patience loop on this thread (redis-py nests them)


class Patience(Retry):  # type: ignore[misc]
    """redis-py's retry, bounded by wall time rather than a count: a lost or silent Redis is
    tried again (with jittered backoff up to 1 s) until `seconds` have passed since the first
    failure, whether each try failed at once (refused) or after the socket timeout (frozen).
    redis-py retries a connect inside a command's retry; the inner one tries once, so the
    bound holds for the whole command."""

    def __init__(self, seconds: float) -> None:
        super().__init__(ExponentialWithJitterBackoff(base=0.05, cap=1.0), -1)
        self.seconds = seconds

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        if getattr(_retrying, "active", False):
            return do()
        self._backoff.reset()
        failures, deadline = 0, 0.0
        _retrying.active = True
        try:
            while True:
                try:
                    return do()
                except self._supported_errors as error:
                    if is_retryable and not is_retryable(error):
                        raise
                    failures += 1
                    fail(error, failures) if with_failure_count else fail(error)
                    deadline = deadline or time.monotonic() + self.seconds
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(self._backoff.compute(failures))
        finally:
            _retrying.active = False


def is_sentinel(url: str) -> bool:
    return url.startswith(("sentinel://", "sentinels://"))


def sentinel_master(url: str) -> str:
    """The master name of a Sentinel URL (`?master_name=`, default mymaster)."""
    return parse_qs(urlparse(url.split(";")[0]).query).get("master_name", ["mymaster"])[0]


def without_master_name(url: str) -> str:
    """A Sentinel URL as Celery's result backend takes it: the master name goes elsewhere."""
    return url.replace(f"?master_name={sentinel_master(url)}", "")


def connect(url: str, settings: Settings | None = None, patient: bool = True) -> redis.Redis:
    """A Redis client for the tree state, from a redis://, rediss://, unix:// or sentinel URL.

    A patient client retries connection errors for `redis_retry_seconds` (a Redis restart)."""
    opts: dict[str, Any] = {"decode_responses": True, "health_check_interval": 30}
    opts["socket_connect_timeout"] = 3
    # A Redis that stops answering (frozen, or a host gone without a reset) is a TimeoutError
    # after 5 s, retried like a lost connection, not a read blocked for good; every write is
    # safe to send again. Longer than any blocking read tasktree makes (XREAD: 1 s).
    opts["socket_timeout"] = 5
    opts["socket_keepalive"] = True
    seconds = settings.redis_retry_seconds if settings and patient else 0.0
    opts["retry"] = Patience(seconds)
    opts["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError]
    if settings is not None:
        opts["max_connections"] = settings.redis_connections
    if url.startswith("rediss://") and settings is not None:
        opts["ssl_cert_reqs"] = settings.redis_ssl_cert_reqs
    if is_sentinel(url):
        return _sentinel_client(url, opts)
    try:
        return redis.Redis.from_url(url, **opts)
    except ValueError as e:
        raise StoreError(f"invalid Redis URL: {e}") from None


def _sentinel_client(url: str, opts: dict[str, Any]) -> redis.Redis:
    """sentinel://[:pw@]host:port[;sentinel://host:port...]/db?master_name=NAME (kombu's form)."""
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


def redact(url: str) -> str:
    """A Redis URL without its password, fit for a log line or a message."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    if u.password is None:
        return url
    netloc = f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))
