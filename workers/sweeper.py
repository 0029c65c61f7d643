"""Re-drive what a crash can lose beyond Celery's redelivery.

Two windows lose work for good even with late acknowledgement: Celery's Redis chord join claims
a callback's dispatch before publishing it (a worker killed in between leaves a chord whose
callback never comes), and kombu's Redis transport moves a message from its queue to the
unacked set in two steps. And a killed worker's message only comes back after the visibility
timeout (300 s). Every worker runs this loop; under a lock per node queue, one at a time:
- re-sends at once the node (or synthesis) of each run whose heartbeat in the queue's live
  index is a lease old: its worker died or froze, however busy the rest of the tree is;
- looks at that queue's trees quiet for `stall_seconds` and re-sends the synthesis of each
  delegated node whose children are all closed, and the task of each open node that holds no
  live claim (at most once per three stall periods).
Every task is idempotent, so a spare message is harmless. The loop cannot die: every failure
is logged and the next sweep comes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from tasktree import messages
from tasktree.errors import NotFoundError, log_loop_failure
from tasktree.recovery import Recovery
from tasktree.states import TREE_IDLE, NodeStatus

log = logging.getLogger(__name__)


def sweep_once(app: Any) -> int:
    """One sweep; returns how many messages were re-sent."""
    runtime = app.tasktree
    settings = runtime.settings
    recovery = Recovery(runtime.store)
    if not recovery.take_sweep_lock(settings.sweep_interval):
        return 0
    sent = redrive_dead_runs(app, recovery)
    stalled, idle = recovery.quiet_trees(settings.stall_seconds)
    recovery.forget(idle)
    recovery.expire_index()
    for tree_id in stalled:
        tree = runtime.store.tree(tree_id, with_nodes=False)
        queue = tree.queue or settings.node_queue
        synth_queue = tree.synth_queue or settings.synth_queue
        stuck = recovery.stuck(tree_id, redrive_after=3 * settings.stall_seconds)
        for node_id in stuck.due:
            log.warning("re-sending the synthesis of node %s in tree %s", node_id, tree_id)
            messages.send_synthesis(app, tree_id, node_id, synth_queue)
        for node in stuck.lost:
            log.warning("re-sending node %s (%s) of tree %s", node.id, node.status, tree_id)
            if node.status == NodeStatus.SYNTHESIZING:
                messages.send_synthesis(app, tree_id, node.id, synth_queue)
            else:
                messages.send_node(runtime.store, node.request(tree_id), queue)
        recovery.mark_redriven(tree_id, stuck.lost)
        sent += len(stuck.due) + len(stuck.lost)
    return sent


def redrive_dead_runs(app: Any, recovery: Recovery) -> int:
    """Send again the node or synthesis of each run whose worker stopped beating."""
    runtime = app.tasktree
    store, settings = runtime.store, runtime.settings
    sent = 0
    for tree_id, node_id, kind in recovery.dead_runs(settings.lease_seconds):
        try:
            tree, node = store.tree(tree_id, with_nodes=False), store.node(tree_id, node_id)
        except NotFoundError:
            continue  # the tree was deleted
        if tree.status in TREE_IDLE:
            continue  # finished or interrupted: nothing to run
        if node.terminal:  # its worker died after closing it, maybe before its chord fired
            parent = messages.send_due_synthesis(app, store, tree_id, node_id, settings.synth_queue)
            if parent is not None:
                log.warning(
                    "re-sending the synthesis of node %s in tree %s: node %s's worker died "
                    "before its chord fired",
                    *(parent, tree_id, node_id),
                )
                sent += 1
            continue
        log.warning("re-sending %s %s of tree %s: its run's worker died", kind, node_id, tree_id)
        if kind == "synthesis" or node.status == NodeStatus.SYNTHESIZING:
            messages.send_synthesis(app, tree_id, node_id, tree.synth_queue or settings.synth_queue)
        else:
            messages.send_node(store, node.request(tree_id), tree.queue or settings.node_queue)
        recovery.mark_redriven(tree_id, [node])
        sent += 1
    return sent


def start(app: Any) -> threading.Event:
    """Sweep every sweep_interval seconds in a daemon thread until the event is set."""
    stop = threading.Event()
    interval = app.tasktree.settings.sweep_interval

    def loop() -> None:
        while not stop.wait(interval):
            try:
                sweep_once(app)
            except Exception as e:  # noqa: BLE001 - the loop outlives any failure, logged
                if stop.is_set():
                    return  # the worker is leaving, and Redis may be gone before it
                log_loop_failure(log, "sweep failed (%s); trying again in %ss", e, interval)

    threading.Thread(target=loop, name="tasktree-sweeper", daemon=True).start()
    return stop
