"""The catalog as seen from a machine of the plane: definitions, instance and store at hand."""

from __future__ import annotations

from dagster import DagsterInstance

from ergot_dagster.artifacts.library import LibraryEntry
from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.artifacts.store import ArtifactStore
from ergot_dagster.errors import StoreError
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.sources.record import SourceRecord, latest_source_record
from ergot_dagster.targets.config import TargetsConfig
from ergot_dagster.targets.health import unhealthy_targets
from ergot_dagster.workflows.model import WorkflowDefinition
from ergot_dagster.workflows.registry import WorkflowRegistry


class LocalCatalog:
    """Answers planning's questions from the local registry, instance, store and targets."""

    def __init__(
        self,
        registry: WorkflowRegistry,
        instance: DagsterInstance,
        store: ArtifactStore,
        targets: TargetsConfig | None,
    ) -> None:
        self._registry = registry
        self._instance = instance
        self._store = store
        self._targets = targets

    def workflow(self, spec: str) -> WorkflowDefinition:
        return self._registry.get(spec)

    def source(self, ref: str) -> SourceRecord | None:
        return latest_source_record(self._instance, ref_to_partition_key(ref))

    def artifact(self, ref: str) -> ArtifactManifest | None:
        try:
            return self._store.get_manifest(ref)
        except StoreError:
            return None

    def library_entry(self, ref: str) -> LibraryEntry | None:
        try:
            return self._store.get_library_entry(ref)
        except StoreError:
            return None

    def targets(self) -> TargetsConfig | None:
        return self._targets

    def unhealthy_targets(self) -> set[str]:
        if self._targets is None:
            return set()
        return unhealthy_targets(self._instance, self._targets)
