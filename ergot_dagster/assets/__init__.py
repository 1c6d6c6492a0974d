"""The asset graph: sources, the library, and the assets built from workflow definitions."""

from __future__ import annotations

from dagster import AssetsDefinition

from ergot_dagster.assets.library import ergot_library
from ergot_dagster.assets.source import ergot_source
from ergot_dagster.workflows.factory import build_workflow_assets
from ergot_dagster.workflows.registry import WorkflowRegistry


def build_assets(registry: WorkflowRegistry) -> list[AssetsDefinition]:
    """`ergot/source`, `ergot/library` and one multi-asset per workflow."""
    return [ergot_source, ergot_library, *build_workflow_assets(registry)]
