"""Turning a request into a run: the one function every entry point uses.

`plan_run` checks the request against the catalog (the workflow and its settings schema, the
sources and artifacts it names, where it may run) and returns exactly what Dagster needs to
create the run: asset selection, partition, run config and tags. The run coordinator makes sure
a request id is accepted once (`orchestration.idempotency`), whoever submits it.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel

from ergot_dagster.artifacts.library import LibraryEntry
from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.errors import InvalidSettingsError, RequestError, SourceError
from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.k8s import scheduling_tags
from ergot_dagster.orchestration.remote import check_remote_inputs
from ergot_dagster.refs import expand_library_shorthand, ref_kind, ref_to_partition_key
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.sources.record import SourceRecord
from ergot_dagster.targets.config import TargetsConfig
from ergot_dagster.targets.routing import check_execution, route
from ergot_dagster.workflows.inputs import check_arity, check_input_names, check_media_type
from ergot_dagster.workflows.model import WorkflowDefinition
from ergot_dagster.workflows.run_config import run_config_for
from ergot_dagster.workflows.settings_schema import SettingsError, validate_settings

ASSET_JOB = "__ASSET_JOB"


class RequestCatalog(Protocol):
    """What planning needs to know about the plane; local and GraphQL-backed versions exist."""

    def workflow(self, spec: str) -> WorkflowDefinition: ...

    def source(self, ref: str) -> SourceRecord | None: ...

    def artifact(self, ref: str) -> ArtifactManifest | None: ...

    def library_entry(self, ref: str) -> LibraryEntry | None: ...

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
    new_partition: bool = False
    run_config: dict
    tags: dict[str, str]


def _media_type_of(
    definition: WorkflowDefinition, name: str, ref: str, catalog: RequestCatalog
) -> str:
    """The media type of what `ref` names, raising if it names nothing.

    A secondary input's error names the input; the primary source is `sources.primary` in the
    request, so naming its input would only add noise.
    """
    where = "" if name == definition.primary_input else f"input {name!r}: "
    kind = ref_kind(ref)
    if kind == "library":
        entry = catalog.library_entry(ref)
        if entry is None:
            raise RequestError(f"{where}nothing is promoted as {ref}")
        return entry.media_type
    if kind == "artifact":
        manifest = catalog.artifact(ref)
        if manifest is None:
            raise RequestError(f"{where}no artifact {ref}")
        return manifest.media_type
    record = catalog.source(ref)
    if record is None:
        raise SourceError(
            f"{where}source {ref!r} has not been ingested; run `ergot ingest` on it first"
        )
    return record.media_type


def canonical_sources(
    request: ProcessingRequest, definition: WorkflowDefinition
) -> tuple[str, dict[str, str | list[str]]]:
    """The request's primary ref and inputs with library shorthands written out in full."""
    primary = definition.primary_input
    check_input_names(definition, request.sources.inputs)
    if primary in request.sources.inputs:
        raise RequestError(
            f"input {primary!r} is the primary source; give it as `sources.primary` only"
        )
    inputs: dict[str, str | list[str]] = {}
    for name, value in request.sources.inputs.items():
        library = definition.inputs[name].library
        refs = [expand_library_shorthand(r, library) for r in check_arity(definition, name, value)]
        inputs[name] = refs if isinstance(value, list) else refs[0]
    return expand_library_shorthand(
        request.sources.primary, definition.inputs[primary].library
    ), inputs


def _check_sources(
    definition: WorkflowDefinition,
    primary_ref: str,
    inputs: dict[str, str | list[str]],
    catalog: RequestCatalog,
) -> None:
    primary = definition.primary_input
    check_media_type(
        definition, primary, primary_ref, _media_type_of(definition, primary, primary_ref, catalog)
    )
    for name, value in inputs.items():
        for ref in value if isinstance(value, list) else [value]:
            check_media_type(definition, name, ref, _media_type_of(definition, name, ref, catalog))


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
    primary_ref, inputs = canonical_sources(request, definition)
    _check_sources(definition, primary_ref, inputs, catalog)
    if target == "remote":
        # An off-node run never reads this node's disk (docs/offnode.md).
        check_remote_inputs(definition, primary_ref, inputs, catalog)

    tags = {
        T.REQUEST_ID: request.request_id,
        T.REQUEST: request.canonical_json(),
        T.REQUEST_SHA256: request.sha256,
        T.WORKFLOW: definition.spec,
        T.WORKFLOW_NAME: definition.name,
        T.SOURCE_REF: primary_ref,
        T.EXECUTION_TARGET: target,
        T.PARTITION: ref_to_partition_key(primary_ref),
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
    tags.update(scheduling_tags(definition, targets, target, catalog.unhealthy_targets()))
    artifacts = list(definition.outputs)
    return RunPlan(
        request_id=request.request_id,
        workflow=definition.ref,
        asset_keys=[[definition.family, definition.name, a] for a in artifacts],
        check_keys=[
            ([definition.family, definition.name, c.artifact], c.name) for c in definition.checks
        ],
        partition_key=ref_to_partition_key(primary_ref),
        # A derived artifact or library entry as the primary input is a partition of its own,
        # added to the partition set before the run is created.
        new_partition=ref_kind(primary_ref) != "source",
        run_config=run_config_for(definition, request.settings, inputs),
        tags=tags,
    )
