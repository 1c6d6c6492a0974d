"""Who is running a step: host, pid and process start time, so a dead worker can be told apart
from a live one (and from a new process that reused the pid)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _start_ticks(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after its closing paren are fixed.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def current_worker(run_id: str) -> str:
    """This process's identity as the worker of `run_id`, for the run's `ergot/worker` tag.

    The run id is part of it because Dagster copies tags to a retry of the run: the retry must
    not be judged by its dead parent's worker.
    """
    pid = os.getpid()
    return f"{run_id}@{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}"


def worker_alive(identity: str, run_id: str) -> bool | None:
    """True/False for `run_id`'s worker on this host; None when it cannot be judged from here."""
    try:
        owner, rest = identity.split("@", 1)
        host, pid_text, ticks = rest.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if owner != run_id:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    if ticks and _start_ticks(pid) not in (None, ticks):
        return False  # the pid now belongs to another process
    state = Path(f"/proc/{pid}/stat")
    try:
        # A killed process that its parent has not reaped yet is a zombie: dead all the same.
        if state.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    except OSError:
        return False
    return True
