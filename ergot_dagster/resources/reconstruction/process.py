"""The adapter's side of the worker process: start it in its own process group, read its
progress lines, kill the group, and turn its exit into the plane's errors.

stdout and stderr go to files in the stage's workdir rather than pipes: nothing has to drain them
while the adapter sleeps between looks, and COLMAP's log stays readable after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import IO, Any

from ergot_dagster.errors import PermanentRuntimeError, RuntimeFailure, TransientRuntimeError
from ergot_dagster.media.process import stderr_tail

KILL_WAIT_S = 10.0


class WorkerProcess:
    """One running worker: `python -m <module> <job file>` in `workdir`."""

    def __init__(self, args: list[str], workdir: Path, what: str) -> None:
        self.what = what
        self.progress_file = workdir / "worker_progress.jsonl"
        self.errors_file = workdir / "worker_stderr.txt"
        self._offset = 0
        self._stdout: IO[bytes] = open(self.progress_file, "wb")  # noqa: SIM115 (closed in close)
        self._stderr: IO[bytes] = open(self.errors_file, "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._stdout,
                stderr=self._stderr,
                cwd=workdir,
                # Its own process group: a cancel kills the worker and anything it started.
                start_new_session=True,
            )
        except OSError as exc:
            self.close()
            raise PermanentRuntimeError(
                f"{what} cannot be started with {args[0]}: {type(exc).__name__}"
            ) from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def new_reports(self) -> list[dict[str, Any]]:
        """The complete JSON lines written on stdout since the last call."""
        with open(self.progress_file, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        reports = []
        for line in complete.splitlines():
            try:
                report = json.loads(line)
            except ValueError:
                continue  # not a progress line (a library printing to stdout)
            if isinstance(report, dict):
                reports.append(report)
        return reports

    def kill(self) -> str:
        """Kill the worker's process group, and say how it went; never raises."""
        if self.proc.poll() is not None:
            return f"{self.what} (pid {self.pid}) had already exited"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            return f"{self.what} (pid {self.pid}) was sent SIGKILL but has not exited yet"
        return f"killed {self.what} (pid {self.pid})"

    def failure(self, error_prefix: str, job_id: str) -> RuntimeFailure | None:
        """The error the worker's exit stands for, or None if it succeeded."""
        code = self.proc.returncode
        if code == 0:
            return None
        stderr = self.errors_file.read_text("utf-8", errors="replace")
        reported = [
            line[len(error_prefix) :]
            for line in stderr.splitlines()
            if line.startswith(error_prefix)
        ]
        if reported:
            try:
                doc = json.loads(reported[-1])
                message, permanent = str(doc["message"]), doc.get("permanent") is not False
            except (ValueError, KeyError, TypeError):
                message, permanent = reported[-1], True
            kind = PermanentRuntimeError if permanent else TransientRuntimeError
            return kind(message, job_id=job_id)
        if code is not None and code < 0:
            # Killed by a signal it did not send itself (the OOM killer, an operator).
            return TransientRuntimeError(
                f"{self.what} (pid {self.pid}) was killed by signal {-code}", job_id=job_id
            )
        return PermanentRuntimeError(
            f"{self.what} (pid {self.pid}) exited with status {code}: "
            f"{stderr_tail(stderr) or '(no output)'}",
            job_id=job_id,
        )

    def close(self) -> None:
        self._stdout.close()
        self._stderr.close()
