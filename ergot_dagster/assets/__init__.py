"""The asset graph: the source asset and the assets built from workflow definitions."""

from __future__ import annotations

from dagster import AssetsDefinition

from ergot_dagster.assets.source import ergot_source
from ergot_dagster.workflows.factory import build_workflow_assets
from ergot_dagster.workflows.registry import WorkflowRegistry


def build_assets(registry: WorkflowRegistry) -> list[AssetsDefinition]:
    """`ergot/source` plus one multi-asset per workflow."""
    return [ergot_source, *build_workflow_assets(registry)]
