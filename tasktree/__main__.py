"""python -m tasktree."""

from tasktree.cli import run

run()
