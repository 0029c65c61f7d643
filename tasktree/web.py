"""The live web view (`tasktree serve`): recent trees at `/`, one tree at `/trees/ID` that
grows live from the tree's Redis event stream (server-sent events, resumable with
Last-Event-ID), and the CLI's actions (cancel a tree or a subtree, retry, raise a budget).

Actions need `TASKTREE_WEB_TOKEN` when the server listens beyond the loopback interface (and
are off there without one); every action also needs the `X-Tasktree` header, which a page of
another site cannot send without asking. Text from the tree (tasks, results, errors) reaches
the page as JSON and is shown as text, never as HTML.
"""

from __future__ import annotations

import html
import ipaddress
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tasktree.client import Client
from tasktree.errors import InputError, NotFoundError, TaskTreeError
from tasktree.keys import check_node_id, check_tree_id
from tasktree.models import Tree

EVENT_ID_RE = re.compile(r"\d{1,20}(-\d{1,20})?")  # a Redis stream id
PREVIEW_CHARS = 300  # of each result in the tree's JSON; a node's own JSON has all of it
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tree_doc(tree: Tree) -> dict[str, Any]:
    """A tree as the page reads it: results cut to a preview, the budgets left."""
    doc = tree.model_dump()
    for n in doc["nodes"]:
        n["result"] = n["result"][:PREVIEW_CHARS]
        n["attempts"] = len(n["attempts"])
    doc["left"] = {
        "nodes": tree.max_nodes - tree.reserved,
        "tokens": tree.max_tokens - tree.tokens if tree.max_tokens else None,
        "cost": tree.max_cost - tree.cost_usd if tree.max_cost else None,
    }
    doc["terminal"] = tree.terminal
    return doc


def create_app(client: Client, host: str, token: str = "") -> Starlette:
    """The web app over one client (its store, and its worker on the embedded default)."""
    view = View(client, loopback(host) or bool(token), token)
    return Starlette(
        routes=[
            Route("/", view.index),
            Route("/trees/{tree_id}", view.tree_page),
            Route("/trees/{tree_id}/events", view.events),
            Route("/api/trees/{tree_id}", view.tree_json),
            Route("/api/trees/{tree_id}/nodes/{node_id}", view.node_json),
            Route("/api/trees/{tree_id}/{action}", view.act, methods=["POST"]),
        ],
        exception_handlers={TaskTreeError: failed},
    )


async def run(fn: Callable[[], Any]) -> Any:
    """A blocking store call, off the event loop."""
    return await anyio.to_thread.run_sync(fn)


async def failed(request: Request, exc: Exception) -> Response:
    code = 404 if isinstance(exc, NotFoundError) else 400
    return JSONResponse({"error": str(exc)}, status_code=code)


class View:
    """The handlers, over one client's store."""

    def __init__(self, client: Client, actions: bool, token: str) -> None:
        self.client, self.store = client, client.store
        self.actions, self.token = actions, token

    async def index(self, request: Request) -> Response:
        trees = await run(lambda: self.store.list_trees(50, results=False))
        now = time.time()
        rows = "".join(
            f'<tr><td><a href="/trees/{t.id}">{t.id}</a></td>'
            f'<td class="st {html.escape(t.status)}">{html.escape(t.status)}</td>'
            f"<td>{t.done} / {t.reserved}</td><td>{t.calls}</td>"
            f"<td>{f'${t.cost_usd:.4f}' if t.cost_usd else '-'}</td>"
            f"<td>{age(now - t.created_at)}</td><td>{html.escape(t.task[:120])}</td></tr>"
            for t, _ in trees
        )
        return HTMLResponse(page_text("index.html").replace("{{rows}}", rows or NO_TREES))

    async def tree_page(self, request: Request) -> Response:
        tid = check_tree_id(request.path_params["tree_id"])
        await run(lambda: self.store.tree(tid, with_nodes=False))  # NotFoundError: 404
        page = page_text("tree.html").replace("{{tree_id}}", tid)
        return HTMLResponse(page.replace("{{actions}}", "1" if self.actions else "0"))

    async def tree_json(self, request: Request) -> Response:
        tid = check_tree_id(request.path_params["tree_id"])
        return JSONResponse(tree_doc(await run(lambda: self.store.tree(tid))))

    async def node_json(self, request: Request) -> Response:
        tid = check_tree_id(request.path_params["tree_id"])
        nid = check_node_id(request.path_params["node_id"])
        return JSONResponse((await run(lambda: self.store.node(tid, nid))).model_dump())

    async def events(self, request: Request) -> Response:
        tid = check_tree_id(request.path_params["tree_id"])
        await run(lambda: self.store.tree(tid, with_nodes=False))  # NotFoundError: 404
        since = request.headers.get("last-event-id") or request.query_params.get("since") or "0"
        if not EVENT_ID_RE.fullmatch(since):
            raise InputError(f"not an event id: {since[:40]!r}")
        return StreamingResponse(self.stream(tid, since), media_type="text/event-stream")

    async def stream(self, tid: str, since: str) -> AsyncIterator[str]:
        """Every event after `since`, then the new ones as they come; `end` once the tree is
        idle and everything it wrote was sent (the page then stops listening)."""
        follow = self.store.follow(tid, since, block_ms=1000)
        quiet = time.monotonic()
        while True:
            batch = await run(lambda: next(follow))
            for event_id, fields in batch:
                yield f"id: {event_id}\ndata: {json.dumps(fields)}\n\n"
            if batch:
                quiet = time.monotonic()
                continue
            tree = await run(lambda: self.store.tree(tid, with_nodes=False))
            if tree.idle:
                yield "event: end\ndata: {}\n\n"
                return
            if time.monotonic() - quiet > HEARTBEAT_S:
                quiet = time.monotonic()
                yield ": still here\n\n"

    def refused(self, request: Request) -> Response | None:
        if not self.actions:
            return JSONResponse({"error": "read-only: set TASKTREE_WEB_TOKEN"}, status_code=403)
        if request.headers.get("x-tasktree") != "1":
            return JSONResponse({"error": "missing X-Tasktree header"}, status_code=403)
        given = request.headers.get("authorization", "")
        if self.token and not secrets.compare_digest(given, f"Bearer {self.token}"):
            return JSONResponse({"error": "wrong or missing token"}, status_code=401)
        return None

    async def act(self, request: Request) -> Response:
        refused = self.refused(request)
        if refused is not None:
            return refused
        tid = check_tree_id(request.path_params["tree_id"])
        what = request.path_params["action"]
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise InputError("the body must be a JSON object")
        return JSONResponse(await run(lambda: perform(self.client, tid, what, body)))


def perform(client: Client, tid: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
    """One action, as the CLI command of the same name does it."""
    if what == "cancel" and body.get("node"):
        closed = client.cancel_subtree(tid, check_node_id(str(body["node"])))
        return {"cancelled": closed}
    if what == "cancel":
        return {"status": client.cancel(tid)}
    if what == "retry":
        nodes = [check_node_id(str(n)) for n in body.get("nodes") or []]
        return {"reopened": client.retry(tid, nodes)}
    if what == "budget":
        add = {
            "max_nodes": body.get("add_nodes"),
            "max_tokens": body.get("add_tokens"),
            "max_cost": body.get("add_cost"),
            "max_depth": body.get("add_depth"),
        }
        for name, value in add.items():
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise InputError(f"{name.replace('max_', 'add_')}: must be a positive number")
        return {"reopened": client.raise_budget(tid, **add)}
    raise NotFoundError(f"no action {what!r}")


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


NO_TREES = '<tr><td colspan="7">no trees yet: submit one</td></tr>'


def page_text(name: str) -> str:
    return resources.files("tasktree").joinpath("web", name).read_text()


class Server:
    """uvicorn serving the app on a socket bound here: in the foreground (`serve`) or in a
    daemon thread (`submit --web`)."""

    def __init__(self, client: Client, sock: socket.socket, token: str) -> None:
        import uvicorn

        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.actions = loopback(self.host) or bool(token)
        app = create_app(client, self.host, token)
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)

    @classmethod
    def listen(cls, client: Client, host: str, port: int, fallback: bool = False) -> Server:
        """Bind host:port (with `fallback`, any free port when that one is taken)."""
        token = client.settings.web_token
        try:
            sock = bind(host, port)
        except OSError as e:
            if not fallback:
                raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
            sock = bind(host, 0)
        return cls(client, sock, token.get_secret_value() if token else "")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> None:
        thread = threading.Thread(target=self.run, daemon=True, name="tasktree-web")
        thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise InputError(f"the web view could not start on {self.url}")
            time.sleep(0.05)


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a name such as localhost
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
