"""Cancelling one subtree of a running tree: the rest goes on, the parent synthesizes from
what it has, and no model call starts in the subtree after the command returns (measured
from the provider's own log of requests)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tasktree.client import Client
from tasktree.models import Node, TreeSpec
from tests.helpers import FakeOpenAI, chat, is_decide, is_synthesis
from tests.terminal import cli

LATENCY = 1.5  # a call in flight outlasts the CLI that cancels or pauses (about 0.5 s)
MODEL_ENV = {"TASKTREE_MODEL": "openai/fake", "TASKTREE_API_KEY": "sk-test"}


class Provider:
    """Splits the report into sections A-C and each section into three parts; every call
    takes LATENCY seconds; each request's start time and task text is logged."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, body: dict, n: int) -> tuple[int, dict, dict]:
        text = str(body["messages"][-1]["content"])
        with self.lock:
            self.log.append((time.time(), text))
        time.sleep(LATENCY)
        if is_synthesis(body):
            return 200, {}, chat("synthesis")
        if not is_decide(body):
            return 200, {}, chat("done")
        if "Write the report." in text:
            subs = [(f"You write section {s}.", f"Write section {s}.") for s in "ABC"]
        elif "<task>\nWrite section" in text:
            section = text.split("<task>\nWrite section ")[1][0]
            subs = [
                (f"You write part {p}.", f"Write part {p} of section {section}.") for p in "123"
            ]
        else:
            return 200, {}, chat(json.dumps({"decision": "execute", "reason": "small"}))
        plan = {
            "decision": "delegate",
            "reason": "parts",
            "sub_tasks": [{"requested_persona": p, "task_details": t} for p, t in subs],
        }
        return 200, {}, chat(json.dumps(plan))


def until(client: Client, tree_id: str, what: str, seen: Callable[[list[Node]], bool]) -> None:
    deadline = time.monotonic() + 60
    while not seen(client.tree(tree_id).nodes):
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


def executing_in_b(nodes: list[Node]) -> bool:
    return any(n.id.startswith("0.2.") and n.status == "executing" for n in nodes)


def section_deciding(nodes: list[Node]) -> bool:
    return any(n.id.count(".") == 1 and n.status == "deciding" for n in nodes)


@contextlib.contextmanager
def report(
    env: dict[str, str],
    client: Client,
    start_workers: Callable[..., Any],
    what: str,
    seen: Callable[[list[Node]], bool],
) -> Iterator[tuple[Provider, dict[str, str], str]]:
    """The report tree on a worker with the logging provider, running until `seen`: the
    provider, the environment for a CLI on the same store, the tree id."""
    provider = Provider()
    with FakeOpenAI(provider) as server:
        model_env = {**MODEL_ENV, "TASKTREE_API_BASE": server.url}
        start_workers(1, extra_env=model_env)
        tid = client.submit(TreeSpec.build(client.settings, "Write the report.", max_depth=2))
        until(client, tid, what, seen)
        yield provider, {**env, **model_env}, tid


def test_cancelling_a_subtree_stops_its_calls_and_the_rest_completes(
    env, client, start_workers
) -> None:
    what = "a leaf of section B with its call in flight"
    with report(env, client, start_workers, what, executing_in_b) as (provider, cli_env, tid):
        out = cli(cli_env, "cancel", tid, "0.2", "--json")
        returned = time.time()
        assert out.returncode == 0, out.stderr
        closed = json.loads(out.stdout)["cancelled"]
        assert "0.2" in closed
        tree = client.wait(tid, timeout=60)

    nodes = {n.id: n for n in tree.nodes}
    subtree = [n for nid, n in nodes.items() if nid == "0.2" or nid.startswith("0.2.")]
    assert {n.status for n in subtree} == {"cancelled"}
    assert all("cancelled by user (subtree 0.2)" in n.notes for n in subtree)
    assert sum(n.waste_calls for n in subtree) >= 1  # the call in flight, paid, not counted
    for nid in ("0.1", "0.3"):  # the siblings went on
        assert nodes[nid].status == "completed"
        assert all(nodes[c].status == "completed" for c in nodes[nid].children)
    assert nodes["0"].status == "completed"
    assert sorted(k.split()[0] for k in nodes["0"].context_keys) == ["0.1", "0.3"]

    def in_subtree(text: str) -> bool:  # the call's own task is section B or one of its parts
        return "section B" in text.split("<task>\n", 1)[-1].split("\n</task>", 1)[0]

    late = [text for started, text in provider.log if started > returned and in_subtree(text)]
    assert late == []
    assert any(in_subtree(text) for _, text in provider.log)  # it did run before


def test_cancelling_a_subtree_of_a_tree_that_is_not_running_is_one_line(
    env, client, start_workers
) -> None:
    start_workers(1)
    tid = client.submit("Small.")
    client.wait(tid)
    out = cli(env, "cancel", tid, "0.1")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"tasktree: error: tree {tid} is completed: only a running tree's nodes cancel"
    )
    bad = cli(env, "cancel", tid, "0.1\n")
    assert bad.returncode == 2
    assert "invalid node id" in bad.stderr


def test_pause_starts_no_call_until_resume_and_nothing_is_paid_twice(
    env, client, start_workers
) -> None:
    what = "a section deciding, its call in flight"
    with report(env, client, start_workers, what, section_deciding) as (provider, cli_env, tid):
        out = cli(cli_env, "pause", tid)
        paused_at = time.time()
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == (
            f"{tid} paused (interrupted); continue it with: tasktree resume {tid}"
        )
        time.sleep(3 * LATENCY)  # the calls in flight come back, and nothing new starts
        paused = client.tree(tid)
        assert paused.status == "interrupted"
        assert [t for started, t in provider.log if started > paused_at] == []
        decided = [n for n in paused.nodes if n.id.count(".") == 1 and n.decision]
        assert decided  # what was in flight was stored
        resumed = cli(cli_env, "resume", tid, "--json", timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        tree = client.tree(tid)
    assert tree.status == "completed"
    # 1 + 3 decisions, 9 parts, 4 syntheses: each paid once, across the pause.
    assert tree.calls == len(provider.log) == 17
