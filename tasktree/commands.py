"""What each command does: talk to the client, print through Output. No parsing here."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from tasktree import render
from tasktree.client import Client, Events, read_task
from tasktree.control import Control
from tasktree.errors import InputError, TaskTreeError
from tasktree.keys import check_node_id, check_tree_id
from tasktree.models import Tree, TreeSpec
from tasktree.settings import Settings
from tasktree.states import TREE_TERMINAL, TreeStatus
from tasktree.store import Freed, Store

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK, EXIT_TREE_FAILED, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 130, 141
CANCEL_GRACE = 5.0  # seconds a cancel waits for running calls before it ends the tree itself


def tree_json(tree: Tree) -> dict[str, Any]:
    doc = tree.model_dump(exclude={"nodes"})
    doc["tree_id"] = doc.pop("id")
    doc["result"] = tree.result
    doc["nodes"] = [n.model_dump() for n in tree.nodes]
    return doc


def exit_status(tree: Tree) -> int:
    if tree.status == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_OK if tree.status == "completed" else EXIT_TREE_FAILED


@functools.cache
def _console_class() -> type[Console]:
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:  # Rich would exit 1; one path for every command
            self.quiet = True
            raise BrokenPipeError

    return _Console


def _console(**options: Any) -> Console:
    return _console_class()(**options)


class Output:
    """Where and how to print: Rich on a terminal, plain lines (never hard-wrapped) otherwise.
    Rich is loaded by the first command that prints through it."""

    @cached_property
    def console(self) -> Console:
        console = _console()
        return console if console.is_terminal else _console(width=100_000, soft_wrap=True)

    @cached_property
    def err(self) -> Console:
        return _console(stderr=True, soft_wrap=True)

    def json(self, doc: Any) -> None:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")

    def rule(self, title: str) -> None:
        if self.console.is_terminal:
            self.console.rule(title)
        else:
            print(f"--- {title} ---")

    def say(self, message: str) -> None:
        self.err.print(f"tasktree: {message}", markup=False, highlight=False)

    def follow(self, client: Client, tree_id: str, quiet: bool, timeout: float | None) -> Tree:
        """Wait for a tree: drawn live on a terminal, event lines when piped, silent for --json."""
        if quiet:
            return client.wait(tree_id, timeout=timeout, on_stall=self.say)
        if not self.console.is_terminal:

            def plain(batch: Events) -> None:
                for eid, ev in batch:
                    print(render.event_line(eid, ev), flush=True)

            return client.wait(tree_id, plain, timeout=timeout, on_stall=self.say)
        from rich.live import Live

        with Live(console=self.console, refresh_per_second=8, transient=False) as live:

            def redraw(batch: Events) -> None:
                live.update(render.tree_view(client.tree(tree_id)))

            tree = client.wait(tree_id, redraw, timeout=timeout, on_stall=self.say)
            live.update(render.tree_view(tree))
        return tree


def ask(question: str, choices: list[str], default: str) -> str:
    """One keypress-and-Enter answer on a terminal; the default without one or on EOF."""
    if not sys.stdin.isatty():
        return default
    from rich.prompt import Prompt

    try:
        return Prompt.ask(question, choices=choices, default=default, show_default=True)
    except EOFError:
        return default


def force_exit(client: Client, tree_id: str, out: Output) -> Callable[[int, Any], None]:
    """The second Ctrl-C's handler: leave now, wherever the main thread is, the embedded tree
    interrupted first (on a connection of its own: the main thread's may be mid-command)."""

    once = threading.Lock()  # the main thread's handler or the wakeup-fd thread, not both

    def handler(signum: int, frame: Any) -> None:
        once.acquire()  # the other one is leaving already: wait here for the exit
        if client.embedded:
            try:
                control = Control(Store.from_settings(client.settings))
                if control.interrupt(tree_id) == TreeStatus.CANCELLING:  # a cancel under way
                    out.say(f"tree {tree_id} {control.settle(tree_id, 'cancelled by user')}")
                else:
                    out.say(
                        f"tree {tree_id} interrupted; continue it with: tasktree resume {tree_id}"
                    )
            except TaskTreeError as e:
                out.say(f"could not mark tree {tree_id} interrupted: {e}")
        else:
            out.say(f"detached; tree {tree_id} runs on; follow it with: tasktree watch {tree_id}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    return handler


def on_second_press(exit_now: Callable[[int, Any], None]) -> None:
    """Also leave on the second Ctrl-C from a thread of its own. Python runs a handler on the
    main thread only when that thread runs again, and a main thread asleep in a read (the
    prompt) may not wake for it; the C-level handler writes every signal to the wakeup fd at
    once, and this thread is waiting there."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def wait() -> None:
        while True:
            data = os.read(r, 1)
            if data and data[0] == signal.SIGINT:
                exit_now(signal.SIGINT, None)

    threading.Thread(target=wait, name="tasktree-second-ctrl-c", daemon=True).start()


def stop_tree(client: Client, tree_id: str, out: Output) -> int:
    """After Ctrl-C: cancel the tree, or keep it (embedded: interrupted; else: left running).

    A second Ctrl-C at any point ends at once, the tree interrupted (embedded) or running."""
    keep = "keep it to resume later" if client.embedded else "detach and leave it running"
    answer = ask(f"\nStop tree {tree_id}: \\[c]ancel it, or \\[k] {keep}?", ["c", "k"], "k")
    if answer == "k":
        if client.embedded:
            client.interrupt(tree_id)
            out.say(
                f"tree {tree_id} interrupted, nothing lost; "
                f"continue it with: tasktree resume {tree_id}"
            )
        else:
            out.say(f"detached; tree {tree_id} runs on; follow it with: tasktree watch {tree_id}")
        return EXIT_INTERRUPTED
    client.cancel(tree_id)
    out.say(f"cancelling {tree_id}: no model call starts from now on")
    try:
        tree = client.wait(tree_id, timeout=CANCEL_GRACE)
    except TaskTreeError:
        tree = client.tree(tree_id, with_nodes=False)
    if tree.status == "cancelling":
        if client.embedded:  # its calls die with this process: end the tree now
            client.control.settle(tree_id)
        else:
            out.say(f"tree {tree_id} is cancelling; its running calls end on the workers")
            return EXIT_TREE_FAILED
    out.say(f"tree {tree_id} {client.tree(tree_id, with_nodes=False).status}")
    return EXIT_TREE_FAILED


def run_and_wait(client: Client, tree_id: str, args: argparse.Namespace, out: Output) -> int:
    def first_press(signum: int, frame: Any) -> None:
        # From now on a Ctrl-C leaves at once, whatever the main thread is doing.
        exit_now = force_exit(client, tree_id, out)
        signal.signal(signal.SIGINT, exit_now)
        on_second_press(exit_now)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first_press)
    try:
        tree = out.follow(client, tree_id, quiet=args.json, timeout=args.timeout)
    except KeyboardInterrupt:
        client.after_interrupt()
        return stop_tree(client, tree_id, out)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.set_wakeup_fd(-1)
    if args.json:
        out.json(tree_json(tree))
    else:
        if not out.console.is_terminal:
            out.console.print(render.tree_view(tree))
        out.rule("result")
        out.console.print(tree.result or "(no result)", markup=False, highlight=False)
        if tree.status == "interrupted":
            out.say(f"tree {tree_id} was interrupted; continue it with: tasktree resume {tree_id}")
    return exit_status(tree)


def cmd_submit(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    task = read_task(args.task, args.file, sys.stdin)
    spec = TreeSpec.build(
        settings,
        task,
        persona=args.persona,
        model=args.model,
        max_depth=args.max_depth,
        max_children=args.max_children,
        max_nodes=args.max_nodes,
        max_cost=args.max_cost,
        max_tokens=args.max_tokens,
        on_child_failure=args.on_child_failure,
        single_call=args.single_call,
        envelopes=args.envelopes,
    )
    if args.no_wait and not settings.redis_url:
        raise InputError("--no-wait needs TASKTREE_REDIS_URL and running workers")
    if args.web and args.no_wait:
        raise InputError("--web serves the view while the tree runs: leave out --no-wait")
    with Client(settings, worker=not args.no_wait) as client:
        tree_id = client.submit(spec)
        if args.no_wait:
            out.json({"tree_id": tree_id}) if args.json else print(tree_id)
            return EXIT_OK
        if args.web:
            from tasktree.web import Server

            server = Server.listen(client, settings.web_host, settings.web_port, fallback=True)
            server.start()
            out.say(f"live view: {server.url}/trees/{tree_id}")
        return run_and_wait(client, tree_id, args, out)


def cmd_serve(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from tasktree.web import Server

    host = args.host or settings.web_host
    port = settings.web_port if args.port is None else args.port
    # On the embedded default its worker runs what a retry or a raised budget reopens.
    with Client(settings, worker=True) as client:
        server = Server.listen(client, host, port)
        read_only = "" if server.actions else " (read-only: set TASKTREE_WEB_TOKEN for actions)"
        out.say(f"web view on {server.url}{read_only}; Ctrl-C stops it")
        server.run()
    return EXIT_OK


def cmd_resume(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    if args.no_wait and not settings.redis_url:
        raise InputError("--no-wait needs TASKTREE_REDIS_URL and running workers")
    with Client(settings, worker=not args.no_wait) as client:
        n = client.resume(args.tree_id)
        if args.no_wait:
            out.json({"tree_id": args.tree_id, "open_nodes": n}) if args.json else print(
                args.tree_id
            )
            return EXIT_OK
        if not args.json:
            out.say(f"resuming {args.tree_id}: {n} open node(s); stored results are reused")
        return run_and_wait(client, args.tree_id, args, out)


def cmd_retry(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    if args.no_wait and not settings.redis_url:
        raise InputError("--no-wait needs TASKTREE_REDIS_URL and running workers")
    changes = {
        "model": args.model,
        "max_depth": args.max_depth,
        "max_children": args.max_children,
        "max_nodes": args.max_nodes,
        "max_cost": args.max_cost,
        "max_tokens": args.max_tokens,
    }
    with Client(settings, worker=not args.no_wait) as client:
        reopened = client.retry(args.tree_id, args.nodes, **changes)
        if args.no_wait:
            doc = {"tree_id": args.tree_id, "reopened": reopened}
            out.json(doc) if args.json else print(args.tree_id)
            return EXIT_OK
        if not args.json:
            out.say(
                f"retrying {args.tree_id}: {len(reopened)} node(s) reopened "
                f"({', '.join(reopened)}); every other result is reused"
            )
        return run_and_wait(client, args.tree_id, args, out)


def cmd_budget(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    if args.no_wait and not settings.redis_url:  # a continued tree would have no worker
        raise InputError("--no-wait needs TASKTREE_REDIS_URL and running workers")
    add = {
        "max_nodes": args.add_nodes,
        "max_depth": args.add_depth,
        "max_tokens": args.add_tokens,
        "max_cost": args.add_cost,
    }
    with Client(settings, worker=not args.no_wait) as client:
        reopened = client.raise_budget(args.tree_id, **add)
        tree = client.tree(args.tree_id, with_nodes=False)
        budgets = (
            f"nodes {tree.max_nodes}, depth {tree.max_depth}, "
            f"tokens {tree.max_tokens or 'no limit'}, cost {tree.max_cost or 'no limit'}"
        )
        if not reopened or args.no_wait:
            if args.json:
                out.json({"tree_id": tree.id, "status": tree.status, "reopened": reopened})
            else:
                print(f"{tree.id} {tree.status}: budgets now {budgets}")
            return EXIT_OK
        if not args.json:
            out.say(
                f"budgets now {budgets}; continuing {tree.id}: {len(reopened)} node(s) reopened, "
                "every stored result reused"
            )
        return run_and_wait(client, args.tree_id, args, out)


def cmd_watch(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    with Client(settings, worker=False) as client:
        try:
            tree = out.follow(client, args.tree_id, quiet=args.json, timeout=args.timeout)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        if args.json:
            out.json(tree_json(tree))
        elif tree.status == "interrupted":
            out.say(f"tree {tree.id} is interrupted; continue it with: tasktree resume {tree.id}")
        return exit_status(tree)


def cmd_read(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    with Client(settings, worker=False) as client:
        if args.command == "pause":
            client.pause(args.tree_id)
            doc = {"tree_id": args.tree_id, "status": "interrupted"}
            out.json(doc) if args.json else print(
                f"{args.tree_id} paused (interrupted); continue it with: tasktree resume "
                f"{args.tree_id}"
            )
            return EXIT_OK
        if args.command == "cancel" and args.node_id:
            closed = client.cancel_subtree(args.tree_id, check_node_id(args.node_id))
            doc = {"tree_id": args.tree_id, "node_id": args.node_id, "cancelled": closed}
            out.json(doc) if args.json else print(
                f"{args.tree_id} subtree {args.node_id}: {len(closed)} open node(s) cancelled"
            )
            return EXIT_OK
        if args.command == "cancel":
            status = client.cancel(args.tree_id)
            out.json({"tree_id": args.tree_id, "status": status}) if args.json else print(
                f"{args.tree_id} {status}"
            )
            return EXIT_OK
        tree = client.tree(args.tree_id, with_nodes=args.command != "status")
    if args.command == "status":
        out.json(tree_json(tree)) if args.json else out.console.print(render.summary(tree))
        return EXIT_OK
    if args.command == "result":
        if args.json:
            out.json({"tree_id": tree.id, "status": tree.status, "result": tree.result})
        else:
            print(tree.result)
        return exit_status(tree) if tree.idle else EXIT_OK
    out.json(tree_json(tree)) if args.json else out.console.print(render.tree_view(tree))
    return EXIT_OK


def cmd_show(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    check_node_id(args.node_id)
    with Client(settings, worker=False) as client:
        node = client.store.node(args.tree_id, args.node_id)
        tree = client.tree(args.tree_id, with_nodes=False)
    if args.json:
        out.json(node.model_dump())
        return EXIT_OK
    for field, text in render.node_fields(node, tree):
        if "\n" in text or text.startswith("- "):
            out.console.print(f"[bold]{field}[/]:")
            out.console.print(text, markup=False, highlight=False)
        else:
            out.console.print(f"[bold]{field}[/]: ", end="")
            out.console.print(text, markup=False, highlight=False)
    return EXIT_OK


def cmd_list(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from rich.table import Table

    with Client(settings, worker=False) as client:
        trees = client.store.list_trees(args.limit)
    if args.json:
        docs = []
        for t, result in trees:
            doc = tree_json(t)
            doc.pop("nodes")
            doc["result"] = render.short(result, 200)
            docs.append(doc)
        out.json(docs)
        return EXIT_OK
    table = Table(box=None, pad_edge=False)
    for name in ("id", "submitted", "status", "nodes", "cost", "task"):
        table.add_column(name, no_wrap=True, justify="right" if name == "nodes" else "left")
    for t, _ in trees:
        table.add_row(
            t.id,
            render.clock(t.created_at),
            t.status,
            str(t.reserved),
            render.money(t.cost_usd, t.cost_unknown, t.calls),
            render.short(t.task.splitlines()[0] if t.task else "", 60),
        )
    out.console.print(table)
    return EXIT_OK


def cmd_export(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    with Client(settings, worker=False) as client:
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


def say_freed(freed: Freed, out: Output, as_json: bool) -> None:
    if as_json:
        out.json({"trees": freed.trees, "keys": freed.keys, "bytes": freed.bytes})
    else:
        trees = f"{freed.trees} tree" + "s" * (freed.trees != 1)
        print(f"deleted {trees}: {freed.keys} keys, {render.size(freed.bytes)} freed")


def cmd_delete(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    check_tree_id(args.tree_id)
    with Client(settings, worker=False) as client:
        freed = client.control.delete(args.tree_id, force=args.force)
    say_freed(freed, out, args.json)
    return EXIT_OK


def cmd_prune(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    statuses = frozenset(args.status) if args.status else TREE_TERMINAL
    with Client(settings, worker=False) as client:
        freed = client.control.prune(args.older_than, statuses)
    say_freed(freed, out, args.json)
    return EXIT_OK


COMMANDS = {
    "delete": cmd_delete,
    "prune": cmd_prune,
    "submit": cmd_submit,
    "resume": cmd_resume,
    "retry": cmd_retry,
    "budget": cmd_budget,
    "watch": cmd_watch,
    "show": cmd_show,
    "list": cmd_list,
    "export": cmd_export,
    "serve": cmd_serve,
}
