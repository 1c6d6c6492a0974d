"""The client's typed results."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

TERMINAL_STATUSES = ("SUCCESS", "FAILURE", "CANCELED")


class RunHandle(BaseModel):
    """A submitted request's run; `existing` when the request id was accepted before."""

    run_id: str
    request_id: str
    status: str
    existing: bool = False


class RunStatus(BaseModel):
    """Where a run stands."""

    run_id: str
    request_id: str | None
    workflow: str | None
    status: str
    priority: int
    tags: dict[str, str]
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    parent_run_id: str | None = None
    root_run_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES
