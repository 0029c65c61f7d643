"""tasktree: a recursive tree of LLM agents on Celery and Redis.

import tasktree
tree = tasktree.submit("Plan a launch. This includes pricing, messaging, and channels.")
print(tree.status, tree.result)
"""

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
