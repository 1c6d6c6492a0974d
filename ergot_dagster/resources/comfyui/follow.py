"""Following one prompt: what state it is in, from websocket messages and from polling.

ComfyUI never says "queued" or "lost" in so many words, so the state is read from several places:

| state | how it is known |
| --- | --- |
| queued | the prompt is in `/queue`'s `queue_pending`; no `execution_start` for it yet |
| running | `execution_start` / `executing` for it, or it is in `queue_running` |
| succeeded | `execution_success`, or its history entry's `status_str` is `success` |
| failed | `execution_error` (with the node, its class and the exception), or history says `error` |
| interrupted | `execution_interrupted`, or an `error` history entry holding that message |
| unknown | in neither queue nor history (a restarted server forgets both) |

Messages for other prompts arrive on the same socket (progress of prompts submitted without a
client id is broadcast to everyone), so every message is matched on its `prompt_id`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ergot_dagster.resources.comfyui.graph import node_label
from ergot_dagster.resources.comfyui.protocol import HistoryEntry, WsMessage


class PromptState(StrEnum):
    """Where a prompt is, as far as the adapter knows."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    UNKNOWN = "unknown"


TERMINAL = frozenset({PromptState.SUCCEEDED, PromptState.FAILED, PromptState.INTERRUPTED})


@dataclass
class PromptTracker:
    """The adapter's picture of one prompt, updated from messages, `/queue` and `/history`."""

    prompt_id: str
    template: dict[str, Any]
    state: PromptState = PromptState.QUEUED
    ahead: int | None = None
    current_node: str | None = None
    step: tuple[int, int] | None = None
    cached: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    node_started: dict[str, float] = field(default_factory=dict)
    node_seconds: dict[str, float] = field(default_factory=dict)
    ws_outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    history: HistoryEntry | None = None
    done: bool = False  # `executing` with node null: the server is through with the prompt
    started_at: float | None = None
    ended_at: float | None = None
    server_ms: dict[str, int] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    # -- websocket ------------------------------------------------------------------------------

    def apply(self, message: WsMessage, now: float | None = None) -> bool:
        """Take one websocket message into account; True if it was about this prompt."""
        now = time.monotonic() if now is None else now
        data = message.data
        kind = message.type
        about = data.get("prompt_id")
        if about is None:
            # Servers before prompt ids in progress messages sent progress only to the client
            # whose prompt ran: while ours runs, it is ours.
            if kind == "progress" and self.state is PromptState.RUNNING:
                self._progress(data)
                return True
            return False
        if about != self.prompt_id:
            return False
        if isinstance(data.get("timestamp"), int):
            self.server_ms[kind] = data["timestamp"]
        if kind == "execution_start":
            self._running(now)
        elif kind == "execution_cached":
            nodes = data.get("nodes")
            if isinstance(nodes, list):
                self.cached |= {str(n) for n in nodes}
            self._running(now)
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                self._finish_node(now)
                self.done = True
                self.current_node = None
            else:
                self._running(now)
                node = str(node)
                if node != self.current_node:
                    self._finish_node(now)
                    self.current_node = node
                    self.node_started[node] = now
                    self.step = None
        elif kind == "progress":
            self._running(now)
            self._progress(data)
        elif kind == "executed":
            node = str(data.get("node"))
            if isinstance(data.get("output"), dict):
                self.ws_outputs[node] = data["output"]
            if node == self.current_node:
                self._finish_node(now)
                self.current_node = None
            else:
                self.finished.add(node)
        elif kind == "execution_success":
            self._end(PromptState.SUCCEEDED, now)
        elif kind == "execution_error":
            self.error = data
            self._end(PromptState.FAILED, now)
        elif kind == "execution_interrupted":
            self.error = data
            self._end(PromptState.INTERRUPTED, now)
        return True

    def _running(self, now: float) -> None:
        if self.state in (PromptState.QUEUED, PromptState.UNKNOWN):
            self.state = PromptState.RUNNING
            self.ahead = None
            self.started_at = self.started_at or now

    def _progress(self, data: dict[str, Any]) -> None:
        value, maximum = data.get("value"), data.get("max")
        node = data.get("node")
        if node is not None and str(node) != self.current_node:
            self.current_node = str(node)
        if (
            isinstance(value, int | float)
            and isinstance(maximum, int | float)
            and not isinstance(value, bool)
            and maximum > 0
        ):
            self.step = (int(value), int(maximum))

    def _finish_node(self, now: float) -> None:
        node = self.current_node
        if node is None:
            return
        self.finished.add(node)
        started = self.node_started.get(node)
        if started is not None:
            self.node_seconds[node] = round(now - started, 3)
        self.step = None

    def _end(self, state: PromptState, now: float) -> None:
        if self.state is PromptState.RUNNING and state is not PromptState.SUCCEEDED:
            self._finish_node(now)
        self.state = state
        self.ended_at = now
        self.started_at = self.started_at or now

    # -- polling --------------------------------------------------------------------------------

    def apply_queue(self, lane: str | None, ahead: int | None, now: float | None = None) -> None:
        """What `/queue` said: running, pending with `ahead` prompts before it, or absent."""
        now = time.monotonic() if now is None else now
        if self.terminal:
            return
        if lane == "running":
            self._running(now)
        elif lane == "pending":
            self.state = PromptState.QUEUED
            self.ahead = ahead
        else:
            self.state = PromptState.UNKNOWN

    def apply_history(self, entry: HistoryEntry, now: float | None = None) -> None:
        """The prompt's history entry: it is finished, and this says how."""
        now = time.monotonic() if now is None else now
        self.history = entry
        self.done = True
        if self.terminal:
            return
        status = entry.status
        if status is None or status.status_str == "success" or status.completed is True:
            # Servers before `status` in history (2023) only kept finished prompts' outputs.
            self._end(PromptState.SUCCEEDED, now)
            return
        interrupted = status.message("execution_interrupted")
        if interrupted is not None:
            self.error = interrupted
            self._end(PromptState.INTERRUPTED, now)
            return
        self.error = status.message("execution_error") or {}
        self._end(PromptState.FAILED, now)

    # -- reporting ------------------------------------------------------------------------------

    def fraction(self) -> float | None:
        """How far the prompt is, 0..1: finished nodes plus the running node's steps, over the
        nodes that will run (the cached ones do not). None while nothing is known."""
        if self.state is PromptState.SUCCEEDED:
            return 1.0
        if self.state is PromptState.QUEUED:
            return 0.0
        if self.state is not PromptState.RUNNING:
            return None
        total = len(set(self.template) - self.cached)
        if total <= 0:
            return None
        done = len((self.finished - self.cached) & set(self.template))
        partial = self.step[0] / self.step[1] if self.step else 0.0
        # Never 1.0 before the server says so: saving and the history are still to come.
        return min(0.99, (done + min(partial, 1.0)) / total)

    def describe(self, target: str) -> str:
        """A short progress message: where the prompt is and what it is doing."""
        prompt = f"prompt {self.prompt_id}"
        if self.state is PromptState.QUEUED:
            ahead = f" ({self.ahead} ahead of it)" if self.ahead else ""
            return f"{prompt} queued on {target}{ahead}"
        if self.state is PromptState.RUNNING:
            if self.current_node is None:
                return f"{prompt} running on {target}"
            label = node_label(self.template, self.current_node)
            if self.step:
                return f"{prompt}: {label} step {self.step[0]}/{self.step[1]}"
            return f"{prompt}: {label} running"
        return f"{prompt} {self.state.value}"
