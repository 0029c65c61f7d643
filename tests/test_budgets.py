"""Token and cost budgets are reservations: each call reserves its worst case before it
starts, so two worker processes of 32 threads racing cannot overshoot them together."""

from __future__ import annotations

import pytest

from tasktree.client import Client
from tasktree.models import TreeSpec

RACE = {"TASKTREE_OFFLINE_FANOUT": "6", "TASKTREE_CONCURRENCY": "32"}
PRICES = {"TASKTREE_INPUT_COST_PER_TOKEN": "0.0001", "TASKTREE_OUTPUT_COST_PER_TOKEN": "0.0002"}


@pytest.mark.parametrize("budget", [{"max_tokens": 3000}, {"max_tokens": 500}])
def test_a_token_budget_is_never_overshot_by_racing_workers(client, start_workers, budget) -> None:
    start_workers(2, extra_env=RACE)
    tree = client.wait(
        client.submit(TreeSpec.build(client.settings, "Map the field.", max_depth=2, **budget))
    )
    assert tree.status == "budget_exhausted"
    assert tree.calls > 0
    assert tree.prompt_tokens + tree.completion_tokens <= budget["max_tokens"]
    assert all(n.terminal for n in tree.nodes)


def test_a_cost_budget_is_never_overshot_by_racing_workers(settings_for, start_workers) -> None:
    start_workers(2, extra_env={**RACE, **PRICES})
    client = Client(settings_for(input_cost_per_token=0.0001, output_cost_per_token=0.0002))
    spec = TreeSpec.build(client.settings, "Map the field.", max_depth=2, max_cost=0.25)
    tree = client.wait(client.submit(spec))
    assert tree.status == "budget_exhausted"
    assert 0 < tree.cost_usd <= 0.25
