"""Running a media tool as a child process with a deadline, and killing it when we must.

Every wait on a runtime is bounded: a tool that stops making progress fails the step with a clear
timeout instead of hanging the run. The child gets its own process group so that a cancelled run
(Dagster raises an interrupt in the run worker) takes the tool and anything it spawned with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

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


def run_process(
    args: Sequence[str],
    *,
    timeout_s: float,
    tool: str,
    check: bool = True,
    cwd: str | None = None,
) -> ProcessResult:
    """Run `args` to completion within `timeout_s` seconds.

    Raises `RuntimeTimeoutError` when the deadline passes (the process group is killed first) and,
    with `check`, `PermanentRuntimeError` carrying the tail of stderr when the tool exits non-zero.
    An interrupt while waiting (run cancellation) kills the process group before propagating.
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
        stdout, stderr_bytes = proc.communicate(timeout=timeout_s)
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
