"""Running one workflow for one source synchronously, as a real Dagster run.

The run goes through Dagster's own execution path (`execute_job` on the code location's implicit
asset job, like `dagster asset materialize`), so it is recorded in the instance and visible in the
UI with its events, materializations and checks.
"""

from __future__ import annotations

import uuid
from typing import Any

from dagster import AssetKey, DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository
from pydantic import BaseModel, ValidationError

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.artifacts.store import open_store
from ergot_dagster.errors import RequestError
from ergot_dagster.requests.catalog import LocalCatalog
from ergot_dagster.requests.model import ProcessingRequest, validation_summary
from ergot_dagster.requests.planning import plan_run
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.record import SOURCE_PARTITIONS_NAME
from ergot_dagster.targets.config import load_targets
from ergot_dagster.workflows.loader import load_registry

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
    inputs: dict[str, str | list[str]] | None = None,
    log_level: str = "CRITICAL",
) -> RunOutcome:
    """Check the request as any other (`plan_run`), then run it here and wait for it to finish.

    A plainly wrong request is refused before a run exists, so no failed run is left behind.
    """
    registry = load_registry(settings.workflow_defs)
    store = open_store(settings.storage)
    try:
        request = ProcessingRequest(
            request_id=f"run-{uuid.uuid4()}",
            workflow=spec,
            sources={"primary": source_ref, "inputs": inputs or {}},
            settings=settings_in,
        )
    except ValidationError as exc:
        raise RequestError(f"invalid request: {validation_summary(exc)}") from exc
    catalog = LocalCatalog(registry, instance, store, load_targets(settings.runtime_targets))
    plan = plan_run(request, catalog)
    definition = registry.get(spec)
    if plan.new_partition:
        instance.add_dynamic_partitions(SOURCE_PARTITIONS_NAME, [plan.partition_key])

    recon_repo = ReconstructableRepository.for_module(
        DEFINITIONS_MODULE, "defs", working_directory=str(PROJECT_ROOT)
    )
    keys = [AssetKey(key) for key in plan.asset_keys]
    job_def = recon_repo.get_definition().get_implicit_job_def_for_assets(keys)
    if job_def is None:  # pragma: no cover - all workflow assets share one partitioning
        raise RequestError(f"{definition.spec} has no asset job")
    run_config = {**plan.run_config, "loggers": {"console": {"config": {"log_level": log_level}}}}
    result = execute_job(
        recon_repo.get_reconstructable_job(job_def.name),
        instance=instance,
        asset_selection=keys,
        run_config=run_config,
        tags=plan.tags,
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
