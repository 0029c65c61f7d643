"""Tree shapes, seeded per-call latencies and critical paths shared by every system measured."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasktree.models import Node


def max_message_key(tree_id: str) -> str:
    """Where bench.instrumented records a tree's largest message."""
    return f"bench:max-message:{tree_id}"


@dataclass(frozen=True)
class Spec:
    """A full tree: `fanout` children per node down to `depth`; leaves skip the decision."""

    depth: int
    fanout: int
    lo: float = 0.0
    hi: float = 0.0
    seed: int = 0

    @property
    def nodes(self) -> int:
        return sum(self.fanout**d for d in range(self.depth + 1))

    @property
    def latency(self) -> str:
        return f"{self.lo}" if self.lo == self.hi else f"{self.lo}-{self.hi}"

    def lat(self, path: str, step: str) -> float:
        if self.hi <= 0:
            return 0.0
        if self.lo == self.hi:
            return self.lo
        digest = hashlib.sha256(f"{self.seed}:{path}:{step}".encode()).digest()
        return random.Random(digest).uniform(self.lo, self.hi)

    def critical_path(self, path: str = "0", depth: int = 0) -> float:
        if depth >= self.depth:
            return self.lat(path, "execute")
        below = max(self.critical_path(f"{path}.{i}", depth + 1) for i in range(1, self.fanout + 1))
        return self.lat(path, "decide") + below + self.lat(path, "synthesize")

    def as_dict(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "fanout": self.fanout,
            "lo": self.lo,
            "hi": self.hi,
            "seed": self.seed,
        }


def tree_critical_path(nodes: list[Node]) -> float:
    """The critical path of a tasktree tree from the latencies its calls recorded."""
    by_parent: dict[str, list[Node]] = {}
    for n in nodes:
        by_parent.setdefault(n.parent_id, []).append(n)

    def cp(n: Node) -> float:
        kids = by_parent.get(n.id, [])
        if not kids:
            return n.lat_decide + n.lat_execute
        return n.lat_decide + max(cp(k) for k in kids) + n.lat_synthesize

    return cp(next(n for n in nodes if n.id == "0"))
