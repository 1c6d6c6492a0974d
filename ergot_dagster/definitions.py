"""The code location: every Dagster object of the processing plane, built in one place.

Assets come from the workflow definitions in `workflow_defs/` (loading fails, with the file named,
if a definition is invalid or a published one was edited); resources point at the artifact store
and the ingest root from the environment.
"""

from __future__ import annotations

from dagster import Definitions, in_process_executor

from ergot_dagster.assets import build_assets
from ergot_dagster.assets.runtime_targets import build_target_checks, target_specs
from ergot_dagster.resources.adapters import runtime_resources
from ergot_dagster.resources.artifact_store import ArtifactStoreResource
from ergot_dagster.resources.source_root import SourceRootResource
from ergot_dagster.resources.targets import RuntimeTargetsResource, target_resources
from ergot_dagster.sensors.health_sensor import runtime_health
from ergot_dagster.sensors.ingest_sensor import ingest_sensor
from ergot_dagster.sensors.request_inbox import request_inbox
from ergot_dagster.settings import ErgotSettings
from ergot_dagster.targets.config import load_targets
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.registry import WorkflowRegistry


def build_definitions(settings: ErgotSettings | None = None) -> Definitions:
    """Build the Definitions for the given settings (the environment's by default)."""
    settings = settings or ErgotSettings.from_env()
    registry: WorkflowRegistry = load_registry(settings.workflow_defs)
    targets = load_targets(settings.runtime_targets)
    return Definitions(
        assets=[*build_assets(registry), *target_specs(targets)],
        asset_checks=build_target_checks(targets),
        sensors=[ingest_sensor, request_inbox, runtime_health],
        resources={
            "artifact_store": ArtifactStoreResource(location=settings.storage),
            "sources": SourceRootResource(root=settings.ingest_root),
            "runtime_targets": RuntimeTargetsResource(path=str(settings.runtime_targets)),
            **target_resources(settings.runtime_targets, targets),
            **runtime_resources(registry),
        },
        # Each workflow is one op, so a run has one step: running it in the run worker itself
        # saves the child process the multiprocess executor would start (about 1.5 s a run).
        executor=in_process_executor,
    )


defs = build_definitions()
