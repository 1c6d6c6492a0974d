"""The catalog as a remote consumer sees it: everything planning needs, read over GraphQL.

Workflow definitions come from the `definitions` metadata the asset factory puts on every
workflow asset; source records from the materializations of `ergot/source`; artifact manifests
from the materializations of the run that stored them. So a consumer plans a request (and gets
its mistakes named) with nothing but the plane's URL, exactly as a machine of the plane would.

Library entries come from the materializations of `ergot/library` (one per promotion).

Runtime targets come from the declarations on the observable assets `runtime/<target>`, and
their health from those assets' newest observations, so a request no target can serve is refused
here, naming what each target lacked, before any run exists. The run queue routes every run again
when it is submitted (the plane's word is final).
"""

from __future__ import annotations

import time
from typing import Any

from ergot_dagster.artifacts.library import LibraryEntry
from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.assets.library import ENTRY_METADATA_KEY, LIBRARY_KEY
from ergot_dagster.client import queries as Q
from ergot_dagster.client.graphql import GraphQLTransport, metadata_values
from ergot_dagster.errors import UnknownWorkflowError
from ergot_dagster.orchestration.tags import PARTITION as PARTITION_TAG
from ergot_dagster.refs import parse_artifact_ref, parse_library_ref, ref_to_partition_key
from ergot_dagster.sources.record import SourceRecord
from ergot_dagster.targets.config import TargetsConfig
from ergot_dagster.targets.health import HEALTH_PREFIX, RECORD_KEY, TargetHealth, max_age_s
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.factory import DEFINITIONS_METADATA_KEY
from ergot_dagster.workflows.model import WorkflowDefinition
from ergot_dagster.workflows.registry import WorkflowRegistry

# Published versions never change, but a reload of the code location can add one: the list of
# workflows is looked up again after this long.
REGISTRY_TTL_S = 30.0
# Promotions read when listing libraries (each is one materialization of `ergot/library`).
MAX_LISTED_PROMOTIONS = 10_000


def _workflow_keys(asset_keys: list[list[str]]) -> dict[str, list[str]]:
    """Workflow name -> the key of one of its artifacts (family/name/artifact)."""
    found: dict[str, list[str]] = {}
    for path in asset_keys:
        if len(path) == 3 and path[:2] != ["ergot", "source"]:
            found.setdefault(path[1], path)
    return found


def _manifest_with_ref(materializations: list[dict[str, Any]], ref: str) -> ArtifactManifest | None:
    for materialization in materializations:
        values = metadata_values(materialization["metadataEntries"])
        if values.get("ref") == ref and values.get("manifest") is not None:
            return ArtifactManifest.model_validate(values["manifest"])
    return None


class GraphQLCatalog:
    """Answers planning's questions from a plane's GraphQL API."""

    def __init__(self, transport: GraphQLTransport, ttl_s: float = REGISTRY_TTL_S) -> None:
        self._gql = transport
        self._ttl_s = ttl_s
        self._keys: dict[str, list[str]] = {}
        self._keys_at = float("-inf")
        self._definitions: dict[str, list[WorkflowDefinition]] = {}
        self._runtime: list[dict[str, Any]] = []
        self._targets_at = float("-inf")

    def _workflow_asset_keys(self) -> dict[str, list[str]]:
        if time.monotonic() - self._keys_at > self._ttl_s:
            nodes = self._gql.execute(Q.ASSET_KEYS)["assetNodes"]
            self._keys = _workflow_keys([n["assetKey"]["path"] for n in nodes])
            self._keys_at = time.monotonic()
            self._definitions.clear()
        return self._keys

    def _versions(self, name: str) -> list[WorkflowDefinition]:
        if name in self._definitions:
            return self._definitions[name]
        key = self._workflow_asset_keys().get(name)
        if key is None:
            return []
        nodes = self._gql.execute(Q.ASSET_METADATA, {"keys": [{"path": key}]})["assetNodes"]
        raw: dict[str, Any] = {}
        for node in nodes:
            raw = metadata_values(node["metadataEntries"]).get(DEFINITIONS_METADATA_KEY) or {}
        versions = [WorkflowDefinition.model_validate(body) for body in raw.values()]
        self._definitions[name] = versions
        return versions

    def workflows(self) -> list[WorkflowDefinition]:
        """Every published version of every workflow the plane serves."""
        return [d for name in self._workflow_asset_keys() for d in self._versions(name)]

    def workflow(self, spec: str) -> WorkflowDefinition:
        name = spec.strip().partition("@")[0]
        versions = self._versions(name)
        if not versions:
            known = ", ".join(sorted(self._workflow_asset_keys())) or "none"
            raise UnknownWorkflowError(f"unknown workflow {name!r}; known workflows: {known}")
        # The registry resolves `name` / `name@version` and words its errors the same way as on
        # the plane itself.
        return WorkflowRegistry(versions).get(spec)

    def source(self, ref: str) -> SourceRecord | None:
        result = self._gql.execute(Q.SOURCE_RECORD, {"partition": ref_to_partition_key(ref)})[
            "assetOrError"
        ]
        if result["__typename"] != "Asset":
            return None
        for materialization in result["assetMaterializations"]:
            record = metadata_values(materialization["metadataEntries"]).get("record")
            if record is not None:
                return SourceRecord.model_validate(record)
        return None

    def artifact(self, ref: str) -> ArtifactManifest | None:
        run_id, name = parse_artifact_ref(ref)
        result = self._gql.execute(Q.RUN, {"runId": run_id})["runOrError"]
        if result["__typename"] != "Run":
            return None
        found = _manifest_with_ref(result["assetMaterializations"], ref)
        if found is not None:
            return found
        # Stored by this run but recorded by the run that retried it (the first worker died
        # between the two): look among the asset's recent materializations of the partition.
        partition = {t["key"]: t["value"] for t in result["tags"]}.get(PARTITION_TAG)
        for key in result.get("assetSelection") or []:
            if key["path"][-1] != name or partition is None:
                continue
            asset = self._gql.execute(
                Q.ASSET_MATERIALIZATIONS,
                {"key": {"path": key["path"]}, "partitions": [partition], "limit": 50},
            )["assetOrError"]
            if asset["__typename"] == "Asset":
                return _manifest_with_ref(asset["assetMaterializations"], ref)
        return None

    def _entries(self, partitions: list[str] | None, limit: int) -> list[LibraryEntry]:
        result = self._gql.execute(
            Q.ASSET_MATERIALIZATIONS,
            {"key": {"path": LIBRARY_KEY.path}, "partitions": partitions, "limit": limit},
        )["assetOrError"]
        if result["__typename"] != "Asset":
            return []
        entries: dict[str, LibraryEntry] = {}
        for materialization in result["assetMaterializations"]:
            body = metadata_values(materialization["metadataEntries"]).get(ENTRY_METADATA_KEY)
            if body is not None:
                entry = LibraryEntry.model_validate(body)
                # Newest first; an entry never changes, so the first seen of a name is it.
                entries.setdefault(entry.ref, entry)
        return sorted(entries.values(), key=lambda e: e.ref)

    def library_entry(self, ref: str) -> LibraryEntry | None:
        library, name = parse_library_ref(ref)
        found = self._entries([f"{library}/{name}"], 1)
        return found[0] if found else None

    def library_entries(self, library: str | None = None) -> list[LibraryEntry]:
        """Every promoted entry (of one library, if named), by ref."""
        entries = self._entries(None, MAX_LISTED_PROMOTIONS)
        return [e for e in entries if library is None or e.library == library]

    def _runtime_nodes(self) -> list[dict[str, Any]]:
        if time.monotonic() - self._targets_at > self._ttl_s:
            nodes = self._gql.execute(Q.ASSET_KEYS)["assetNodes"]
            keys = [
                {"path": n["assetKey"]["path"]}
                for n in nodes
                if len(n["assetKey"]["path"]) == 2 and n["assetKey"]["path"][0] == HEALTH_PREFIX
            ]
            self._runtime = (
                self._gql.execute(Q.RUNTIME_TARGETS, {"keys": keys})["assetNodes"] if keys else []
            )
            self._targets_at = time.monotonic()
        return self._runtime

    def targets(self) -> TargetsConfig | None:
        declared = []
        for node in self._runtime_nodes():
            declaration = metadata_values(node["metadataEntries"]).get("declaration")
            if not isinstance(declaration, dict):
                continue
            # Pools limit the queue, not routing; their limits are the plane's own business.
            routing = {**(declaration.get("routing") or {}), "pool": None}
            declared.append(RuntimeTarget.model_validate({**declaration, "routing": routing}))
        return TargetsConfig(targets=declared) if declared else None

    def unhealthy_targets(self) -> set[str]:
        down = set()
        for node in self._runtime_nodes():
            for observation in node.get("assetObservations") or []:
                record = metadata_values(observation["metadataEntries"]).get(RECORD_KEY)
                if not isinstance(record, dict):
                    continue
                health = TargetHealth.model_validate(record)
                age = health.age_s()
                if not health.healthy and age is not None and age <= max_age_s():
                    down.add(health.target)
        return down
