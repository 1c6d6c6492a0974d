"""The runtime adapter interface, and the registry that maps runtime types to adapters.

A runtime adapter runs one stage of a workflow on one kind of runtime (ffmpeg on this node, a
ComfyUI server, a TTS service...). It is a Dagster resource, so its configuration shows in the UI
and deployments override it. The orchestration around it (inputs, artifacts, lineage, retries,
cancellation) is the plane's; an adapter only turns a `StageRequest` into output files.

Adding a runtime type means writing one adapter class and decorating it with `@register_runtime`.

Most runtimes run a stage as a *job*: something submitted, waited for, read back and, when the run
gives up on it, cancelled. Those adapters derive from `JobRuntime` and implement exactly that
(`submit`, `wait`, `fetch_outputs`, `cancel`, plus `health`); its `run_stage` puts the steps
together the same way for every runtime, so a cancelled run or a passed deadline always cancels
the job. A runtime whose stage is a short series of local processes (FFmpeg recipes) implements
`run_stage` directly: its processes are killed with their process group on interrupt.
docs/runtime-authoring.md walks through adding one.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from dagster import ConfigurableResource
from pydantic import BaseModel, ConfigDict, Field

from ergot_dagster.errors import RuntimeTimeoutError
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


class DeadlinePassed(Exception):
    """Raised by `JobRuntime.wait` when the stage's timeout passed with the job unfinished."""


class RuntimeJob(BaseModel):
    """One stage's job on a runtime: its id there, and what the adapter needs to follow it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    job_id: str
    target: str
    deadline: float = Field(description="time.monotonic() by which the stage must end")
    # Adapter-owned: a connection, a session, a process handle, the runtime's last answer.
    state: dict[str, Any] = Field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class JobRuntime(RuntimeAdapter):
    """A runtime that runs each stage as one job: submit, wait with progress, fetch, cancel.

    Implement the four steps and `health`; `run_stage` runs them in order. If `wait` is
    interrupted (the run was cancelled: `KeyboardInterrupt` or Dagster's interrupt), fails, or
    raises `DeadlinePassed`, the job is cancelled on the runtime before the error goes on, so
    a run that gave up never leaves a job holding a GPU.
    """

    @abstractmethod
    def submit(self, request: StageRequest, log: logging.Logger) -> RuntimeJob:
        """Hand the stage to the runtime (uploading its inputs); the job, once accepted."""

    @abstractmethod
    def wait(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> None:
        """Follow the job until it ends, whatever its outcome, reporting `request.progress`.

        Keep what `fetch_outputs` needs to know in `job.state`. Raise `DeadlinePassed` at
        `job.deadline`, and `RuntimeFailure` when the job cannot be followed any more (the
        runtime lost it, or stopped answering); the job is then cancelled.
        """

    @abstractmethod
    def fetch_outputs(
        self, request: StageRequest, job: RuntimeJob, log: logging.Logger
    ) -> StageResult:
        """The ended job's outputs, downloaded under `request.workdir`; or, if the job did not
        succeed, a `RuntimeFailure` naming the runtime's own error (transient or permanent)."""

    @abstractmethod
    def cancel(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> str:
        """Cancel the job, best effort and bounded; never raises. A phrase saying how it went."""

    def release(self, job: RuntimeJob) -> None:
        """Free what the job held on this side (connections); called whatever happened."""

    def run_stage(self, request: StageRequest, log: logging.Logger) -> StageResult:
        request.workdir.mkdir(parents=True, exist_ok=True)
        job = self.submit(request, log)
        try:
            try:
                self.wait(request, job, log)
            except DeadlinePassed:
                outcome = self.cancel(request, job, log)
                raise RuntimeTimeoutError(
                    f"{request.stage.operation or request.stage.id} on {job.target} did not "
                    f"finish within {request.timeout_s:g} s; {outcome}",
                    job_id=job.job_id,
                ) from None
            except BaseException:
                self.cancel(request, job, log)
                raise
            return self.fetch_outputs(request, job, log)
        finally:
            self.release(job)


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
