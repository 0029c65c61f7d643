"""One node run against the store: a recorded call is never paid for again by the next run."""

from __future__ import annotations

import fakeredis
import pytest

from tasktree import keys
from tasktree.llm import Models
from tasktree.models import Reply, TreeSpec
from tasktree.runner import NodeRun
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
    """Killed between recording a paid call and storing the step's outcome (a leaf's result,
    a decision): the next run replays the kept reply instead of calling the model again."""
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
