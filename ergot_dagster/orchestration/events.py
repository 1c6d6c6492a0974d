"""Structured run events: what a consumer can read back from a run's Dagster event log.

Each event is a Dagster engine event in the run's log, with a readable message and metadata whose
`ergot_event` entry names its kind (stage_started, stage_progress, stage_finished, stage_failed,
stage_reused, artifact_stored, artifact_reused, artifact_failed). GraphQL returns them with their
metadata, and the UI shows them in the run's log. Secrets never reach them: adapters report
figures and ids, never credentials.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from dagster import DagsterInstance, MetadataValue
from dagster._core.events import EngineEventData

from ergot_dagster.resources.runtime import ProgressReporter

PROGRESS_MIN_INTERVAL_S = 2.0
PROGRESS_MIN_STEP = 0.1


class RunEvents(Protocol):
    """Where the plan executor reports what happens."""

    def emit(self, kind: str, message: str, **fields: Any) -> None: ...

    def progress_reporter(self, stage: str) -> ProgressReporter: ...


def _metadata(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"ergot_event": kind}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            metadata[key] = MetadataValue.bool(value)
        elif isinstance(value, int | float | str):
            metadata[key] = value
        else:
            metadata[key] = MetadataValue.json(json.loads(json.dumps(value, default=str)))
    return metadata


class _Throttle:
    """Keeps progress events to a useful rate: a step of 10 % or 2 s, and always the end."""

    def __init__(self) -> None:
        self.last_time = 0.0
        self.last_fraction = -1.0

    def due(self, fraction: float | None) -> bool:
        now = time.monotonic()
        big_step = fraction is not None and (
            fraction >= 1.0 or fraction - self.last_fraction >= PROGRESS_MIN_STEP
        )
        if not big_step and now - self.last_time < PROGRESS_MIN_INTERVAL_S:
            return False
        self.last_time = now
        if fraction is not None:
            self.last_fraction = fraction
        return True


class DagsterRunEvents:
    """Run events as engine events in the run's Dagster event log."""

    def __init__(self, instance: DagsterInstance, run_id: str, step_key: str | None) -> None:
        self.instance = instance
        self.run_id = run_id
        self.step_key = step_key
        self._run = instance.get_run_by_id(run_id)

    def emit(self, kind: str, message: str, **fields: Any) -> None:
        self.instance.report_engine_event(
            message,
            self._run,
            EngineEventData(metadata=_metadata(kind, fields)),
            step_key=self.step_key,
        )

    def progress_reporter(self, stage: str) -> ProgressReporter:
        throttle = _Throttle()

        def report(fraction: float | None, message: str) -> None:
            if throttle.due(fraction):
                percent = f"{fraction:.0%}" if fraction is not None else "…"
                self.emit(
                    "stage_progress",
                    f"stage {stage}: {percent} {message}".strip(),
                    stage=stage,
                    progress=fraction,
                    detail=message,
                )

        return report
