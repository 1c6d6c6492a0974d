"""The runtime adapter interface, and the registry that maps runtime types to adapters.

A runtime adapter runs one stage of a workflow on one kind of runtime (ffmpeg on this node, a
ComfyUI server, a TTS service...). It is a Dagster resource, so its configuration shows in the UI
and deployments override it. The orchestration around it (inputs, artifacts, lineage, retries,
cancellation) is the plane's; an adapter only turns a `StageRequest` into output files.

Adding a runtime type means writing one adapter class and decorating it with `@register_runtime`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from dagster import ConfigurableResource
from pydantic import BaseModel, ConfigDict, Field

from ergot_dagster.media.probe import ProbeSummary
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec

# progress(fraction 0..1 or None if unknown, a short message). Adapters call it as often as they
# like; the plane throttles what it records.
ProgressReporter = Callable[[float | None, str], None]


def no_progress(fraction: float | None, message: str) -> None:
    """A progress reporter that records nothing (for direct calls and tests)."""


class StageFile(BaseModel):
    """A file handed to a stage: a workflow input or an earlier stage's output."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: Path
    media_type: str
    probe: ProbeSummary | None = None


class StageRequest(BaseModel):
    """Everything an adapter needs to run one stage."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    workflow: str = Field(description="family/name@version")
    stage: StageSpec
    run_id: str
    inputs: dict[str, StageFile | list[StageFile]]
    params: dict[str, Any]
    output_types: dict[str, str] = Field(
        default_factory=dict, description="media type expected of each mapped stage output"
    )
    workdir: Path
    timeout_s: float
    target: RuntimeTarget = Field(description="the target the stage was routed to")
    progress: ProgressReporter = Field(default=no_progress, exclude=True)


class StageResult(BaseModel):
    """What a stage produced: one path per output (a list for an image set)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    outputs: dict[str, Path | list[Path]]
    target: str
    job_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class HealthReport(BaseModel):
    """A runtime's answer to a health probe."""

    healthy: bool
    detail: str = ""
    latency_ms: float | None = None
    info: dict[str, Any] = Field(default_factory=dict)


class RuntimeAdapter(ConfigurableResource, ABC):
    """Base of every runtime adapter. Subclasses set `runtime_type` and implement `run_stage`.

    One adapter instance serves every target of its runtime type; the target a stage was routed
    to (its endpoint, credentials, limits) arrives in `StageRequest.target`.
    """

    runtime_type: ClassVar[str]
    default_timeout_s: float = Field(
        default=3600.0, gt=0, description="bound on a stage that sets no timeout_s"
    )

    @abstractmethod
    def run_stage(self, request: StageRequest, log: logging.Logger) -> StageResult:
        """Run one stage, writing outputs under `request.workdir`; `RuntimeFailure` on error.

        Every wait is bounded by `request.timeout_s`. If the wait is interrupted (the run was
        cancelled: a `KeyboardInterrupt` or Dagster's interrupt arrives), cancel the job on the
        runtime before letting the exception go on.
        """

    @abstractmethod
    def health(self, target: RuntimeTarget) -> HealthReport:
        """Probe `target` without doing any work."""

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        """Raise `ValueError` if this runtime cannot run `stage` (checked when definitions load).

        The default accepts anything; adapters that know their operations say so here, so that a
        misspelt operation fails at publish time instead of in the middle of a run.
        """


_ADAPTERS: dict[str, type[RuntimeAdapter]] = {}


def register_runtime(cls: type[RuntimeAdapter]) -> type[RuntimeAdapter]:
    """Class decorator: make `cls` the adapter for its `runtime_type`."""
    existing = _ADAPTERS.get(cls.runtime_type)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"runtime type {cls.runtime_type!r} already has adapter {existing.__name__}"
        )
    _ADAPTERS[cls.runtime_type] = cls
    return cls


def adapter_class(runtime_type: str) -> type[RuntimeAdapter]:
    if runtime_type not in _ADAPTERS:
        known = ", ".join(sorted(_ADAPTERS)) or "none"
        raise KeyError(
            f"no adapter is registered for runtime type {runtime_type!r} (known: {known})"
        )
    return _ADAPTERS[runtime_type]


def registered_runtimes() -> dict[str, type[RuntimeAdapter]]:
    return dict(_ADAPTERS)


def resource_key(runtime_type: str) -> str:
    """The Dagster resource key under which the adapter for `runtime_type` is bound."""
    return f"runtime_{runtime_type}"
