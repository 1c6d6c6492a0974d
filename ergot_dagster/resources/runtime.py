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
from pathlib import Path
from typing import Any, ClassVar

from dagster import ConfigurableResource
from pydantic import BaseModel, ConfigDict, Field

from ergot_dagster.media.probe import ProbeSummary
from ergot_dagster.workflows.model import StageSpec


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
    """Base of every runtime adapter. Subclasses set `runtime_type` and implement `run_stage`."""

    runtime_type: ClassVar[str]
    target_name: str = Field(default="", description="name of the runtime target this is")
    default_timeout_s: float = Field(
        default=3600.0, gt=0, description="bound on a stage that sets no timeout_s"
    )

    @property
    def target(self) -> str:
        return self.target_name or f"{self.runtime_type}-local"

    @abstractmethod
    def run_stage(self, request: StageRequest, log: logging.Logger) -> StageResult:
        """Run one stage, writing outputs under `request.workdir`; `RuntimeFailure` on error."""

    @abstractmethod
    def health(self) -> HealthReport:
        """Probe the runtime without doing any work."""

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
