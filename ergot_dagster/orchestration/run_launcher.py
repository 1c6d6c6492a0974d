"""The run launcher: Dagster's DefaultRunLauncher, able to tell whether a run's worker is alive,
and able to start a `remote` run on a remote code server.

The default launcher cannot check run worker health, so a worker killed mid-run (SIGKILL, OOM)
would leave its run STARTED until something else noticed. The step records its worker identity
in the run's `ergot/worker` tag; run monitoring asks this launcher about it, marks the run failed
when the worker is gone, and run retries then start a new run if the request allows.

A run whose `ergot/execution_target` is `remote` executes off-node (docs/offnode.md): it is
started on the remote code server named in this launcher's config, through the same gRPC call
Dagster's launcher makes to a local code server. Terminating it cancels the execution there, and
run monitoring asks that server whether it still runs the execution.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Self

from dagster import Field, IntSource, StringSource
from dagster._core.errors import DagsterUserCodeUnreachableError
from dagster._core.launcher import (
    CheckRunHealthResult,
    DefaultRunLauncher,
    LaunchRunContext,
    WorkerStatus,
)
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import ConfigurableClassData

from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.idempotency import duplicate_of
from ergot_dagster.orchestration.placement import CODE_SERVER_TAG, LAUNCHER_TAG
from ergot_dagster.orchestration.remote import (
    HELP,
    RemoteCodeServer,
    is_remote,
    launch_problems,
)
from ergot_dagster.orchestration.worker import worker_alive
from ergot_dagster.settings import ErgotSettings

logger = logging.getLogger("ergot.run_launcher")


class ErgotRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher plus a worker health check for run monitoring, and remote runs."""

    def __init__(
        self, inst_data: ConfigurableClassData | None = None, remote: RemoteCodeServer | None = None
    ) -> None:
        super().__init__(inst_data=inst_data)
        self.remote = remote
        # Run id -> when its remote server first failed to answer run monitoring (this process).
        self._unanswered_since: dict[str, float] = {}

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {
            "remote": Field(
                {
                    "host": Field(StringSource, description="the remote code server's address"),
                    "port": Field(IntSource, description="its gRPC port"),
                    "use_ssl": Field(bool, is_required=False, default_value=False),
                    "unreachable_timeout_seconds": Field(
                        float,
                        is_required=False,
                        default_value=120.0,
                        description="a running remote run whose server has not answered run "
                        "monitoring for this long is failed",
                    ),
                },
                is_required=False,
                description="where runs with execution_target remote execute (docs/offnode.md)",
            )
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> Self:
        remote = config_value.get("remote")
        return cls(
            inst_data=inst_data,
            remote=RemoteCodeServer(
                host=remote["host"],
                port=remote["port"],
                use_ssl=remote.get("use_ssl", False),
                unreachable_timeout_s=remote.get("unreachable_timeout_seconds", 120.0),
            )
            if remote
            else None,
        )

    # -- launching ---------------------------------------------------------------------------

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        first = duplicate_of(self._instance, run)
        if first is not None:
            # Two submissions of one request too close together for the queue to see both.
            self._instance.report_run_canceled(
                run, f"not started: request {run.tags.get(T.REQUEST_ID)!r} runs as {first.run_id}"
            )
            return
        if is_remote(run):
            self._launch_remote(run)
            return
        self._instance.add_run_tags(run.run_id, {LAUNCHER_TAG: "local"})
        super().launch_run(context)

    def _refuse(self, run: DagsterRun, reason: str) -> None:
        """Fail `run` before it starts; run retries must not start it again only to refuse it."""
        self._instance.add_run_tags(run.run_id, {T.MAX_RETRIES: "0"})
        self._instance.report_run_failed(run, f"Cannot run off-node: {reason}")

    def _launch_remote(self, run: DagsterRun) -> None:
        if self.remote is None:
            # Never run it here instead: a remote request asked not to use this node.
            self._refuse(
                run,
                "no remote code server is configured (`remote` in the run launcher's config "
                f"in dagster.yaml; {HELP})",
            )
            return
        problems = launch_problems(self._instance, run, ErgotSettings.from_env().storage)
        if problems:
            self._refuse(run, f"{'; '.join(problems)} ({HELP})")
            return
        self._instance.add_run_tags(
            run.run_id, {LAUNCHER_TAG: "remote", CODE_SERVER_TAG: self.remote.address}
        )
        try:
            DefaultRunLauncher.launch_run_from_grpc_client(
                self._instance, run, self.remote.client()
            )
        except DagsterUserCodeUnreachableError as exc:
            # Transient as far as the request goes: a run retry may find the server back.
            self._instance.report_run_failed(
                run, f"the remote code server {self.remote.address} did not answer: {exc}"
            )
            return
        self._run_ids.add(run.run_id)
        logger.info(f"run {run.run_id}: started on remote code server {self.remote.address}")

    def terminate(self, run_id: str) -> bool:
        # The run's `dagster/grpc_info` tag names the server that started it, remote or local:
        # Dagster's termination asks that server to cancel the execution.
        try:
            return super().terminate(run_id)
        except DagsterUserCodeUnreachableError as exc:
            run = self._instance.get_run_by_id(run_id)
            if run is not None:
                self._instance.report_engine_event(
                    f"could not reach the code server to cancel the run ({exc}); it stays "
                    "CANCELING until run monitoring's cancel timeout",
                    run,
                    cls=self.__class__,
                )
            return False

    # -- run monitoring ------------------------------------------------------------------------

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        if run.tags.get(LAUNCHER_TAG) == "remote":
            return self._remote_health(run)
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

    def _remote_health(self, run: DagsterRun) -> CheckRunHealthResult:
        """Ask the remote server that started `run` whether it still runs the execution."""
        address = run.tags.get(CODE_SERVER_TAG, "")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            return CheckRunHealthResult(
                WorkerStatus.UNKNOWN, f"no remote code server in {address!r}"
            )
        use_ssl = bool(self.remote and self.remote.address == address and self.remote.use_ssl)
        timeout = self.remote.unreachable_timeout_s if self.remote else 120.0
        server = RemoteCodeServer(host=host, port=int(port), use_ssl=use_ssl)
        worker = run.tags.get(T.WORKER, "not recorded yet")
        try:
            running = server.runs_execution(run.run_id)
        except DagsterUserCodeUnreachableError as exc:
            since = self._unanswered_since.setdefault(run.run_id, time.monotonic())
            silent = time.monotonic() - since
            if silent < timeout:
                return CheckRunHealthResult(
                    WorkerStatus.RUNNING,
                    f"remote code server {address} did not answer for {silent:.0f} s: {exc}",
                    transient=True,
                )
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                f"remote code server {address} has not answered for {silent:.0f} s; "
                f"run worker {worker} is presumed lost",
            )
        self._unanswered_since.pop(run.run_id, None)
        if running:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker {worker} on {address}")
        # The server answers but runs no such execution: the worker died, or the server was
        # restarted under it (its executions do not survive it).
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"remote code server {address} no longer runs this run (worker {worker})",
        )
