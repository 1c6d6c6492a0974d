"""Library entries: stored artifacts promoted to reusable, named references.

A library (`voices`, `faces`, `looks`...) is a namespace of entries; an entry names exactly one
artifact forever. Promotion writes the entry create-only into the artifact store, so the first
promotion of a name wins and a later one naming another artifact is refused; promoting the same
artifact under the same name again is a no-op. A request names an entry as an input
(`library:voices/narrator-01`), and the artifacts made from it record the entry as a parent, so
lineage walks from them through the entry to the promoted artifact and on to the ingest.

Nothing here knows what a library holds: libraries are names, not types.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.refs import library_ref, parse_library_ref

ENTRY_VERSION = 1


class LibraryEntry(BaseModel):
    """One promoted artifact under one name. Immutable once written."""

    model_config = ConfigDict(extra="forbid")

    entry_version: int = ENTRY_VERSION
    ref: str = Field(description="library:<library>/<name>")
    library: str
    name: str
    artifact: str = Field(description="the promoted artifact's ref")
    sha256: str
    media_type: str
    kind: Literal["file", "set"] = "file"
    size: int
    workflow: str = Field(description="the workflow that made the artifact, family/name@version")
    note: str = ""
    promoted_at: datetime
    promotion_run_id: str | None = Field(
        default=None, description="the Dagster run that recorded the promotion"
    )

    def same_promotion(self, other: LibraryEntry) -> bool:
        """True when `other` names the same artifact under the same name (a repeat, not a clash)."""
        return (self.ref, self.artifact, self.sha256) == (other.ref, other.artifact, other.sha256)


def entry_for(
    ref: str,
    manifest: ArtifactManifest,
    *,
    promoted_at: datetime,
    note: str = "",
    promotion_run_id: str | None = None,
) -> LibraryEntry:
    """The entry that promotes `manifest`'s artifact to library ref `ref`."""
    library, name = parse_library_ref(ref)
    return LibraryEntry(
        ref=library_ref(library, name),
        library=library,
        name=name,
        artifact=manifest.ref,
        sha256=manifest.sha256,
        media_type=manifest.media_type,
        kind=manifest.kind,
        size=manifest.size,
        workflow=manifest.workflow,
        note=note,
        promoted_at=promoted_at,
        promotion_run_id=promotion_run_id,
    )


def entry_relative_path(ref: str) -> str:
    """Where an entry lives in a store, relative to its root: `library/<library>/<name>.json`."""
    library, name = parse_library_ref(ref)
    return f"library/{library}/{name}.json"
