"""Running one workflow for one source synchronously, as a real Dagster run.

The run goes through Dagster's own execution path (`execute_job` on the code location's implicit
asset job, like `dagster asset materialize`), so it is recorded in the instance and visible in the
UI with its events, materializations and checks.
"""

from __future__ import annotations

from typing import Any

from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository
from pydantic import BaseModel

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.artifacts.store import open_store
from ergot_dagster.errors import RequestError, SourceError
from ergot_dagster.refs import InvalidRefError, ref_to_partition_key
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.record import SOURCE_PARTITIONS_NAME, latest_source_record
from ergot_dagster.workflows.inputs import check_input_names, check_media_type
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.materialize import artifact_key
from ergot_dagster.workflows.run_config import run_config_for
from ergot_dagster.workflows.settings_schema import SettingsError, validate_settings

DEFINITIONS_MODULE = "ergot_dagster.definitions"


class RunOutcome(BaseModel):
    """What `ergot run` reports."""

    run_id: str
    status: str
    workflow: str
    source_ref: str
    artifacts: list[ArtifactManifest]
    checks: list[dict[str, Any]]
    error: str | None = None


def _failure_message(result: Any) -> str | None:
    messages = []
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            user = data.user_failure_data
            if user is not None and user.description:
                messages.append(user.description)
            elif data.error is not None:
                messages.append(data.error.message.strip())
    return "; ".join(messages) or None


def run_workflow(
    spec: str,
    source_ref: str,
    settings_in: dict[str, Any],
    *,
    instance: DagsterInstance,
    settings: ErgotSettings,
    inputs: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    log_level: str = "CRITICAL",
) -> RunOutcome:
    """Validate, then execute `spec` on `source_ref` and wait for it to finish."""
    registry = load_registry(settings.workflow_defs)
    definition = registry.get(spec)
    try:
        filled = validate_settings(definition.settings, settings_in)
    except SettingsError as exc:
        raise RequestError(f"{definition.spec}: invalid settings: {exc}") from exc
    try:
        partition_key = ref_to_partition_key(source_ref)
    except InvalidRefError as exc:
        raise SourceError(str(exc)) from exc
    store = open_store(settings.storage)
    record = (
        latest_source_record(instance, partition_key)
        if instance.has_dynamic_partition(SOURCE_PARTITIONS_NAME, partition_key)
        else None
    )
    if record is None:
        raise SourceError(
            f"source {source_ref!r} has not been ingested; run `ergot ingest` on it first"
        )
    # The run checks these too; checking here as well means a plainly wrong request is refused
    # without leaving a failed run behind.
    primary = definition.primary_input
    check_media_type(definition, primary, definition.inputs[primary], source_ref, record.media_type)
    check_input_names(definition, inputs or {})

    recon_repo = ReconstructableRepository.for_module(
        DEFINITIONS_MODULE, "defs", working_directory=str(PROJECT_ROOT)
    )
    repo_def = recon_repo.get_definition()
    keys = [artifact_key(definition, name) for name in definition.outputs]
    job_def = repo_def.get_implicit_job_def_for_assets(keys)
    if job_def is None:  # pragma: no cover - all workflow assets share one partitioning
        raise RequestError(f"{definition.spec} has no asset job")
    run_tags = {
        **job_def.get_tags_for_partition_key(partition_key, selected_asset_keys=keys),
        "ergot/workflow": definition.spec,
        "ergot/source_ref": source_ref,
        **(tags or {}),
    }
    run_config = run_config_for(definition, filled, inputs)
    run_config["loggers"] = {"console": {"config": {"log_level": log_level}}}
    result = execute_job(
        recon_repo.get_reconstructable_job(job_def.name),
        instance=instance,
        asset_selection=keys,
        run_config=run_config,
        tags=run_tags,
    )
    run = instance.get_run_by_id(result.run_id)
    checks = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            checks.append(
                {
                    "asset": evaluation.asset_key.to_user_string(),
                    "check": evaluation.check_name,
                    "passed": evaluation.passed,
                    "description": evaluation.description,
                }
            )
    return RunOutcome(
        run_id=result.run_id,
        status=run.status.value if run else ("SUCCESS" if result.success else "FAILURE"),
        workflow=definition.ref,
        source_ref=source_ref,
        artifacts=store.list_run(result.run_id),
        checks=checks,
        error=None if result.success else _failure_message(result),
    )
