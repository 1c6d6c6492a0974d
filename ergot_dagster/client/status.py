"""Reading runs and events out of GraphQL answers into the contract's models.

A run's per-artifact outcome comes from three places in Dagster: the materializations the run
recorded (materialized), the plane's own engine events (`artifact_reused`, `artifact_failed`) and
the step failure's metadata (`failed_artifacts`); whatever none of them mentions is pending,
skipped, failed or canceled according to how the run ended.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ergot_dagster.client.graphql import metadata_values
from ergot_dagster.client.models import (
    ArtifactOutcome,
    RunError,
    RunEvent,
    RunStatus,
)
from ergot_dagster.orchestration import tags as T
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.targets.routing import TARGET_TAG_PREFIX

EVENT_KIND_KEY = "ergot_event"


def _time(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if value else None


def event_time(timestamp: str) -> datetime:
    """GraphQL event timestamps are milliseconds since the epoch, as a string."""
    return datetime.fromtimestamp(float(timestamp) / 1000.0, tz=UTC)


def _request(tags: dict[str, str]) -> ProcessingRequest | None:
    raw = tags.get(T.REQUEST)
    if not raw:
        return None
    try:
        return ProcessingRequest.model_validate_json(raw)
    except ValidationError:
        return None


def run_event(event: dict[str, Any]) -> RunEvent:
    """One GraphQL event of a run's log as a contract `RunEvent`."""
    data = metadata_values(event.get("metadataEntries"))
    kind = data.pop(EVENT_KIND_KEY, None)
    if event.get("assetKey"):
        data["asset_key"] = "/".join(event["assetKey"]["path"])
        if event.get("partition"):
            data["partition"] = event["partition"]
    error = event.get("error")
    if error:
        data["error"] = error.get("message")
        data["error_class"] = error.get("className")
    failure = event.get("failureMetadata")
    if failure:
        data.update(metadata_values(failure.get("metadataEntries")))
        if failure.get("description"):
            data["description"] = failure["description"]
    return RunEvent(
        run_id=event["runId"],
        timestamp=event_time(event["timestamp"]),
        type=event.get("eventType") or event["__typename"],
        kind=kind if isinstance(kind, str) else None,
        level=event.get("level") or "INFO",
        message=event.get("message") or "",
        step_key=event.get("stepKey"),
        data=json.loads(json.dumps(data, default=str)),
    )


def _run_error(events: list[RunEvent]) -> RunError | None:
    """The run's failure as the contract states it: the step's own failure first."""
    step = next((e for e in reversed(events) if e.type == "STEP_FAILURE"), None)
    if step is not None:
        return RunError(
            message=step.data.get("description") or step.data.get("error") or step.message,
            error_type=step.data.get("error_type") or step.data.get("error_class"),
            retryable=bool(step.data.get("retryable", False)),
            step=step.step_key,
        )
    run = next((e for e in reversed(events) if e.type in ("RUN_FAILURE", "PIPELINE_FAILURE")), None)
    if run is not None:
        return RunError(message=run.data.get("error") or run.message)
    return None


def _finished_outcome(status: str) -> str:
    return {"SUCCESS": "skipped", "FAILURE": "failed", "CANCELED": "canceled"}.get(
        status, "pending"
    )


def needs_events(run: dict[str, Any]) -> bool:
    """Whether the run's outcome cannot be told from the run alone (only finished runs that did
    not record every artifact they were asked for, or did not succeed)."""
    if run["status"] not in ("SUCCESS", "FAILURE", "CANCELED"):
        return False
    if run["status"] != "SUCCESS":
        return True
    recorded = {"/".join(m["assetKey"]["path"]) for m in run.get("assetMaterializations") or []}
    return any("/".join(k["path"]) not in recorded for k in _artifact_keys(run))


def _artifact_keys(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        key
        for key in run.get("assetSelection") or []
        if len(key["path"]) == 3 and key["path"][:2] != ["ergot", "source"]
    ]


def run_status(run: dict[str, Any], events: list[RunEvent] | None = None) -> RunStatus:
    """A GraphQL `Run` (the `RunFields` fragment), with its events when the outcome needs them."""
    tags = {t["key"]: t["value"] for t in run.get("tags") or []}
    status = run["status"]
    outcomes: dict[str, ArtifactOutcome] = {}
    for key in _artifact_keys(run):
        path = "/".join(key["path"])
        outcomes[path] = ArtifactOutcome(name=key["path"][-1], asset_key=path, status="pending")
    by_name = {o.name: o for o in outcomes.values()}

    error = _run_error(events or [])
    for event in events or []:
        outcome = by_name.get(str(event.data.get("artifact")))
        if outcome is None:
            continue
        if event.kind == "artifact_reused":
            outcome.status = "reused"
            outcome.ref = event.data.get("ref")
            outcome.sha256 = event.data.get("sha256")
        elif event.kind == "artifact_failed":
            outcome.status = "failed"
            outcome.error = event.data.get("error") or event.message
    if error is not None:
        failed = next(
            (e.data.get("failed_artifacts") for e in events or [] if e.type == "STEP_FAILURE"),
            None,
        )
        for name, detail in (failed or {}).items():
            if name in by_name and isinstance(detail, dict):
                by_name[name].status = "failed"
                by_name[name].error = detail.get("message")
    for materialization in run.get("assetMaterializations") or []:
        path = "/".join(materialization["assetKey"]["path"])
        values = metadata_values(materialization["metadataEntries"])
        outcome = outcomes.get(path)
        if outcome is None:
            continue
        outcome.status = "materialized"
        outcome.ref = values.get("ref")
        outcome.sha256 = values.get("sha256")
        outcome.media_type = values.get("media_type")
        outcome.error = None
    for outcome in outcomes.values():
        if outcome.status == "pending":
            outcome.status = _finished_outcome(status)  # type: ignore[assignment]
            if outcome.status == "failed" and error is not None:
                outcome.error = error.message

    return RunStatus(
        run_id=run["runId"],
        request_id=tags.get(T.REQUEST_ID),
        workflow=tags.get(T.WORKFLOW),
        source_ref=tags.get(T.SOURCE_REF),
        status=status,
        priority=int(tags.get(T.PRIORITY, "0") or 0),
        execution_target=tags.get(T.EXECUTION_TARGET),
        targets=sorted(
            k.removeprefix(TARGET_TAG_PREFIX) for k in tags if k.startswith(TARGET_TAG_PREFIX)
        ),
        created_at=_time(run.get("creationTime")),
        started_at=_time(run.get("startTime")),
        ended_at=_time(run.get("endTime")),
        parent_run_id=run.get("parentRunId"),
        root_run_id=run.get("rootRunId"),
        artifacts=list(outcomes.values()),
        error=error if status == "FAILURE" else None,
        request=_request(tags),
        tags=tags,
    )
