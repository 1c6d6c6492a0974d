"""Running a media tool as a child process with a deadline, and killing it when we must.

Every wait on a runtime is bounded: a tool that stops making progress fails the step with a clear
timeout instead of hanging the run. The child gets its own process group so that a cancelled run
(Dagster raises an interrupt in the run worker) takes the tool and anything it spawned with it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError

STDERR_TAIL_LINES = 12


@dataclass(frozen=True)
class ProcessResult:
    """What a finished child process left behind."""

    args: list[str]
    returncode: int
    stdout: bytes
    stderr: str
    pid: int
    elapsed_s: float


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stderr_tail(stderr: str, lines: int = STDERR_TAIL_LINES) -> str:
    kept = [line for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _drain(stream: IO[bytes], sink: list[bytes], lines: queue.Queue[str] | None) -> None:
    """Read a pipe to its end (so the child never blocks on a full pipe), keeping every byte."""
    for chunk in iter(stream.readline, b""):
        sink.append(chunk)
        if lines is not None:
            lines.put(chunk.decode("utf-8", errors="replace").rstrip("\n"))
    stream.close()


def _wait(
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    on_stdout_line: Callable[[str], None],
) -> tuple[bytes, bytes]:
    """Wait like `communicate`, handing each stdout line to `on_stdout_line` on this thread.

    The callback runs here, not on the reader thread, so it may touch things that are not
    thread-safe (a database session reporting progress).
    """
    out: list[bytes] = []
    err: list[bytes] = []
    lines: queue.Queue[str] = queue.Queue()
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out, lines), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err, None), daemon=True),
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            proc.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        while not lines.empty():
            on_stdout_line(lines.get_nowait())
        if finished:
            break
        if time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
    for reader in readers:
        reader.join()
    while not lines.empty():
        on_stdout_line(lines.get_nowait())
    return b"".join(out), b"".join(err)


def run_process(
    args: Sequence[str],
    *,
    timeout_s: float,
    tool: str,
    check: bool = True,
    cwd: str | None = None,
    on_stdout_line: Callable[[str], None] | None = None,
) -> ProcessResult:
    """Run `args` to completion within `timeout_s` seconds.

    Raises `RuntimeTimeoutError` when the deadline passes (the process group is killed first) and,
    with `check`, `PermanentRuntimeError` carrying the tail of stderr when the tool exits non-zero.
    An interrupt while waiting (run cancellation) kills the process group before propagating.
    With `on_stdout_line`, each line the tool writes to stdout is handed over as it comes.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=cwd,
    )
    try:
        if on_stdout_line is None:
            stdout, stderr_bytes = proc.communicate(timeout=timeout_s)
        else:
            stdout, stderr_bytes = _wait(proc, timeout_s, on_stdout_line)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        raise RuntimeTimeoutError(
            f"{tool} did not finish within {timeout_s:g} s and was killed", job_id=str(proc.pid)
        ) from exc
    except BaseException:
        # KeyboardInterrupt / DagsterExecutionInterruptedError from a cancelled run, or anything
        # else: never leave the tool running behind us.
        _kill_group(proc)
        raise
    stderr = stderr_bytes.decode("utf-8", errors="replace")
    result = ProcessResult(
        args=list(args),
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        pid=proc.pid,
        elapsed_s=time.monotonic() - started,
    )
    if check and proc.returncode != 0:
        raise PermanentRuntimeError(
            f"{tool} exited with status {proc.returncode}: {stderr_tail(stderr) or '(no output)'}",
            job_id=str(proc.pid),
        )
    return result
