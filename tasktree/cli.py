"""python -m tasktree: parse arguments, call the client, print. No Redis or Celery logic here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.live import Live

from tasktree import render
from tasktree.client import Client, Events, session
from tasktree.errors import InputError, TaskTreeError
from tasktree.models import Tree, TreeSpec
from tasktree.settings import Settings, load
from tasktree.store import check_node_id, check_tree_id

EXIT_OK, EXIT_TREE_FAILED, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise InputError(message)


def positive_int(name: str) -> Any:
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {v!r}") from None
        return n

    return parse


def build_parser() -> Parser:
    p = Parser(prog="python -m tasktree", description="A recursive tree of LLM agents on Celery.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("submit", help="submit a task and (by default) wait for its answer")
    s.add_argument("task")
    s.add_argument("--persona", help="the root agent's system prompt")
    s.add_argument("--model", help="litellm model string for this tree")
    s.add_argument("--max-depth", type=positive_int("--max-depth"))
    s.add_argument("--max-children", type=positive_int("--max-children"))
    s.add_argument("--max-nodes", type=positive_int("--max-nodes"))
    s.add_argument("--max-cost", type=float, help="USD budget for the whole tree")
    s.add_argument("--max-tokens", type=positive_int("--max-tokens"), help="token budget")
    s.add_argument("--on-child-failure", choices=["continue", "fail"], default="continue")
    s.add_argument("--single-call", action="store_true", help="one call decides or answers")
    s.add_argument("--no-wait", action="store_true", help="print the tree id and return")
    s.add_argument("--json", action="store_true")

    for name, text in [
        ("watch", "follow a tree live until it ends"),
        ("tree", "print the whole tree"),
        ("result", "print the final result"),
        ("status", "print the tree's state in one line"),
        ("cancel", "stop a running tree"),
    ]:
        c = sub.add_parser(name, help=text)
        c.add_argument("tree_id")
        c.add_argument("--json", action="store_true")

    sh = sub.add_parser("show", help="one node in full")
    sh.add_argument("tree_id")
    sh.add_argument("node_id")
    sh.add_argument("--json", action="store_true")

    ls = sub.add_parser("list", help="recent trees, newest first")
    ls.add_argument("--limit", type=positive_int("--limit"), default=20)
    ls.add_argument("--json", action="store_true")

    ex = sub.add_parser("export", help="a document of a tree: markdown or json")
    ex.add_argument("tree_id")
    ex.add_argument("--format", choices=["markdown", "json"], default="markdown")
    ex.add_argument("--output", "-o", help="file to write (default: standard output)")
    return p


def tree_json(tree: Tree) -> dict[str, Any]:
    doc = tree.model_dump(exclude={"nodes"})
    doc["tree_id"] = doc.pop("id")
    doc["result"] = tree.result
    doc["nodes"] = [n.model_dump() for n in tree.nodes]
    return doc


def exit_status(tree: Tree) -> int:
    return EXIT_OK if tree.status == "completed" else EXIT_TREE_FAILED


class Output:
    """Where and how to print: Rich on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self.console = Console()
        self.err = Console(stderr=True)

    def json(self, doc: Any) -> None:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")

    def follow(self, client: Client, tree_id: str) -> Tree:
        """Wait for a tree, drawing it live on a terminal or printing event lines."""
        if not self.console.is_terminal:

            def plain(batch: Events) -> None:
                for eid, ev in batch:
                    print(render.event_line(eid, ev), flush=True)

            return client.wait(tree_id, plain)
        with Live(console=self.console, refresh_per_second=8, transient=False) as live:

            def redraw(batch: Events) -> None:
                live.update(render.tree_view(client.tree(tree_id)))

            tree = client.wait(tree_id, redraw)
            live.update(render.tree_view(tree))
        return tree


def cmd_submit(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    for flag in ("max_cost", "max_tokens", "max_children", "max_nodes"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag.replace('_', '-')} must be greater than 0")
    if args.max_depth is not None and args.max_depth < 0:
        raise InputError("--max-depth must be 0 or more")
    spec = TreeSpec.build(
        settings,
        args.task,
        persona=args.persona,
        model=args.model,
        max_depth=args.max_depth,
        max_children=args.max_children,
        max_nodes=args.max_nodes,
        max_cost=args.max_cost,
        max_tokens=args.max_tokens,
        on_child_failure=args.on_child_failure,
        single_call=args.single_call,
    )
    if args.no_wait and not settings.redis_url:
        raise InputError("--no-wait needs TASKTREE_REDIS_URL and running workers")
    with session(settings, worker=not args.no_wait) as client:
        tree_id = client.submit(spec)
        if args.no_wait:
            out.json({"tree_id": tree_id}) if args.json else print(tree_id)
            return EXIT_OK
        tree = wait_interruptibly(client, tree_id, out, quiet=args.json)
        if args.json:
            out.json(tree_json(tree))
        else:
            out.console.print(render.tree_view(tree)) if not out.console.is_terminal else None
            out.console.rule("result")
            out.console.print(tree.result or "(no result)", markup=False, highlight=False)
        return exit_status(tree)


def wait_interruptibly(client: Client, tree_id: str, out: Output, quiet: bool) -> Tree:
    """Wait; on Ctrl-C ask whether to cancel the tree or just detach."""
    try:
        return client.wait(tree_id) if quiet else out.follow(client, tree_id)
    except KeyboardInterrupt:
        if sys.stdin.isatty():
            from rich.prompt import Confirm

            if Confirm.ask(f"\nCancel tree {tree_id}? (no: detach and leave it running)"):
                client.cancel(tree_id)
                out.err.print(f"cancelling {tree_id}; waiting for running calls to end")
                return client.wait(tree_id)
        out.err.print(
            f"detached from {tree_id}; follow it with: python -m tasktree watch {tree_id}"
        )
        raise SystemExit(130) from None


def cmd_read(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    with session(settings) as client:
        if args.command == "watch":
            tree = out.follow(client, args.tree_id)
            if args.json:
                out.json(tree_json(tree))
            return exit_status(tree)
        if args.command == "cancel":
            status = client.cancel(args.tree_id)
            out.json({"tree_id": args.tree_id, "status": status}) if args.json else print(
                f"{args.tree_id} {status}"
            )
            return EXIT_OK
        tree = client.tree(args.tree_id, with_nodes=args.command != "status")
        if args.command == "status":
            if args.json:
                out.json(tree_json(tree))
            else:
                out.console.print(render.summary(tree))
            return EXIT_OK
        if args.command == "result":
            if args.json:
                out.json({"tree_id": tree.id, "status": tree.status, "result": tree.result})
            else:
                print(tree.result)
            return exit_status(tree) if tree.terminal else EXIT_OK
        if args.json:
            out.json(tree_json(tree))
        else:
            out.console.print(render.tree_view(tree))
        return EXIT_OK


def cmd_show(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    check_node_id(args.node_id)
    with session(settings) as client:
        node = client.store.node(args.tree_id, args.node_id)
    if args.json:
        out.json(node.model_dump())
        return EXIT_OK
    for field, value in node.model_dump().items():
        if isinstance(value, str) and "\n" in value:
            out.console.print(f"[bold]{field}[/]:")
            out.console.print(value, markup=False, highlight=False)
        else:
            out.console.print(f"[bold]{field}[/]: ", end="")
            out.console.print(str(value), markup=False, highlight=False)
    return EXIT_OK


def cmd_list(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from datetime import datetime

    from rich.table import Table

    with session(settings) as client:
        trees = client.store.list_trees(args.limit)
    if args.json:
        out.json([tree_json(t) for t in trees])
        return EXIT_OK
    table = Table(box=None, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=16)
    table.add_column("submitted", no_wrap=True, min_width=14)
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("nodes", no_wrap=True, justify="right", min_width=5)
    table.add_column("cost", no_wrap=True, min_width=8)
    table.add_column("task", overflow="ellipsis", no_wrap=True, ratio=1)
    for t in trees:
        table.add_row(
            t.id,
            datetime.fromtimestamp(t.created_at).strftime("%m-%d %H:%M:%S"),
            t.status,
            str(t.reserved),
            render.money(t.cost_usd, t.cost_unknown),
            render.short(t.task.splitlines()[0] if t.task else "", 50),
        )
    out.console.print(table)
    return EXIT_OK


def cmd_export(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    with session(settings) as client:
        tree = client.tree(args.tree_id)
    text = (
        render.markdown(tree)
        if args.format == "markdown"
        else json.dumps(tree_json(tree), indent=2, default=str) + "\n"
    )
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise InputError(f"cannot write {args.output}: {e.strerror}") from None
    else:
        sys.stdout.write(text)
    return EXIT_OK


COMMANDS = {
    "submit": cmd_submit,
    "show": cmd_show,
    "list": cmd_list,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    out = Output()
    try:
        args = build_parser().parse_args(argv)
        settings = load()
        return COMMANDS.get(args.command, cmd_read)(args, settings, out)
    except TaskTreeError as e:
        sys.stderr.write(f"tasktree: error: {' '.join(str(e).split())}\n")
        return e.exit_status
    except KeyboardInterrupt:
        return 130
