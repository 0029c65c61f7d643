"""Every Redis key name tasktree uses, under one namespace and the tree's hash tag."""

import re

NAMESPACE = "tasktree"

#: Sorted set of every tree id, scored by submission time (for `list`).
TREES = f"{NAMESPACE}:trees"
#: Sorted set of the trees not yet seen finished by the sweeper.
RUNNING = f"{NAMESPACE}:running"
#: Lock so that one worker at a time sweeps for lost chord callbacks.
SWEEP_LOCK = f"{NAMESPACE}:sweep-lock"

TREE_ID_RE = re.compile(r"^[0-9a-f]{16}$")
NODE_ID_RE = re.compile(r"^0(\.[1-9][0-9]{0,3})*$")


def _tag(tree_id: str) -> str:
    # Every key of one tree carries {tree_id}, so they share a Redis Cluster slot.
    return f"{NAMESPACE}:{{{tree_id}}}"


def tree(tree_id: str) -> str:
    """Hash: the tree's task, budgets, status and totals."""
    return f"{_tag(tree_id)}:tree"


def node(tree_id: str, node_id: str) -> str:
    """Hash: one node's persona, instructions, status, decision, result, usage."""
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


def child_id(parent_id: str, index: int) -> str:
    """Deterministic child id: the parent's path plus the 1-based child index."""
    return f"{parent_id}.{index}"


ROOT = "0"
