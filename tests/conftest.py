"""Fixtures: a real Redis, settings for one test, real worker processes, a client."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tasktree.client import Client
from tasktree.embedded import EmbeddedRedis
from tasktree.settings import Settings, load
from tests.helpers import WorkerProcess

# A developer's .env (DEPLOY.md says `cp .env.example .env`) must not change what tests see.
os.environ["TASKTREE_ENV_FILE"] = os.devnull

#: Fixtures that bring a real Redis server (and, through them, real worker processes).
SERVER_FIXTURES = frozenset({"redis_url", "r", "env", "settings_for", "client", "start_workers"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test is in one tier: `unit` (no server, no process), `integration` (a real Redis,
    real workers or the real CLI), `slow` (faults and long runs) or `containers` (a real
    Docker engine). A test or module marks
    itself integration or slow; a test using a server fixture is integration; the rest are
    unit, so a new test lands in the right tier without thinking about it."""
    for item in items:
        if any(item.get_closest_marker(m) for m in ("slow", "integration", "containers")):
            continue
        uses_server = SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.integration if uses_server else pytest.mark.unit)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TASKTREE_TEST_REDIS_URL (a database the tests may flush), else an embedded Redis."""
    url = os.environ.get("TASKTREE_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server.start()
    server.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def env(redis_url: str, r: redis.Redis, tmp_path: Path) -> dict[str, str]:
    """The environment of this test's workers and client: its own queues on the test Redis."""
    tag = uuid.uuid4().hex[:8]
    return {
        "TASKTREE_REDIS_URL": redis_url,
        "TASKTREE_NODE_QUEUE": f"tt-{tag}",
        "TASKTREE_SYNTH_QUEUE": f"tt-{tag}.synth",
        "TASKTREE_DATA_DIR": str(tmp_path / "data"),
        "TASKTREE_CONCURRENCY": "16",
    }


@pytest.fixture
def settings_for(env: dict[str, str]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base = {k.removeprefix("TASKTREE_").lower(): v for k, v in env.items()}
        return load(**{**base, **overrides})

    return make


@pytest.fixture
def client(settings_for: Callable[..., Settings]) -> Client:
    return Client(settings_for())


@pytest.fixture
def start_workers(
    env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., list[WorkerProcess]]]:
    """Start real `celery -A workers worker` processes; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(
        n: int = 1,
        extra_env: dict[str, str] | None = None,
        args: list[str] | None = None,
        names: list[str] | None = None,
    ) -> list[WorkerProcess]:
        batch = []
        for i in range(n):
            name = names[i] if names else f"w{len(started) + 1}-{uuid.uuid4().hex[:4]}@%h"
            w = WorkerProcess({**env, **(extra_env or {})}, name, tmp_path, args)
            started.append(w)
            batch.append(w)
        for w in batch:
            w.wait_ready()
        return batch

    yield start
    for w in started:
        w.kill()  # the test is over and its database is flushed: no warm shutdown to wait for
