"""The body of every workflow multi-asset: one run of one version of one workflow.

It validates the request (version, settings, inputs) before any work, runs the plan, and turns each
stored artifact into a materialization carrying its manifest, with asset checks evaluated as soon as
their artifact exists. Errors become Dagster failures that say what was wrong and whether trying
again could help.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryRequested,
)

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.artifacts.metadata import manifest_metadata
from ergot_dagster.artifacts.preview import artifact_preview
from ergot_dagster.artifacts.store import ArtifactStore
from ergot_dagster.checks import get_evaluator
from ergot_dagster.errors import ErgotError, RuntimeFailure
from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.events import DagsterRunEvents
from ergot_dagster.orchestration.placement import describe, executed_by
from ergot_dagster.orchestration.retry import StepRetry
from ergot_dagster.orchestration.worker import current_worker
from ergot_dagster.refs import InvalidRefError, partition_key_to_ref
from ergot_dagster.resources.runtime import RuntimeAdapter, resource_key
from ergot_dagster.targets.health import unhealthy_targets
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.targets.routing import route, runtime_types, targets_from_tags
from ergot_dagster.workflows.execute import PlanFailure, execute_plan
from ergot_dagster.workflows.inputs import bind_inputs
from ergot_dagster.workflows.model import CheckSpec, WorkflowDefinition, parse_binding
from ergot_dagster.workflows.registry import WorkflowRegistry
from ergot_dagster.workflows.run_config import op_name
from ergot_dagster.workflows.settings_schema import SettingsError, validate_settings

# How far back a retry chain is followed for artifacts to reuse.
MAX_RETRY_CHAIN = 20


def artifact_key(definition: WorkflowDefinition, artifact: str) -> AssetKey:
    return AssetKey([definition.family, definition.name, artifact])


def _failure(exc: BaseException, definition: WorkflowDefinition | None) -> Failure:
    transient = isinstance(exc, RuntimeFailure) and exc.transient
    metadata: dict[str, Any] = {
        "error_type": type(exc).__name__,
        "retryable": MetadataValue.bool(transient),
    }
    job_id = getattr(exc, "job_id", None)
    if job_id:
        metadata["job_id"] = job_id
    if isinstance(exc, PlanFailure):
        metadata["failed_artifacts"] = MetadataValue.json(exc.summary())
        causes = {type(error).__name__ for error in exc.failures.values()}
        if len(causes) == 1:
            # One cause for everything that failed: name it, not the aggregate.
            metadata["error_type"] = causes.pop()
    prefix = f"{definition.spec}: " if definition else ""
    return Failure(description=f"{prefix}{exc}", metadata=metadata, allow_retries=transient)


def _check_params(check: CheckSpec, settings: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for key, value in check.params.items():
        binding = parse_binding(value)
        if binding is not None and binding.scope == "settings":
            current: Any = settings
            for part in binding.path:
                current = current.get(part) if isinstance(current, dict) else None
            params[key] = current
        else:
            params[key] = value
    return params


def _evaluate_check(
    definition: WorkflowDefinition,
    check: CheckSpec,
    manifest: ArtifactManifest,
    store: ArtifactStore,
    settings: dict[str, Any],
) -> AssetCheckResult:
    outcome = get_evaluator(check.evaluator)(
        store.local_path(manifest.uri), manifest, _check_params(check, settings)
    )
    return AssetCheckResult(
        asset_key=artifact_key(definition, check.artifact),
        check_name=check.name,
        passed=outcome.passed,
        severity=AssetCheckSeverity.ERROR if check.blocking else AssetCheckSeverity.WARN,
        description=outcome.description,
        metadata={
            "artifact": manifest.ref,
            **{k: v for k, v in outcome.metadata.items() if v is not None},
        },
    )


def _run_chain(instance: DagsterInstance, run_id: str) -> list[str]:
    """This run and the runs it retries, newest first (Dagster links them by parent run id)."""
    chain = [run_id]
    run = instance.get_run_by_id(run_id)
    while run is not None and run.parent_run_id and len(chain) < MAX_RETRY_CHAIN:
        chain.append(run.parent_run_id)
        run = instance.get_run_by_id(run.parent_run_id)
    return chain


def _reusable(
    instance: DagsterInstance,
    store: ArtifactStore,
    definition: WorkflowDefinition,
    source_ref: str,
    run_id: str,
) -> dict[str, ArtifactManifest]:
    """Artifacts this request already stored: an earlier attempt of this run, or a retried run."""
    reusable: dict[str, ArtifactManifest] = {}
    for chain_run in _run_chain(instance, run_id):
        for manifest in store.list_run(chain_run):
            if manifest.workflow == definition.ref and manifest.source_ref == source_ref:
                reusable.setdefault(manifest.name, manifest)
    return reusable


def _already_recorded(
    instance: DagsterInstance,
    definition: WorkflowDefinition,
    manifest: ArtifactManifest,
    partition_key: str,
) -> bool:
    """Whether a materialization of exactly this artifact is already in the event log."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(
            asset_key=artifact_key(definition, manifest.name), asset_partitions=[partition_key]
        ),
        limit=MAX_RETRY_CHAIN * 2,
    ).records
    for record in records:
        materialization = record.asset_materialization
        ref = materialization.metadata.get("ref") if materialization else None
        if ref is not None and getattr(ref, "value", ref) == manifest.ref:
            return True
    return False


def _targets(
    context: AssetExecutionContext, definition: WorkflowDefinition
) -> dict[str, RuntimeTarget]:
    """The run's routing from its tags (set when it was queued), else routed here and now."""
    config = context.resources.runtime_targets.get()
    tags = context.run.tags
    routed = targets_from_tags(dict(tags), config)
    if any(runtime not in routed for runtime in runtime_types(definition)):
        fresh = route(
            definition,
            config,
            tags.get(T.EXECUTION_TARGET, "local"),
            unhealthy=unhealthy_targets(context.instance, config),
        )
        routed = {**fresh, **routed}
    return routed


def materialize_workflow(
    context: AssetExecutionContext, registry: WorkflowRegistry, name: str
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Run the configured version of workflow `name` for the run's partition."""
    config = context.op_execution_context.op_config or {}
    definition: WorkflowDefinition | None = None
    try:
        definition = registry.get(f"{name}@{config.get('version', '')}".rstrip("@"))
        settings = validate_settings(definition.settings, config.get("settings") or {})
        source_ref = partition_key_to_ref(context.partition_key)
        selected = {
            key.path[-1]
            for key in context.selected_asset_keys
            if key.path[:2] == [definition.family, definition.name]
        } & set(definition.outputs)
        store = context.resources.artifact_store.get_store()
        inputs = bind_inputs(
            instance=context.instance,
            store=store,
            definition=definition,
            source_ref=source_ref,
            partition_key=context.partition_key,
            given=dict(config.get("inputs") or {}),
        )
        adapters: dict[str, RuntimeAdapter] = {
            runtime: getattr(context.resources, resource_key(runtime))
            for runtime in runtime_types(definition)
        }
        targets = _targets(context, definition)
    except (ErgotError, SettingsError, InvalidRefError) as exc:
        # Nothing has run yet: a bad request fails here, clearly, and is never retried.
        raise _failure(exc, definition) from None

    # Run monitoring asks the run launcher whether this process is still alive.
    context.instance.add_run_tags(context.run_id, {T.WORKER: current_worker(context.run_id)})
    events = DagsterRunEvents(context.instance, context.run_id, op_name(definition))
    # Where this run executed (this node, a remote code server's host, a pod): in its events
    # and in every manifest it writes.
    placement = executed_by(context.run.tags)
    events.emit("run_placed", describe(placement), **placement.model_dump())
    reusable = _reusable(context.instance, store, definition, source_ref, context.run_id)
    context.log.info(
        f"{definition.ref} for {source_ref!r}: artifacts {sorted(selected)}, settings {settings}, "
        f"targets { {r: t.name for r, t in targets.items()} }"
        + (f", reusing {sorted(reusable)}" if reusable else "")
    )
    selected_checks = {key.name for key in context.selected_asset_check_keys}
    try:
        for stored in execute_plan(
            definition=definition,
            settings=settings,
            inputs=inputs,
            selected=selected,
            adapters=adapters,
            targets=targets,
            store=store,
            run_id=context.run_id,
            source_ref=source_ref,
            events=events,
            reusable=reusable,
            executed_by=placement,
            # Adapters' own log lines go to the run's log in the UI.
            log=context.log,  # type: ignore[arg-type]
        ):
            manifest = stored.manifest
            if stored.reused and _already_recorded(
                context.instance, definition, manifest, context.partition_key
            ):
                events.emit(
                    "artifact_reused",
                    f"artifact {manifest.name}: {manifest.ref}, already recorded",
                    artifact=manifest.name,
                    ref=manifest.ref,
                    sha256=manifest.sha256,
                )
                continue
            metadata = manifest_metadata(
                manifest, artifact_preview(manifest, store.local_path, log=context.log)
            )
            if stored.stage_metadata:
                metadata["stage_metadata"] = MetadataValue.json(stored.stage_metadata)
            yield MaterializeResult(
                asset_key=artifact_key(definition, manifest.name),
                metadata=metadata,
                data_version=DataVersion(manifest.sha256),
            )
            for check in definition.checks:
                if check.artifact == manifest.name and check.name in selected_checks:
                    yield _evaluate_check(definition, check, manifest, store, settings)
    except ErgotError as exc:
        failure = _failure(exc, definition)
        retry = StepRetry.from_env()
        if failure.allow_retries and retry.should_retry(context.retry_number):
            delay = retry.delay_for(context.retry_number)
            context.log.warning(
                f"{failure.description} - transient, trying again in {delay:.1f} s "
                f"(retry {context.retry_number + 1} of {retry.max_retries})"
            )
            raise RetryRequested(max_retries=retry.max_retries, seconds_to_wait=delay) from exc
        raise failure from exc
