"""Walking an artifact's parents down to the ingested source files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

from ergot_dagster.artifacts.library import LibraryEntry
from ergot_dagster.artifacts.manifest import ArtifactManifest, ParentRef
from ergot_dagster.artifacts.store import ArtifactStore
from ergot_dagster.errors import StoreError
from ergot_dagster.refs import parse_artifact_ref
from ergot_dagster.sources.record import SourceRecord

MAX_DEPTH = 64


class LineageNode(BaseModel):
    """One step of an artifact's ancestry."""

    kind: Literal["artifact", "source", "library"]
    ref: str
    sha256: str
    input: str | None = None
    media_type: str | None = None
    workflow: str | None = None
    run_id: str | None = None
    uri: str | None = None
    status: str = Field(
        default="ok",
        description="for sources: `current` (the newest ingest), `superseded` (re-ingested "
        "since with other bytes) or `unknown`; for artifacts and library entries: `ok` or "
        "`missing`",
    )
    parents: list[LineageNode] = Field(default_factory=list)


ManifestLookup = Callable[[str], ArtifactManifest | None]
SourceLookup = Callable[[str], SourceRecord | None]
EntryLookup = Callable[[str], LibraryEntry | None]


def _no_entries(ref: str) -> LibraryEntry | None:
    return None


def store_manifests(store: ArtifactStore) -> ManifestLookup:
    """Look manifests up in an artifact store at hand (on a machine of the plane)."""

    def lookup(ref: str) -> ArtifactManifest | None:
        try:
            return store.get_manifest(ref)
        except StoreError:
            return None

    return lookup


def store_entries(store: ArtifactStore) -> EntryLookup:
    """Look library entries up in an artifact store at hand."""

    def lookup(ref: str) -> LibraryEntry | None:
        try:
            return store.get_library_entry(ref)
        except StoreError:
            return None

    return lookup


def walk(
    ref: str,
    manifest_of: ManifestLookup,
    source_of: SourceLookup,
    entry_of: EntryLookup = _no_entries,
    *,
    sha256: str | None = None,
    input_name: str | None = None,
    depth: int = 0,
) -> LineageNode:
    """The lineage tree of artifact `ref`, from manifests, library entries and source records.

    A library entry an artifact was made from is a node of its own (the promotion), whose parent
    is the promoted artifact. Raises `StoreError` if the artifact itself is unknown; an unknown
    ancestor is a node marked `missing` (artifacts, entries) or `unknown` (sources) instead.
    """
    if depth > MAX_DEPTH:
        raise StoreError(f"lineage of {ref} is deeper than {MAX_DEPTH} steps")
    parse_artifact_ref(ref)  # a malformed ref is an error of its own, not a missing artifact
    manifest = manifest_of(ref)
    if manifest is None:
        if depth == 0:
            raise StoreError(f"no artifact {ref}")
        return LineageNode(
            kind="artifact", ref=ref, sha256=sha256 or "", input=input_name, status="missing"
        )
    node = LineageNode(
        kind="artifact",
        ref=ref,
        sha256=manifest.sha256,
        input=input_name,
        media_type=manifest.media_type,
        workflow=manifest.workflow,
        run_id=manifest.run_id,
        uri=manifest.uri,
    )
    for parent in manifest.parents:
        if parent.kind == "artifact":
            node.parents.append(
                walk(
                    parent.ref,
                    manifest_of,
                    source_of,
                    entry_of,
                    sha256=parent.sha256,
                    input_name=parent.input,
                    depth=depth + 1,
                )
            )
            continue
        if parent.kind == "library":
            node.parents.append(_entry_node(parent, manifest_of, source_of, entry_of, depth + 1))
            continue
        record = source_of(parent.ref)
        if record is None:
            status = "unknown"
        elif record.sha256 == parent.sha256:
            status = "current"
        else:
            status = "superseded"
        node.parents.append(
            LineageNode(
                kind="source",
                ref=parent.ref,
                sha256=parent.sha256,
                input=parent.input,
                media_type=record.media_type if record else None,
                uri=record.uri if record and status == "current" else None,
                status=status,
            )
        )
    return node


def _entry_node(
    parent: ParentRef,
    manifest_of: ManifestLookup,
    source_of: SourceLookup,
    entry_of: EntryLookup,
    depth: int,
) -> LineageNode:
    entry = entry_of(parent.ref)
    if entry is None:
        return LineageNode(
            kind="library",
            ref=parent.ref,
            sha256=parent.sha256,
            input=parent.input,
            status="missing",
        )
    node = LineageNode(
        kind="library",
        ref=entry.ref,
        sha256=entry.sha256,
        input=parent.input,
        media_type=entry.media_type,
        workflow=entry.workflow,
        run_id=entry.promotion_run_id,
    )
    node.parents.append(
        walk(
            entry.artifact,
            manifest_of,
            source_of,
            entry_of,
            sha256=entry.sha256,
            input_name=None,
            depth=depth + 1,
        )
    )
    return node


def render(node: LineageNode, depth: int = 0) -> list[str]:
    """Human-readable lines, one per step, indented by depth."""
    prefix = "    " * depth + ("<- " if depth else "")
    if node.kind == "artifact" and node.status == "ok":
        line = f"{prefix}{node.ref}  {node.media_type}  sha256 {node.sha256}  ({node.workflow})"
    elif node.kind == "library" and node.status == "ok":
        line = f"{prefix}{node.ref}  (promoted)  {node.media_type}  sha256 {node.sha256}"
    elif node.kind in ("artifact", "library"):
        line = f"{prefix}{node.ref}  sha256 {node.sha256}  [{node.status}]"
    else:
        line = (
            f"{prefix}source {node.ref}  {node.media_type or ''}  sha256 {node.sha256}  "
            f"[{node.status}]"
        )
    lines = [line]
    for parent in node.parents:
        lines += render(parent, depth + 1)
    return lines
