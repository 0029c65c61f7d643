"""The offline model: honest, deterministic, decomposes named parts, fans out on request."""

from __future__ import annotations

import json

from tasktree import prompts
from tasktree.offline import NOTICE, OfflineModel, parts_of
from tasktree.settings import load
from tasktree.states import Step

TASK = (
    "Design a web application for a community library. This includes database schema, "
    "backend API design, and frontend component structure."
)


def test_parts_are_found() -> None:
    objective, items = parts_of(TASK)
    assert objective == "Design a web application for a community library"
    assert items == ["database schema", "backend API design", "frontend component structure"]


def test_simple_task_has_no_parts() -> None:
    assert parts_of("Write a haiku about tea.")[1] == []


def test_decides_one_child_per_part_and_children_are_simple() -> None:
    m = OfflineModel(load())
    d = json.loads(m.reply(Step.DECIDE, prompts.decide("p", TASK, 6)))
    assert d["decision"] == "delegate"
    assert len(d["sub_tasks"]) == 3
    child = d["sub_tasks"][0]["task_details"]
    assert json.loads(m.reply(Step.DECIDE, prompts.decide("p", child, 6)))["decision"] == "execute"


def test_fanout_always_delegates() -> None:
    m = OfflineModel(load(offline_fanout=4))
    d = json.loads(m.reply(Step.DECIDE, prompts.decide("p", "anything", 6)))
    assert d["decision"] == "delegate"
    assert len(d["sub_tasks"]) == 4


def test_output_says_it_is_a_placeholder_and_is_deterministic() -> None:
    m = OfflineModel(load())
    a = m.reply(Step.EXECUTE, prompts.execute("You are a poet.", "Write a haiku."))
    assert a.startswith(NOTICE)
    assert a == m.reply(Step.EXECUTE, prompts.execute("You are a poet.", "Write a haiku."))


def test_synthesis_names_every_part() -> None:
    m = OfflineModel(load())
    text = m.reply(
        Step.SYNTHESIZE, prompts.synthesize("p", "obj", {"0.1 a": "A", "0.2 b": "B"}, {})
    )
    assert "Synthesis of 2 parts" in text
    assert "0.1 a" in text
    assert "0.2 b" in text


def test_random_latency_is_seeded_and_differs_between_siblings() -> None:
    m = OfflineModel(load(offline_latency="0.05-0.5", offline_seed=7))
    a, b = m.delay(prompts.execute("p", "a")), m.delay(prompts.execute("p", "b"))
    assert 0.05 <= a <= 0.5
    assert 0.05 <= b <= 0.5
    assert a != b
    assert a == OfflineModel(load(offline_latency="0.05-0.5", offline_seed=7)).delay(
        prompts.execute("p", "a")
    )
