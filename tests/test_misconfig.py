"""A real provider's edges, through litellm's real HTTP client against a server on 127.0.0.1:
a key-less local server works as the README says, errors that cannot heal are not retried and
read as the provider's reason, and a node waiting on a retry says so."""

from __future__ import annotations

import json
import os
import time

import pytest

from tasktree import llm
from tasktree.errors import LLMError, TransientLLMError
from tasktree.settings import load
from tasktree.states import Step
from tests.helpers import FakeOpenAI, chat, is_decide
from tests.terminal import cli, embedded_env, stop_embedded

EXECUTE = json.dumps({"decision": "execute", "reason": "simple", "sub_tasks": []})


def answer(body, n):
    return 200, {}, chat(EXECUTE if is_decide(body) else "the answer")


@pytest.mark.integration
def test_a_keyless_local_server_works_as_configured_in_the_readme(tmp_path) -> None:
    with FakeOpenAI(answer) as server:
        env = embedded_env(
            tmp_path / "data", TASKTREE_MODEL="openai/my-model", TASKTREE_API_BASE=server.url
        )
        env.pop("OPENAI_API_KEY", None)
        try:
            out = cli(env, "submit", "Say hello.", "--json")
        finally:
            stop_embedded(tmp_path / "data")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"] == "the answer"
    assert len(server.requests) == 2  # decide, execute


@pytest.mark.integration
def test_an_error_that_cannot_heal_is_not_retried_and_reads_as_the_reason(tmp_path) -> None:
    def refuse(body, n):
        message = "Incorrect API key provided: sk-abc***xyz. You can find your key elsewhere."
        return 401, {}, {"error": {"message": message, "type": "invalid_request_error"}}

    with FakeOpenAI(refuse) as server:
        env = embedded_env(
            tmp_path / "data",
            TASKTREE_MODEL="openai/my-model",
            TASKTREE_API_BASE=server.url,
            TASKTREE_API_KEY="sk-wrong",
        )
        try:
            out = cli(env, "submit", "Say hello.", "--json")
        finally:
            stop_embedded(tmp_path / "data")
    assert out.returncode == 1
    root = json.loads(out.stdout)["nodes"][0]
    assert root["status"] == "failed"
    assert root["error"].startswith("openai/my-model: 401 Incorrect API key provided")
    assert "litellm" not in root["error"]
    assert len(server.requests) == 1


@pytest.mark.unit
def test_missing_credentials_are_final_not_transient() -> None:
    """litellm reports a missing key as a 500 InternalServerError; no retry heals it."""
    env = {k: os.environ.pop(k) for k in ("OPENAI_API_KEY",) if k in os.environ}
    try:
        with pytest.raises(LLMError) as info:
            llm.Models(load())(
                Step.EXECUTE, "openai/gpt-4o-mini", [{"role": "user", "content": "hi"}]
            )
    finally:
        os.environ.update(env)
    assert not isinstance(info.value, TransientLLMError)
    assert "Missing credentials" in str(info.value)
    assert "litellm" not in str(info.value)


@pytest.mark.integration
def test_a_node_waiting_on_a_retry_shows_the_attempt_and_when(
    env, settings_for, start_workers
) -> None:
    times: list[float] = []

    def slow_down(body, n):
        times.append(time.monotonic())
        if n == 0:
            return 429, {"Retry-After": "3"}, {"error": {"message": "rate limited, slow down"}}
        return answer(body, n)

    with FakeOpenAI(slow_down) as server:
        model_env = {
            "TASKTREE_MODEL": "openai/my-model",
            "TASKTREE_API_BASE": server.url,
            "TASKTREE_API_KEY": "sk-test",
        }
        start_workers(1, extra_env=model_env)
        cli_env = {**os.environ, **env, **model_env, "COLUMNS": "200"}
        tid = cli(cli_env, "submit", "Say hello.", "--no-wait").stdout.strip()
        deadline = time.monotonic() + 30
        view = ""
        while "attempt 2 in" not in view and time.monotonic() < deadline:
            view = cli(cli_env, "tree", tid).stdout
            time.sleep(0.2)
        assert "attempt 2 in" in view, view
        assert "rate limited, slow down" in view, view
        done = cli(cli_env, "watch", tid, "--json")
    tree = json.loads(done.stdout)
    assert tree["status"] == "completed"
    root = tree["nodes"][0]
    assert root["failed_decide"] == 1
    assert root["calls"] == 2
    assert root["last_error"] == "openai/my-model: 429 rate limited, slow down"
    # The provider's Retry-After (3 s) was honoured: the second request came no sooner.
    assert len(server.requests) == 3
    assert times[1] - times[0] >= 2.9
