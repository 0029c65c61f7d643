"""tasktree: a recursive tree of generic LLM agents on Celery and Redis."""

__version__ = "0.1.0"
