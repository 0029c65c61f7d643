"""The `tasktree` command: parse arguments and run the command. No Redis or Celery here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from tasktree import __version__, scrub
from tasktree.commands import COMMANDS, EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, Output, cmd_read
from tasktree.errors import InputError, TaskTreeError
from tasktree.models import TreeSpec
from tasktree.scrub import Scrubber
from tasktree.settings import Settings, load
from tasktree.states import TREE_IDLE


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see {self.prog} --help)")


def prog_name(argv0: str) -> str:
    """The command the user ran: `tasktree` as installed, or `python -m tasktree`."""
    return "python -m tasktree" if Path(argv0).name == "__main__.py" else Path(argv0).name


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {v!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {n}")
        return n

    return parse


def positive_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {v!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {v}")
    return x


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(v: str) -> float:
    """'45s', '90m', '12h', '30d', '2w' -> seconds."""
    unit = v[-1:].lower()
    try:
        seconds = float(v[:-1]) * DURATION_UNITS[unit]
    except (KeyError, ValueError):
        seconds = float("nan")
    if not 0 <= seconds <= 100 * 365 * 86400:  # nan fails it too
        raise argparse.ArgumentTypeError(
            f"must be a number and a unit (s, m, h, d, w) up to 100 years, got {v!r}"
        )
    return seconds


def build_parser(prog: str = "tasktree") -> Parser:
    d = {name: f.default for name, f in Settings.model_fields.items()}
    spec = TreeSpec.model_fields
    p = Parser(prog=prog, description="A recursive tree of LLM agents on Celery and Redis.")
    p.add_argument("--version", action="version", version=f"tasktree {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    s = sub.add_parser("submit", help="submit a task and (by default) wait for its answer")
    s.add_argument("task", nargs="?", help="the task; `-` reads it from standard input")
    s.add_argument("--file", metavar="PATH", help="read the task from a file")
    s.add_argument("--persona", help="the root agent's system prompt (default: a generalist)")
    s.add_argument("--model", help="litellm model for this tree (default: TASKTREE_MODEL)")
    budget = [
        ("--max-depth", 0, 20, f"deepest level of sub-tasks (default: {d['max_depth']})"),
        ("--max-children", 1, 100, f"sub-tasks per node (default: {d['max_children']})"),
        ("--max-nodes", 1, 100_000, f"nodes per tree (default: {d['max_nodes']})"),
        ("--max-tokens", 1, 10**12, "token budget for the tree (default: none)"),
    ]
    for flag, low, high, text in budget:
        s.add_argument(flag, type=bounded_int(low, high), metavar="N", help=text)
    s.add_argument(
        "--max-cost", type=positive_float, metavar="USD", help="USD budget (default: none)"
    )
    s.add_argument(
        "--on-child-failure",
        choices=["continue", "fail"],
        default=spec["on_child_failure"].default,
        help="continue: a parent goes on without a failed child; fail: it fails too "
        "(default: continue)",
    )
    s.add_argument("--single-call", action="store_true", help="one call decides and answers")
    s.add_argument(
        "--envelopes",
        action=argparse.BooleanOptionalAction,
        help="each delegation splits the node's remaining budgets among its children "
        f"(default: {'on' if d['envelopes'] else 'off'}, TASKTREE_ENVELOPES)",
    )
    s.add_argument("--no-wait", action="store_true", help="print the tree id and return")
    s.add_argument(
        "--web",
        action="store_true",
        help="serve the live web view of this tree while it runs, and print its address",
    )
    _wait_options(s)

    r = sub.add_parser(
        "resume", help="continue an interrupted or paused tree, reusing what it stored"
    )
    r.add_argument("tree_id")
    r.add_argument("--no-wait", action="store_true", help="print the tree id and return")
    _wait_options(r)

    rt = sub.add_parser(
        "retry",
        help="run an ended tree's unfinished nodes again (or the named ones and their "
        "descendants), reusing every other result, and re-synthesize up to the root",
    )
    rt.add_argument("tree_id")
    rt.add_argument("nodes", nargs="*", metavar="NODE", help="node paths such as 0.2.1")
    rt.add_argument("--model", help="litellm model for the tree from now on")
    for flag, low, high, text in budget:
        what = text.split(" (default")[0] + " (default: as it was)"
        rt.add_argument(flag, type=bounded_int(low, high), metavar="N", help=what)
    rt.add_argument(
        "--max-cost", type=positive_float, metavar="USD", help="USD budget (default: as it was)"
    )
    rt.add_argument("--no-wait", action="store_true", help="print the tree id and return")
    _wait_options(rt)

    bu = sub.add_parser(
        "budget",
        help="raise a tree's budgets; a tree that ended on its budget continues where it stopped",
    )
    bu.add_argument("tree_id")
    bu.add_argument("--add-nodes", type=bounded_int(1, 100_000), metavar="N")
    bu.add_argument("--add-depth", type=bounded_int(1, 20), metavar="N")
    bu.add_argument("--add-tokens", type=bounded_int(1, 10**12), metavar="N")
    bu.add_argument("--add-cost", type=positive_float, metavar="USD")
    bu.add_argument("--no-wait", action="store_true", help="do not wait for a continued tree")
    _wait_options(bu)

    w = sub.add_parser("watch", help="follow a tree live until it ends; exits with its status")
    w.add_argument("tree_id")
    _wait_options(w)

    for name, text in [
        ("tree", "print the whole tree"),
        ("result", "print the final result"),
        ("status", "print the tree's state in one line"),
    ]:
        c = sub.add_parser(name, help=text)
        c.add_argument("tree_id")
        c.add_argument("--json", action="store_true", help="print JSON")

    pa = sub.add_parser(
        "pause", help="no model call starts until `resume`; calls in flight finish and are kept"
    )
    pa.add_argument("tree_id")
    pa.add_argument("--json", action="store_true", help="print JSON")

    ca = sub.add_parser(
        "cancel", help="stop a running tree, or one subtree of it (finished results are kept)"
    )
    ca.add_argument("tree_id")
    ca.add_argument(
        "node_id", nargs="?", help="only this node and its descendants; the rest goes on"
    )
    ca.add_argument("--json", action="store_true", help="print JSON")

    sh = sub.add_parser("show", help="one node in full")
    sh.add_argument("tree_id")
    sh.add_argument("node_id", help="a node path such as 0.2.1")
    sh.add_argument("--json", action="store_true", help="print JSON")

    ls = sub.add_parser("list", help="recent trees, newest first")
    ls.add_argument(
        "--limit",
        type=bounded_int(1, 10_000),
        default=20,
        metavar="N",
        help="how many (default: 20)",
    )
    ls.add_argument("--json", action="store_true", help="print JSON")

    de = sub.add_parser("delete", help="remove a tree and everything it stored")
    de.add_argument("tree_id")
    de.add_argument("--force", action="store_true", help="cancel a running tree first")
    de.add_argument("--json", action="store_true", help="print JSON")

    pr = sub.add_parser("prune", help="remove the trees that ended before a given age")
    pr.add_argument(
        "--older-than",
        type=duration,
        required=True,
        metavar="DURATION",
        help="ended longer ago than this: 45s, 90m, 12h, 30d",
    )
    pr.add_argument(
        "--status",
        action="append",
        choices=sorted(TREE_IDLE),
        help="only trees in this status (repeatable; default: every ended status; "
        "interrupted trees are pruned only when named, by their submission time)",
    )
    pr.add_argument("--json", action="store_true", help="print JSON")

    sv = sub.add_parser("serve", help="the live web view of the trees (Ctrl-C stops it)")
    sv.add_argument(
        "--host", help=f"address to listen on (default: {d['web_host']}, TASKTREE_WEB_HOST)"
    )
    sv.add_argument(
        "--port",
        type=bounded_int(0, 65535),
        metavar="N",
        help=f"port (default: {d['web_port']}, TASKTREE_WEB_PORT; 0: any free port)",
    )

    ex = sub.add_parser("export", help="a document of a tree: markdown or json")
    ex.add_argument("tree_id")
    ex.add_argument(
        "--format", choices=["markdown", "json"], default="markdown", help="(default: markdown)"
    )
    ex.add_argument(
        "--output", "-o", metavar="PATH", help="file to write (default: standard output)"
    )
    return p


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="stop waiting after this long, exit status 1 (default: wait until the tree ends)",
    )
    p.add_argument("--json", action="store_true", help="print only the final tree, as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status. Only bugs print tracebacks."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Output()
    scrubber = Scrubber([])  # key-shaped strings only, until the settings name the secrets
    try:
        args = build_parser(prog_name(sys.argv[0])).parse_args(argv)
        settings = load()
        scrubber = Scrubber.of(settings)
        scrub.install(scrubber)
        return COMMANDS.get(args.command, cmd_read)(args, settings, out)
    except TaskTreeError as e:
        out.say(f"error: {scrubber(' '.join(str(e).split()))}")
        return e.exit_status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `| head` closed the pipe: stop quietly
        return EXIT_BROKEN_PIPE


def run() -> None:
    """The console script. It leaves at once: everything it owed is stored or printed, and a
    model call abandoned by Ctrl-C would otherwise hold the interpreter's exit (which joins
    the worker pool's threads) until the call's timeout."""
    try:
        code = main()
    except SystemExit as e:  # --help and --version
        code = e.code if isinstance(e.code, int) else 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = EXIT_BROKEN_PIPE
    sys.stderr.flush()
    os._exit(code)
