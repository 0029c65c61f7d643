"""Celery settings for tasktree, built from the TASKTREE_* environment (see tasktree.settings)."""

from __future__ import annotations

from typing import Any

from kombu import Queue

from tasktree.settings import Settings

DEFAULT_URL = "redis://127.0.0.1:6379/0"


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
    if url.startswith(("sentinel://", "sentinels://")):
        from urllib.parse import parse_qs, urlparse

        master = parse_qs(urlparse(url.split(";")[0]).query).get("master_name", ["mymaster"])[0]
        transport["master_name"] = master
        backend_url = (
            url.split("?")[0] if ";" not in url else url.replace(f"?master_name={master}", "")
        )
    conf: dict[str, Any] = {
        "broker_url": url,
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
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_expires": settings.result_ttl,
        # Flower and `celery events` see every task.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # I/O-bound LLM calls: threads, many of them.
        "worker_pool": settings.pool,
        "worker_concurrency": settings.concurrency,
        "worker_hijack_root_logger": False,
        "task_default_queue": settings.node_queue,
        "task_queues": [Queue(settings.node_queue), Queue(settings.synth_queue)],
        "task_routes": {
            "tasktree.node": {"queue": settings.node_queue},
            "tasktree.synthesize": {"queue": settings.synth_queue},
        },
    }
    if url.startswith("rediss://"):
        import ssl

        reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
        conf["broker_use_ssl"] = {"ssl_cert_reqs": reqs[settings.redis_ssl_cert_reqs]}
        conf["redis_backend_use_ssl"] = {"ssl_cert_reqs": reqs[settings.redis_ssl_cert_reqs]}
    return conf
