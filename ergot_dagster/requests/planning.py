"""Turning a request into a run: the one function every entry point uses.

`plan_run` checks the request against the catalog (the workflow and its settings schema, the
sources and artifacts it names, where it may run) and returns exactly what Dagster needs to
create the run: asset selection, partition, run config and tags. The run coordinator makes sure
a request id is accepted once (`orchestration.idempotency`), whoever submits it.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.errors import InvalidSettingsError, RequestError, SourceError
from ergot_dagster.orchestration import tags as T
from ergot_dagster.refs import is_artifact_ref, ref_to_partition_key
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.sources.record import SourceRecord
from ergot_dagster.targets.config import TargetsConfig
from ergot_dagster.targets.routing import check_execution, route
from ergot_dagster.workflows.inputs import check_input_names, check_media_type
from ergot_dagster.workflows.model import WorkflowDefinition
from ergot_dagster.workflows.run_config import run_config_for
from ergot_dagster.workflows.settings_schema import SettingsError, validate_settings

ASSET_JOB = "__ASSET_JOB"


class RequestCatalog(Protocol):
    """What planning needs to know about the plane; local and GraphQL-backed versions exist."""

    def workflow(self, spec: str) -> WorkflowDefinition: ...

    def source(self, ref: str) -> SourceRecord | None: ...

    def artifact(self, ref: str) -> ArtifactManifest | None: ...

    def targets(self) -> TargetsConfig | None: ...

    def unhealthy_targets(self) -> set[str]: ...


class RunPlan(BaseModel):
    """Everything needed to create the request's run in Dagster."""

    request_id: str
    workflow: str
    job_name: str = ASSET_JOB
    asset_keys: list[list[str]]
    check_keys: list[tuple[list[str], str]]
    partition_key: str
    run_config: dict
    tags: dict[str, str]


def _check_sources(
    request: ProcessingRequest, definition: WorkflowDefinition, catalog: RequestCatalog
) -> None:
    primary = definition.primary_input
    record = catalog.source(request.sources.primary)
    if record is None:
        raise SourceError(
            f"source {request.sources.primary!r} has not been ingested; run `ergot ingest` on "
            "it first"
        )
    check_media_type(definition, primary, request.sources.primary, record.media_type)
    check_input_names(definition, request.sources.inputs)
    if primary in request.sources.inputs:
        raise RequestError(
            f"input {primary!r} is the primary source; give it as `sources.primary` only"
        )
    for name, ref in request.sources.inputs.items():
        if is_artifact_ref(ref):
            manifest = catalog.artifact(ref)
            if manifest is None:
                raise RequestError(f"input {name!r}: no artifact {ref}")
            check_media_type(definition, name, ref, manifest.media_type)
        else:
            other = catalog.source(ref)
            if other is None:
                raise SourceError(f"input {name!r}: source {ref!r} has not been ingested")
            check_media_type(definition, name, ref, other.media_type)


def plan_run(request: ProcessingRequest, catalog: RequestCatalog) -> RunPlan:
    """Check `request` and plan its run; raise a `RequestError`/`SourceError` naming the problem."""
    definition = catalog.workflow(request.workflow)
    try:
        validate_settings(definition.settings, request.settings)
    except SettingsError as exc:
        raise InvalidSettingsError(
            f"{definition.spec}: invalid settings: {exc}", exc.problems
        ) from exc
    target = request.execution_target
    check_execution(definition, target)
    targets = catalog.targets()
    if targets is not None:
        # Raises, naming what each target lacked (or that it was found down).
        route(definition, targets, target, unhealthy=catalog.unhealthy_targets())
    _check_sources(request, definition, catalog)

    tags = {
        T.REQUEST_ID: request.request_id,
        T.REQUEST: request.canonical_json(),
        T.REQUEST_SHA256: request.sha256,
        T.WORKFLOW: definition.spec,
        T.WORKFLOW_NAME: definition.name,
        T.SOURCE_REF: request.sources.primary,
        T.EXECUTION_TARGET: target,
        T.PARTITION: ref_to_partition_key(request.sources.primary),
        T.PRIORITY: str(request.priority),
        T.MAX_RETRIES: str(request.max_retries),
        # A failed step was already retried as a step when its cause was transient; run
        # retries are for runs whose worker died.
        T.RETRY_ON_STEP_FAILURE: "false",
    }
    if request.timeout_s is not None:
        tags[T.MAX_RUNTIME] = str(
            int(request.timeout_s) if request.timeout_s.is_integer() else request.timeout_s
        )
    artifacts = list(definition.outputs)
    return RunPlan(
        request_id=request.request_id,
        workflow=definition.ref,
        asset_keys=[[definition.family, definition.name, a] for a in artifacts],
        check_keys=[
            ([definition.family, definition.name, c.artifact], c.name) for c in definition.checks
        ],
        partition_key=ref_to_partition_key(request.sources.primary),
        run_config=run_config_for(definition, request.settings, request.sources.inputs),
        tags=tags,
    )
