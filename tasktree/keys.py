"""Every Redis key name tasktree uses, under one namespace and the tree's hash tag, and the
ids that go into them, checked whole before they reach a key."""

import re
import secrets
import time

from tasktree.errors import InputError
from tasktree.states import Step

NAMESPACE = "tasktree"

#: Sorted set of every tree id, scored by submission time (for `list`).
TREES = f"{NAMESPACE}:trees"
#: Sorted set of the trees not yet seen finished by the sweeper.
RUNNING = f"{NAMESPACE}:running"
#: Sorted set of ended trees, scored by when their keys expire (s): the sweeper then takes
#: them out of TREES.
EXPIRING = f"{NAMESPACE}:expiring"


def queue(name: str) -> str:
    """List: a Celery queue's waiting messages, as kombu's Redis transport keeps them (at
    priority 0, under the queue's own name; workers BRPOP it)."""
    return name


def sweep_lock(queue: str) -> str:
    """String with a lease: one worker of a node queue at a time sweeps that queue's trees."""
    return f"{NAMESPACE}:sweep-lock:{queue}"


def live(queue: str) -> str:
    """Sorted set: the runs in progress of a node queue's trees ("tree|node|kind|token"),
    scored by Redis's clock (ms) at their last heartbeat; a stale score is a dead worker."""
    return f"{NAMESPACE}:live:{queue}"


def live_member(tree_id: str, node_id: str, kind: str, token: str) -> str:
    """One run's member of a live index: kind is "node" or "synthesis"."""
    return f"{tree_id}|{node_id}|{kind}|{token}"


def parse_live_member(member: str) -> tuple[str, str, str, str] | None:
    """(tree, node, kind, token) of a live index member, or None if it is not one."""
    parts = member.split("|")
    if len(parts) != 4 or parts[2] not in ("node", "synthesis"):
        return None
    tree_id, node_id, kind, token = parts
    if not (TREE_ID_RE.fullmatch(tree_id) and NODE_ID_RE.fullmatch(node_id)):
        return None
    return tree_id, node_id, kind, token


def node_of_live_member(member: str) -> str:
    """The node hash a live index member's run is for (a key that never exists for a member
    that is not one)."""
    parsed = parse_live_member(member)
    return node(*parsed[:2]) if parsed else f"{NAMESPACE}:no-such-node"


def _limit(model: str) -> str:
    # Every key of one model's limit carries {model}, so its scripts touch one Cluster slot.
    return f"{NAMESPACE}:limit:{{{model}}}"


def slots(model: str) -> str:
    """Sorted set: the calls of a model in flight across every worker (claim token, scored by
    its lease's end in Redis ms; renewed by the heartbeat, so a dead worker's expire)."""
    return f"{_limit(model)}:slots"


def calls_last_minute(model: str) -> str:
    """Sorted set: the calls of a model started in the last minute (scored by Redis ms)."""
    return f"{_limit(model)}:minute"


def adapted(model: str) -> str:
    """Hash with a TTL: the model's concurrency cut down after a 429 (`cap`, `cut_at`)."""
    return f"{_limit(model)}:adapted"


def waiting(model: str) -> str:
    """Sorted set: the calls waiting for a slot of a model, by when they began to wait (Redis
    ms); a call that ends is handed its slot in this order."""
    return f"{_limit(model)}:waiting"


def waiting_lapse(model: str) -> str:
    """Sorted set: the same waiting calls, by when their entry lapses (Redis ms): each waiter
    renews it every 3 s (store.SLOT_POLL), so a dead worker's waiters are skipped, not handed
    slots, 9 s after it died."""
    return f"{_limit(model)}:lapse"


def grant(model: str, token: str = "") -> str:
    """List: the one entry a waiting call pops when it is handed a slot (the prefix, with no
    token, for the scripts that hand slots on)."""
    return f"{_limit(model)}:grant:{token}"


TREE_ID_RE = re.compile(r"[0-9a-f]{16}")  # use fullmatch: `$` also matches before "\n"
NODE_ID_RE = re.compile(r"0(\.[1-9][0-9]{0,3})*")


def _tag(tree_id: str) -> str:
    # Every key of one tree carries {tree_id}, so they share a Redis Cluster slot.
    return f"{NAMESPACE}:{{{tree_id}}}"


def tree(tree_id: str) -> str:
    """Hash: the tree's task, budgets, status and totals."""
    return f"{_tag(tree_id)}:tree"


def node(tree_id: str, node_id: str) -> str:
    """Hash: one node's persona, instructions, status, decision, result, usage, and the
    tokens of its runs that started and have not ended (`runs`; a crash leaves one)."""
    return f"{_tag(tree_id)}:node:{node_id}"


def nodes(tree_id: str) -> str:
    """List: node ids in creation order."""
    return f"{_tag(tree_id)}:nodes"


def events(tree_id: str) -> str:
    """Stream: every state change of the tree, bounded in length."""
    return f"{_tag(tree_id)}:events"


def claim(tree_id: str, node_id: str, step: str) -> str:
    """String with a lease: which attempt holds a node's LLM step."""
    return f"{_tag(tree_id)}:claim:{node_id}:{step}"


def calls(tree_id: str) -> str:
    """Set: the ids of the tree's failed model calls already counted (a re-sent script skips
    them). A recorded call's id is kept in its node (`call_ids`)."""
    return f"{_tag(tree_id)}:calls"


def synthesis_sent(tree_id: str, node_id: str) -> str:
    """String with a lease: a node's synthesis was sent outside its chord."""
    return f"{_tag(tree_id)}:synth-sent:{node_id}"


def node_prefix(tree_id: str) -> str:
    """A tree's node key name without the node id (for its Lua scripts)."""
    return node(tree_id, "")


def of_tree(tree_id: str, node_ids: list[str]) -> list[str]:
    """Every key a tree with these nodes can have (some may not exist)."""
    per_node = [
        k
        for nid in node_ids
        for k in (
            node(tree_id, nid),
            synthesis_sent(tree_id, nid),
            *(claim(tree_id, nid, s) for s in Step),
        )
    ]
    return [tree(tree_id), nodes(tree_id), events(tree_id), calls(tree_id), *per_node]


def parent_id(node_id: str) -> str:
    """The parent's path ("0.2" for "0.2.1")."""
    return node_id.rpartition(".")[0]


def ancestors(node_id: str) -> list[str]:
    """The paths above a node, nearest first ("0.2", "0" for "0.2.1")."""
    parts = node_id.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def child_id(parent_id: str, index: int) -> str:
    """Deterministic child id: the parent's path plus the 1-based child index."""
    return f"{parent_id}.{index}"


ROOT = "0"


def new_tree_id() -> str:
    """A 16-hex-digit id that sorts by creation time (ms) and is unguessable enough."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)[:5]}"


def check_tree_id(tree_id: str) -> str:
    """Reject ids that are not ours before they reach a key name."""
    if not isinstance(tree_id, str) or not TREE_ID_RE.fullmatch(tree_id):
        raise InputError(f"invalid tree id {tree_id!r}: expected 16 hex digits")
    return tree_id


def check_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
        raise InputError(f"invalid node id {node_id!r}: expected a path such as 0.2.1")
    return node_id
