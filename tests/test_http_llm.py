"""litellm's real HTTP client against an OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json

from tasktree.models import TreeSpec
from tests.helpers import FakeOpenAI, chat, is_decide, is_synthesis


def test_agent_talks_to_an_openai_compatible_server(client, start_workers, r) -> None:
    def handler(body, n):
        if is_decide(body):
            if "two parts" in body["messages"][1]["content"]:
                subs = [
                    {"requested_persona": "You are A.", "task_details": "Do part A."},
                    {"requested_persona": "You are B.", "task_details": "Do part B."},
                ]
                return (
                    200,
                    {},
                    chat(json.dumps({"decision": "delegate", "reason": "two", "sub_tasks": subs})),
                )
            return (
                200,
                {},
                chat(json.dumps({"decision": "execute", "reason": "simple", "sub_tasks": []})),
            )
        if is_synthesis(body):
            return 200, {}, chat("SYNTHESIS of A and B", 30, 7)
        return 200, {}, chat(f"ANSWER to {body['messages'][1]['content'][:20]}")

    with FakeOpenAI(handler) as server:
        (worker,) = start_workers(
            1,
            extra_env={
                "TASKTREE_MODEL": "openai/fake-model",
                "TASKTREE_API_BASE": server.url,
                "TASKTREE_API_KEY": "sk-test-secret",
            },
        )
        tid = client.submit(TreeSpec.build(client.settings, "A task with two parts."))
        tree = client.wait(tid)
    assert tree.status == "completed"
    assert tree.result == "SYNTHESIS of A and B"
    decide_calls = [b for b in server.requests if is_decide(b)]
    assert len(decide_calls) == 3
    assert all(b["response_format"] == {"type": "json_object"} for b in decide_calls)
    executions = [b for b in server.requests if not is_decide(b) and not is_synthesis(b)]
    assert sorted(b["messages"][0]["content"] for b in executions) == ["You are A.", "You are B."]
    assert all("response_format" not in b for b in executions)
    assert all(b["model"] == "fake-model" for b in server.requests)
    assert tree.calls == 6
    assert tree.prompt_tokens == 5 * 10 + 30
    assert tree.completion_tokens == 5 * 5 + 7
    assert {n.model for n in tree.nodes} == {"openai/fake-model"}
    # The key reached the provider, and nothing else: not the tree, its events, or the log.
    assert all(body.get("api_key") is None for body in server.requests)
    assert all("sk-test-secret" not in str(r.dump(k)) for k in r.keys("*"))
    assert "sk-test-secret" not in worker.log.read_text()
