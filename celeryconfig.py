"""Celery settings for tasktree, built from the TASKTREE_* environment (see tasktree.settings)."""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue  # type: ignore[attr-defined]

from tasktree.connection import is_sentinel, sentinel_master, without_master_name
from tasktree.settings import Settings

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def queue(name: str) -> Queue:
    """A queue bound to a direct exchange of its own name by a routing key of its own name."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for one settings object."""
    url = settings.redis_url or DEFAULT_URL
    # A killed worker's messages come back after visibility_timeout, found by a sweep every
    # restore_interval seconds (kombu's default sweep is 10 s x a throttle of 10).
    transport: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.restore_interval,
        "unacked_restore_throttle": 1,
    }
    backend_url = url
    if is_sentinel(url):
        transport["master_name"] = sentinel_master(url)
        backend_url = without_master_name(url)
    conf: dict[str, Any] = {
        "broker_url": url,
        # kombu's Redis transport, safe to close after the broker went away (tasktree/transport.py).
        "broker_transport": (
            "tasktree.transport:SentinelTransport"
            if is_sentinel(url)
            else "tasktree.transport:Transport"
        ),
        "result_backend": backend_url,
        # JSON only: pickle is refused on both sides.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A task is acknowledged after it ran; a killed worker's tasks come back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {
            k: v for k, v in transport.items() if k in ("visibility_timeout", "master_name")
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # One result backend per worker process, not one per pool thread: tasktree's backend
        # never subscribes to results (workers/backend.py), and the rest of it is a redis-py
        # client, which threads share. Per thread, each of 256 threads built its own backend
        # (reading redis-py's package metadata) and opened its own connection in its first
        # task: a worker's first tree ran a tenth slower than the next.
        "result_backend_thread_safe": True,
        "redis_max_connections": settings.redis_connections,  # shared by the pool's threads
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_expires": settings.result_ttl,
        # Flower and `celery events` see every task from its receipt (received, started,
        # succeeded, retried, failed). Not task-sent: one more event per task to build and fan
        # out; a task still queued shows in tasktree's views, and in Flower once received.
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        # I/O-bound LLM calls: threads, many of them.
        "worker_pool": settings.pool,
        "worker_concurrency": settings.concurrency,
        "worker_hijack_root_logger": False,
        # Each queue has its own direct exchange and routing key, so a message reaches exactly
        # the queue it is routed to (one shared key would deliver it to both).
        "task_default_queue": settings.node_queue,
        "task_default_exchange": settings.node_queue,
        "task_default_routing_key": settings.node_queue,
        "task_queues": [queue(settings.node_queue), queue(settings.synth_queue)],
        "task_routes": {
            "tasktree.node": {"queue": settings.node_queue, "routing_key": settings.node_queue},
            "tasktree.synthesize": {
                "queue": settings.synth_queue,
                "routing_key": settings.synth_queue,
            },
        },
    }
    if url.startswith("rediss://"):
        import ssl

        reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
        conf["broker_use_ssl"] = {"ssl_cert_reqs": reqs[settings.redis_ssl_cert_reqs]}
        conf["redis_backend_use_ssl"] = {"ssl_cert_reqs": reqs[settings.redis_ssl_cert_reqs]}
    return conf
