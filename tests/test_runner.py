"""One node run against the store: a recorded call is never paid for again by the next run."""

from __future__ import annotations

import fakeredis
import pytest

from tasktree import keys
from tasktree.llm import Models
from tasktree.models import Reply, TreeSpec
from tasktree.runner import Delegate, NodeRun
from tasktree.settings import load
from tasktree.store import Store


class Died(BaseException):
    """The worker was killed: nothing after this point of the run happens."""


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), load(redis_url=None))


class Model(Models):
    """The offline model, counting what it is paid for."""

    def __init__(self) -> None:
        super().__init__(load(redis_url=None))
        self.paid: list[str] = []

    def __call__(self, step, model, messages, json_mode=False) -> Reply:
        self.paid.append(step)
        return super().__call__(step, model, messages, json_mode)


def run(store: Store, tid: str, model: Model):
    node = store.node(tid, "0")
    return NodeRun(store, store.settings, tid, "0", "w", model).run_node(node.request(tid))


@pytest.mark.parametrize(
    ("depth", "dies_in", "paid_first", "paid_next"),
    [(0, "finish", ["execute"], []), (1, "decide", ["decide"], ["execute"])],
)
def test_a_run_killed_after_recording_a_call_is_replayed_not_paid_again(
    store: Store, monkeypatch, depth: int, dies_in: str, paid_first: list, paid_next: list
) -> None:
    """Stopped between paying for a call and storing the step's outcome: a decision's call is
    recorded at once, so a run killed before its decide script is replayed from the kept reply;
    a leaf's call is recorded by the finish that stores its result, so a run whose finish fails
    records the call on its way out and the next run replays it. Neither pays again."""
    tid = store.create_tree(TreeSpec.build(store.settings, "Name one colour.", max_depth=depth))
    real = getattr(Store, dies_in)

    def killed(*a, **kw):
        raise Died

    monkeypatch.setattr(Store, dies_in, killed)
    first = Model()
    with pytest.raises(Died):
        run(store, tid, first)
    monkeypatch.setattr(Store, dies_in, real)
    store.r.delete(*store.r.keys("*claim*"))  # the dead run's lease runs out
    second = Model()
    run(store, tid, second)
    node = store.node(tid, "0")
    assert (first.paid, second.paid) == (paid_first, paid_next)
    assert node.decision  # the replayed reply was used
    assert node.calls == len(first.paid) + len(second.paid)  # every paid call counted once
    assert not [f for f in store.r.hkeys(keys.node(tid, "0")) if f.startswith("kept_")]


def test_a_run_whose_end_redis_missed_is_ended_by_the_next_beat_not_counted_a_crash(
    store: Store,
) -> None:
    from tasktree.errors import StoreError
    from tasktree.leases import Leases

    tid = store.create_tree(TreeSpec(task="t", max_depth=0, max_children=2, max_nodes=5))
    real_end = store.end_run
    away = [True]

    def end_run(tree_id: str, node_id: str, token: str) -> None:
        if away[0]:
            raise StoreError("Redis is away")
        real_end(tree_id, node_id, token)

    store.end_run = end_run  # type: ignore[method-assign]
    leases = Leases(store, 15.0)
    leases.stop()  # no thread: the test beats by hand
    model = Model()
    node = store.node(tid, "0")
    runner = NodeRun(store, store.settings, tid, "0", "w", model, leases)
    # A needless run (the node is closed) that ends while Redis is away.
    store.finish(tid, "0", "completed", result="done")
    runner.run_node(node.request(tid))
    assert store.r.hget(keys.node(tid, "0"), "open_runs") == "1"  # still open in the store
    leases.renew_once()  # Redis still away: kept for the next beat
    assert store.r.hget(keys.node(tid, "0"), "open_runs") == "1"
    away[0] = False
    leases.renew_once()
    assert store.r.hget(keys.node(tid, "0"), "open_runs") == "0"
    assert model.paid == []


def test_a_delegation_sends_the_children_the_store_holds_whichever_run_decided(
    store: Store,
) -> None:
    """The run that stores a delegation sends its children from its own plan (no read back);
    a later run of the same node reads them from the store. Both send the same messages."""
    settings = load(redis_url=None, offline_fanout=3)
    tid = store.create_tree(TreeSpec.build(settings, "Plan a trip.", max_depth=2))
    root = store.node(tid, "0")
    model = Models(settings)
    first = NodeRun(store, settings, tid, "0", "w", model).run_node(root.request(tid))
    again = NodeRun(store, settings, tid, "0", "w", model).run_node(root.request(tid))
    stored = [n.request(tid) for n in store.tree(tid).nodes if n.parent_id == "0"]
    assert isinstance(first, Delegate)
    assert isinstance(again, Delegate)
    assert len(stored) == 3
    assert first.children == stored == again.children
