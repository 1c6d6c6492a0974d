"""The typed client over Dagster's GraphQL API: submit a request, follow and cancel its run.

Submission plans the run with `requests.planning.plan_run` (the one path every entry point
takes) and launches it. A request id accepted before returns the existing run: the client looks
first, and the run queue makes sure of it when two submissions race (it answers the launch with
the request's first run).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from ergot_dagster.client.errors import (
    LaunchError,
    RequestConflictError,
    RequestRejectedError,
    UnknownRunError,
)
from ergot_dagster.client.graphql import GraphQLTransport
from ergot_dagster.client.models import RunHandle, RunStatus
from ergot_dagster.errors import ErgotError
from ergot_dagster.orchestration import tags as T
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.requests.planning import RequestCatalog, RunPlan, plan_run

WILL_RETRY = "dagster/will_retry"
LOCATION = "ergot"
REPOSITORY = "__repository__"

_RUN_FIELDS = """
  runId status creationTime startTime endTime parentRunId rootRunId
  tags { key value }
"""

RUN_QUERY = f"""
query Run($runId: ID!) {{
  runOrError(runId: $runId) {{
    __typename
    ... on Run {{ {_RUN_FIELDS} }}
    ... on RunNotFoundError {{ message }}
    ... on PythonError {{ message }}
  }}
}}"""

LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConflict { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message className }
    ... on Error { message }
  }
}"""

RUNS_BY_TAG_QUERY = f"""
query RunsByTag($key: String!, $value: String!) {{
  runsOrError(filter: {{tags: [{{key: $key, value: $value}}]}}) {{
    __typename
    ... on Runs {{ results {{ {_RUN_FIELDS} }} }}
    ... on PythonError {{ message }}
  }}
}}"""

TERMINATE_MUTATION = """
mutation Terminate($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunSuccess { run { runId status } }
    ... on TerminateRunFailure { message }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
    ... on Error { message }
  }
}"""


def _time(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if value else None


def _status(run: dict[str, Any]) -> RunStatus:
    tags = {t["key"]: t["value"] for t in run.get("tags") or []}
    return RunStatus(
        run_id=run["runId"],
        request_id=tags.get(T.REQUEST_ID),
        workflow=tags.get(T.WORKFLOW),
        status=run["status"],
        priority=int(tags.get(T.PRIORITY, "0") or 0),
        tags=tags,
        created_at=_time(run.get("creationTime")),
        started_at=_time(run.get("startTime")),
        ended_at=_time(run.get("endTime")),
        parent_run_id=run.get("parentRunId"),
        root_run_id=run.get("rootRunId"),
    )


class ErgotClient:
    """A client of one plane, at `base_url` (the Dagster webserver)."""

    def __init__(
        self,
        base_url: str,
        *,
        catalog: RequestCatalog,
        timeout_s: float = 30.0,
        location: str = LOCATION,
        repository: str = REPOSITORY,
    ) -> None:
        self._gql = GraphQLTransport(base_url, timeout_s=timeout_s)
        self._catalog = catalog
        self._location = location
        self._repository = repository

    def close(self) -> None:
        self._gql.close()

    # -- runs ------------------------------------------------------------------------------

    def _find_run(self, run_id: str) -> RunStatus | None:
        result = self._gql.execute(RUN_QUERY, {"runId": run_id})["runOrError"]
        if result["__typename"] == "Run":
            return _status(result)
        if result["__typename"] == "RunNotFoundError":
            return None
        raise LaunchError(result.get("message", "unexpected answer"))

    def status(self, run_id: str) -> RunStatus:
        """Where run `run_id` stands; `UnknownRunError` if there is no such run."""
        found = self._find_run(run_id)
        if found is None:
            raise UnknownRunError(f"unknown run {run_id!r}")
        return found

    def _retry_of(self, run: RunStatus) -> RunStatus | None:
        """The run Dagster started to retry `run`, if any yet."""
        if run.request_id is None:
            return None
        return next(
            (r for r in self.runs_of_request(run.request_id) if r.parent_run_id == run.run_id),
            None,
        )

    def wait(self, run_id: str, timeout_s: float, poll_s: float = 0.5) -> RunStatus:
        """Poll until the request's run is done, following run retries; `TimeoutError` after
        `timeout_s`.

        A failed run that Dagster will retry (`dagster/will_retry`) is not the end: the wait moves
        on to the retry, and returns the last run of the chain.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(run_id)
            if status.finished:
                if status.status != "FAILURE" or status.tags.get(WILL_RETRY) != "true":
                    return status
                retry = self._retry_of(status)
                if retry is not None:
                    run_id = retry.run_id
                    continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {status.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    def cancel(self, run_id: str, timeout_s: float = 30.0) -> RunStatus:
        """Cancel a queued run (it never starts) or a running one (it ends CANCELED).

        Dagster cannot terminate a run in the moment it is STARTING (its worker has no address
        yet); the cancel is tried again until the run has started, within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            result = self._gql.execute(TERMINATE_MUTATION, {"runId": run_id})["terminateRun"]
            kind = result["__typename"]
            if kind == "RunNotFoundError":
                raise UnknownRunError(f"unknown run {run_id!r}")
            if kind == "TerminateRunSuccess":
                return self.status(run_id)
            current = self.status(run_id)
            if current.finished:
                return current
            if current.status != "STARTING" or time.monotonic() >= deadline:
                raise LaunchError(f"could not cancel run {run_id}: {result.get('message', kind)}")
            time.sleep(0.5)

    # -- submission ------------------------------------------------------------------------

    def plan(self, request: ProcessingRequest) -> RunPlan:
        """Check `request` and plan its run, without launching anything."""
        try:
            return plan_run(request, self._catalog)
        except ErgotError as exc:
            raise RequestRejectedError(str(exc)) from exc

    def runs_of_request(self, request_id: str) -> list[RunStatus]:
        """Every run of a request: its first run and any retries, oldest first."""
        result = self._gql.execute(RUNS_BY_TAG_QUERY, {"key": T.REQUEST_ID, "value": request_id})[
            "runsOrError"
        ]
        if result["__typename"] != "Runs":
            raise LaunchError(result.get("message", "unexpected answer"))
        runs = [_status(run) for run in result["results"]]
        return sorted(runs, key=lambda r: r.created_at or datetime.min.replace(tzinfo=UTC))

    def _first_run(self, request_id: str) -> RunStatus | None:
        originals = [r for r in self.runs_of_request(request_id) if not r.parent_run_id]
        return originals[0] if originals else None

    def _accepted(self, request: ProcessingRequest, run: RunStatus, existing: bool) -> RunHandle:
        if run.tags.get(T.REQUEST_SHA256) != request.sha256:
            raise RequestConflictError(
                f"request id {request.request_id!r} was already used for a different request "
                f"(run {run.run_id}); use a new request id"
            )
        return RunHandle(
            run_id=run.run_id, request_id=request.request_id, status=run.status, existing=existing
        )

    def submit(self, request: ProcessingRequest) -> RunHandle:
        """Queue `request` as one run, or return the run it already has."""
        plan = self.plan(request)
        first = self._first_run(request.request_id)
        if first is not None:
            return self._accepted(request, first, existing=True)
        # The queue answers with the request's first run when another submission of the same
        # request id got there first; that run is this request's run.
        return self._accepted(request, self.launch(plan), existing=False)

    def launch(self, plan: RunPlan) -> RunStatus:
        """Launch a planned run through the queue, without looking for an earlier one first."""
        params = {
            "selector": {
                "repositoryLocationName": self._location,
                "repositoryName": self._repository,
                "jobName": plan.job_name,
                "assetSelection": [{"path": key} for key in plan.asset_keys],
                "assetCheckSelection": [
                    {"assetKey": {"path": key}, "name": name} for key, name in plan.check_keys
                ],
            },
            "runConfigData": plan.run_config,
            "executionMetadata": {
                "tags": [{"key": k, "value": v} for k, v in plan.tags.items()],
            },
        }
        result = self._gql.execute(LAUNCH_MUTATION, {"params": params})["launchRun"]
        if result["__typename"] == "LaunchRunSuccess":
            return self.status(result["run"]["runId"])
        errors = result.get("errors") or []
        detail = (
            "; ".join(e["message"] for e in errors) or result.get("message") or result["__typename"]
        )
        raise LaunchError(f"Dagster did not launch the run: {detail}")
