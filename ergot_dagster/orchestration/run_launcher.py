"""The run launcher: Dagster's DefaultRunLauncher, able to tell whether a run's worker is alive.

The default launcher cannot check run worker health, so a worker killed mid-run (SIGKILL, OOM)
would leave its run STARTED until something else noticed. The step records its worker identity
in the run's `ergot/worker` tag; run monitoring asks this launcher about it, marks the run failed
when the worker is gone, and run retries then start a new run if the request allows.
"""

from __future__ import annotations

from dagster._core.launcher import (
    CheckRunHealthResult,
    DefaultRunLauncher,
    LaunchRunContext,
    WorkerStatus,
)
from dagster._core.storage.dagster_run import DagsterRun

from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.idempotency import duplicate_of
from ergot_dagster.orchestration.worker import worker_alive


class ErgotRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher plus a worker health check for run monitoring."""

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        first = duplicate_of(self._instance, run)
        if first is not None:
            # Two submissions of one request too close together for the queue to see both.
            self._instance.report_run_canceled(
                run, f"not started: request {run.tags.get(T.REQUEST_ID)!r} runs as {first.run_id}"
            )
            return
        super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        identity = run.tags.get(T.WORKER)
        if not identity or not identity.startswith(f"{run.run_id}@"):
            # The step has not started yet; run monitoring's start timeout covers this stretch.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "worker not recorded yet")
        alive = worker_alive(identity, run.run_id)
        if alive is False:
            return CheckRunHealthResult(
                WorkerStatus.FAILED, f"run worker {identity} is no longer running"
            )
        # Alive, or on another host where this process cannot look: trust the run's own events.
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker {identity}")
