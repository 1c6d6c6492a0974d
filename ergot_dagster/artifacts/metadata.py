"""Artifact manifests as Dagster materialization metadata, and back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dagster import MetadataValue

from ergot_dagster.artifacts.manifest import ArtifactManifest


def manifest_metadata(
    manifest: ArtifactManifest, preview: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Readable fields for the UI, and the whole manifest for machines.

    `preview` holds extra entries that show the artifact itself (`artifacts.preview`); they never
    replace a manifest field, which consumers read back.
    """
    metadata: dict[str, Any] = {
        "ref": manifest.ref,
        "name": manifest.name,
        "media_type": manifest.media_type,
        "size": MetadataValue.int(manifest.size),
        "sha256": manifest.sha256,
        "uri": manifest.uri,
        "workflow": manifest.workflow,
        "source_ref": manifest.source_ref,
    }
    # Above the long JSON entries, so that the UI's table shows it without scrolling.
    for key, value in (preview or {}).items():
        metadata.setdefault(key, value)
    metadata |= {
        "parents": MetadataValue.json([p.model_dump(mode="json") for p in manifest.parents]),
        "runtime": MetadataValue.json(manifest.runtime.model_dump(mode="json")),
        "manifest": MetadataValue.json(json.loads(manifest.model_dump_json())),
    }
    if manifest.kind == "set":
        metadata["members"] = MetadataValue.int(len(manifest.members))
    return metadata


def manifest_from_metadata(metadata: dict[str, Any]) -> ArtifactManifest | None:
    """The manifest carried by a materialization's metadata, if it has one."""
    entry = metadata.get("manifest")
    if entry is None:
        return None
    return ArtifactManifest.model_validate(getattr(entry, "value", entry))
