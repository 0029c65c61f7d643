"""The benchmark: tasktree against the critical path, the bare Celery floor and its peers."""
