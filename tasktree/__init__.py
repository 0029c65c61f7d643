"""tasktree: a recursive tree of LLM agents on Celery and Redis.

import tasktree
tree = tasktree.submit("Plan a launch. This includes pricing, messaging, and channels.")
print(tree.status, tree.result)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasktree.client import Client, submit
    from tasktree.errors import TaskTreeError
    from tasktree.models import Node, Tree, TreeSpec
    from tasktree.settings import Settings, load

__version__ = "0.2.0"

__all__ = [
    "Client",
    "Node",
    "Settings",
    "TaskTreeError",
    "Tree",
    "TreeSpec",
    "__version__",
    "load",
    "submit",
]

#: Where each public name lives: imported on first use, so a command loads only what it needs.
_HOME = {
    "Client": "tasktree.client",
    "submit": "tasktree.client",
    "TaskTreeError": "tasktree.errors",
    "Node": "tasktree.models",
    "Tree": "tasktree.models",
    "TreeSpec": "tasktree.models",
    "Settings": "tasktree.settings",
    "load": "tasktree.settings",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'tasktree' has no attribute {name!r}")
