"""The consumer contract: what a consumer sends and gets back, as pydantic models.

These models are the stable surface for every consumer of the plane. Their JSON Schemas are
exported to `docs/contract/schemas/` (`python -m ergot_dagster.client.schemas --write`) and locked
per `CONTRACT_VERSION` in `docs/contract/schemas.lock`: changing a model means changing the
version, or the tests fail.

The request itself is `requests.model.ProcessingRequest` and an artifact's manifest is
`artifacts.manifest.ArtifactManifest`; both are part of the contract and exported with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ergot_dagster.requests.model import ProcessingRequest

CONTRACT_VERSION = "1.4.0"

TERMINAL_STATUSES = ("SUCCESS", "FAILURE", "CANCELED")

RunState = Literal[
    "QUEUED",
    "NOT_STARTED",
    "MANAGED",
    "STARTING",
    "STARTED",
    "SUCCESS",
    "FAILURE",
    "CANCELING",
    "CANCELED",
]

ArtifactState = Literal["pending", "materialized", "reused", "skipped", "failed", "canceled"]


class RunHandle(BaseModel):
    """A submitted request's run; `existing` when the request id was accepted before."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    request_id: str
    status: RunState
    existing: bool = False


class ArtifactOutcome(BaseModel):
    """What became of one artifact the run was asked for."""

    model_config = ConfigDict(extra="forbid")

    name: str
    asset_key: str = Field(description="family/workflow/artifact, the Dagster asset key")
    status: ArtifactState = Field(
        description="pending (run not finished), materialized, reused (stored by an earlier "
        "attempt of this request), skipped (optional, not produced), failed, canceled"
    )
    ref: str | None = Field(default=None, description="the artifact ref, once stored")
    sha256: str | None = None
    media_type: str | None = None
    error: str | None = None


class RunError(BaseModel):
    """Why a run failed or was refused."""

    model_config = ConfigDict(extra="forbid")

    message: str
    error_type: str | None = Field(
        default=None, description="e.g. RequestError, RuntimeFailure, RoutingError"
    )
    retryable: bool = Field(
        default=False, description="whether trying again could help (a transient cause)"
    )
    step: str | None = None


class RunStatus(BaseModel):
    """Where a run stands, and what it has produced so far."""

    model_config = ConfigDict(extra="forbid")

    contract_version: str = CONTRACT_VERSION
    run_id: str
    request_id: str | None
    workflow: str | None = Field(description="name@version")
    source_ref: str | None = None
    status: RunState
    priority: int = 0
    execution_target: str | None = None
    targets: list[str] = Field(
        default_factory=list, description="runtime targets the run was routed to"
    )
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    parent_run_id: str | None = Field(default=None, description="the run this one retries")
    root_run_id: str | None = None
    artifacts: list[ArtifactOutcome] = Field(default_factory=list)
    error: RunError | None = None
    request: ProcessingRequest | None = Field(
        default=None, description="the request as accepted, its `context` untouched"
    )
    tags: dict[str, str] = Field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class RunPage(BaseModel):
    """One page of runs, newest first; pass `cursor` back for the next page."""

    model_config = ConfigDict(extra="forbid")

    runs: list[RunStatus]
    cursor: str | None = Field(default=None, description="the last run id of this page")
    has_more: bool


class RunEvent(BaseModel):
    """One entry of a run's event log, as a consumer reads it."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    timestamp: datetime
    type: str = Field(description="Dagster's event type, e.g. STEP_START, ASSET_MATERIALIZATION")
    kind: str | None = Field(
        default=None,
        description="the plane's own event kind (run_placed, stage_started, stage_progress, "
        "stage_finished, stage_failed, stage_reused, artifact_stored, artifact_reused, "
        "artifact_failed)",
    )
    level: str
    message: str
    step_key: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class EventPage(BaseModel):
    """Events of a run in order; pass `cursor` back to read on from there."""

    model_config = ConfigDict(extra="forbid")

    events: list[RunEvent]
    cursor: str | None
    has_more: bool


class InboxOutcome(BaseModel):
    """What the request inbox decided about one request file, written beside it."""

    model_config = ConfigDict(extra="forbid")

    contract_version: str = CONTRACT_VERSION
    file: str = Field(description="the request file's name in the inbox")
    status: Literal["accepted", "rejected"]
    request_id: str | None = None
    run_id: str | None = Field(default=None, description="the request's run, when accepted")
    existing: bool = Field(
        default=False, description="the request id had been accepted before (one run per id)"
    )
    reason: str | None = Field(default=None, description="why it was rejected")
    decided_at: datetime
