"""Secrets never reach the store, the logs or Flower, even from a provider that echoes them."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from tasktree.client import Client
from tasktree.scrub import MASK, Scrubber
from tests.helpers import FakeOpenAI, Flower


def everything_in(r: redis.Redis) -> str:
    """Every key of the database and every value, read by type (DUMP may compress)."""
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        value: Any = {
            "string": lambda k: r.get(k),
            "hash": lambda k: r.hgetall(k),
            "list": lambda k: r.lrange(k, 0, -1),
            "set": lambda k: sorted(r.smembers(k)),
            "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
            "stream": lambda k: r.xrange(k),
            "none": lambda k: None,  # expired meanwhile
        }[kind](key)
        out.append(f"{key}={json.dumps(value, default=str)}")
    return "\n".join(out)


def test_a_provider_that_echoes_the_key_leaks_it_nowhere(
    env, r, settings_for, start_workers, tmp_path
) -> None:
    key = f"sk-proj-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    masked = f"sk-proj-****{key[-4:]}"

    def echo(body: dict, n: int) -> tuple[int, dict, dict]:
        auth = server.headers[n].get("Authorization", "")
        message = f"Incorrect API key provided: {masked}. You sent: {auth} (api_key={key})"
        return 401, {}, {"error": {"message": message, "type": "invalid_request_error"}}

    with FakeOpenAI(echo) as server:
        model_env = {
            "TASKTREE_MODEL": "openai/my-model",
            "TASKTREE_API_BASE": server.url,
            "TASKTREE_API_KEY": key,
        }
        with Flower({**env, **model_env}, tmp_path) as flower:
            (worker,) = start_workers(
                1, extra_env={**model_env, "LITELLM_LOG": "DEBUG"}, args=["--loglevel", "DEBUG"]
            )
            client = Client(settings_for(**{k[9:].lower(): v for k, v in model_env.items()}))
            tree = client.wait(client.submit("Say hello."), timeout=60)
            deadline = time.monotonic() + 30
            while not flower.get("/api/tasks") and time.monotonic() < deadline:
                time.sleep(0.3)
            seen_by_flower = json.dumps(flower.get("/api/tasks")) + json.dumps(
                flower.get("/api/workers?refresh=1")
            )
    # The provider was really called with the key, and really echoed it.
    assert server.headers
    assert server.headers[0]["Authorization"] == f"Bearer {key}"
    assert tree.status == "failed"
    root = tree.nodes[0]
    assert "401" in root.error
    assert MASK in root.error
    stored = everything_in(r)
    log = worker.log.read_text()
    assert "DEBUG" in log
    assert "Incorrect API key provided" in log
    assert "tasktree.node" in seen_by_flower
    for place, text in [("Redis", stored), ("the worker log", log), ("Flower", seen_by_flower)]:
        assert key not in text, place
        assert key[-20:] not in text, place
        assert masked not in text, place


def test_the_scrubber_removes_configured_secrets_and_key_shaped_strings() -> None:
    scrub = Scrubber(["hunter2-redis-pass", "abc"])  # too short to scrub by value: "abc"
    text = (
        "401 Incorrect API key provided: sk-proj-****abcd; Authorization: Bearer tok.en-1; "
        "url redis://:hunter2-redis-pass@host:6379/0 and redis://user:other@h/0; "
        'api_key="xyz123" password: p4ss; abc stays; completion_tokens: 5; max_tokens=7'
    )
    assert scrub(text) == (
        f"401 Incorrect API key provided: {MASK}; Authorization: Bearer {MASK}; "
        f"url redis://:{MASK}@host:6379/0 and redis://user:{MASK}@h/0; "
        f'api_key="{MASK}" password: {MASK}; abc stays; completion_tokens: 5; max_tokens=7'
    )
    for shape in (
        "sk-Proj-abcdefgh",
        "BEARER abc",
        "basic dXNlcjpw",
        "Api-Key: 1234",
        "ACCESS_TOKEN=z",
        "ſecret=xyz",
        "basıc dXNlcjpw",
        "PASSWD=hunter",
        "HTTPS://u:pw@host",
    ):  # every shape, in any case, is caught by the cheap look for a cue first
        assert MASK in scrub(f"x {shape} y"), shape
    assert scrub.secrets_only("the key sk-proj-example and hunter2-redis-pass") == (
        f"the key sk-proj-example and {MASK}"
    )
