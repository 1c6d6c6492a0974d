"""Binding a run's inputs: the primary source (the partition) and any other named inputs.

Every input is checked before work starts: the source must have been ingested and be unchanged
since, the media must be of a type the workflow accepts, and artifact inputs must exist in the
store. Each input brings the parent refs that lineage records.

A source ingested from object storage (its record's root is `s3://...`) is downloaded into the
store's fetch directory, removed when the step ends, and its sha256 is checked against the record
as it streams in: a source changed since ingest fails the run as it does on disk.
"""

from __future__ import annotations

from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from ergot_dagster.artifacts.library import LibraryEntry
from ergot_dagster.artifacts.manifest import ArtifactManifest, ParentRef
from ergot_dagster.artifacts.metadata import manifest_from_metadata
from ergot_dagster.artifacts.s3_store import is_s3_location
from ergot_dagster.artifacts.store import ArtifactStore
from ergot_dagster.errors import RequestError, SourceError, StoreError
from ergot_dagster.media.hashing import sha256_file
from ergot_dagster.media.probe import media_type_matches
from ergot_dagster.refs import (
    InvalidRefError,
    expand_library_shorthand,
    is_library_ref,
    ref_kind,
    ref_to_partition_key,
    resolve_under_root,
)
from ergot_dagster.resources.runtime import StageFile
from ergot_dagster.sources.record import latest_source_record
from ergot_dagster.sources.root import S3SourceRoot
from ergot_dagster.workflows.execute import WorkflowInput
from ergot_dagster.workflows.model import WorkflowDefinition


def check_media_type(definition: WorkflowDefinition, name: str, ref: str, media_type: str) -> None:
    """Refuse media of a type that input `name` does not accept, naming both."""
    accepted = definition.inputs[name].media_types
    if not media_type_matches(media_type, accepted):
        raise SourceError(
            f"input {name!r} ({ref}) is {media_type}, but only {', '.join(accepted)} is accepted"
        )


def check_input_names(definition: WorkflowDefinition, given: dict[str, str | list[str]]) -> None:
    """Refuse inputs the workflow does not have."""
    unknown = sorted(set(given) - set(definition.inputs))
    if unknown:
        raise RequestError(
            f"no input(s) named {', '.join(unknown)}; the inputs are {', '.join(definition.inputs)}"
        )


def check_arity(definition: WorkflowDefinition, name: str, value: str | list[str]) -> list[str]:
    """The refs given for input `name` as a list, refusing a list where one ref is taken."""
    spec = definition.inputs[name]
    if isinstance(value, list):
        if not spec.many:
            raise RequestError(f"input {name!r} takes one ref, not a list of {len(value)}")
        if not value:
            raise RequestError(f"input {name!r}: an empty list")
        if len(value) > spec.max_items:
            raise RequestError(
                f"input {name!r} takes at most {spec.max_items} refs; the request gave {len(value)}"
            )
        return value
    return [value]


def source_input(
    *,
    instance: DagsterInstance,
    definition: WorkflowDefinition,
    name: str,
    ref: str,
    store: ArtifactStore | None = None,
) -> WorkflowInput:
    """Bind input `name` to the ingested source `ref`.

    A source in object storage needs `store`, whose fetch directory receives the download.
    """
    try:
        key = ref_to_partition_key(ref)
    except InvalidRefError as exc:
        raise SourceError(str(exc)) from exc
    record = latest_source_record(instance, key)
    if record is None:
        raise SourceError(
            f"source {ref!r} has not been ingested; run `ergot ingest` on it or wait for the "
            "ingest sensor"
        )
    check_media_type(definition, name, ref, record.media_type)
    if is_s3_location(record.root):
        if store is None:
            raise SourceError(f"source {ref!r} is in object storage; binding it needs a store")
        try:
            path = S3SourceRoot(record.root).fetch(record, store.fetch_dir())
        except InvalidRefError as exc:
            raise SourceError(f"source {ref!r}: {exc}") from exc
        return WorkflowInput(
            name=name,
            files=StageFile(path=path, media_type=record.media_type, probe=record.probe),
            parents=[ParentRef(kind="source", ref=ref, sha256=record.sha256, input=name)],
        )
    # The file is read from the root it was ingested under, and must still lie inside it.
    try:
        path = resolve_under_root(Path(record.root), ref)
    except (InvalidRefError, FileNotFoundError) as exc:
        raise SourceError(f"source {ref!r}: {exc}") from exc
    stat = path.stat()
    # Size and mtime are the cheap proof that the file is what was ingested; a file only touched
    # (or copied by a sync that does not keep mtimes) is hashed, and passes if its bytes are the
    # same, so that lineage never names a sha256 other than the bytes processed.
    if stat.st_size != record.size or (
        stat.st_mtime_ns != record.mtime_ns and sha256_file(path)[0] != record.sha256
    ):
        raise SourceError(
            f"source {ref!r} has changed since it was ingested (sha256 {record.sha256[:12]}); "
            "ingest it again before processing it"
        )
    return WorkflowInput(
        name=name,
        files=StageFile(path=path, media_type=record.media_type, probe=record.probe),
        parents=[ParentRef(kind="source", ref=ref, sha256=record.sha256, input=name)],
    )


def artifact_input(
    *,
    store: ArtifactStore,
    definition: WorkflowDefinition,
    name: str,
    manifest: ArtifactManifest,
    via: LibraryEntry | None = None,
) -> WorkflowInput:
    """Bind input `name` to a stored artifact (named directly, or through library entry `via`)."""
    check_media_type(definition, name, via.ref if via else manifest.ref, manifest.media_type)
    files: StageFile | list[StageFile]
    if manifest.kind == "set":
        files = [
            StageFile(path=store.local_path(m.uri), media_type=m.media_type)
            for m in manifest.members
        ]
    else:
        files = StageFile(path=store.local_path(manifest.uri), media_type=manifest.media_type)
    if via is not None:
        parent = ParentRef(kind="library", ref=via.ref, sha256=via.sha256, input=name)
    else:
        parent = ParentRef(kind="artifact", ref=manifest.ref, sha256=manifest.sha256, input=name)
    return WorkflowInput(name=name, files=files, parents=[parent])


def stored_input(
    *, store: ArtifactStore, definition: WorkflowDefinition, name: str, ref: str
) -> WorkflowInput:
    """Bind input `name` to an artifact or library ref; `RequestError` naming it if absent."""
    entry: LibraryEntry | None = None
    artifact = ref
    if is_library_ref(ref):
        try:
            entry = store.get_library_entry(ref)
        except StoreError as exc:
            raise RequestError(f"input {name!r}: {exc}") from exc
        if entry is None:
            raise RequestError(
                f"input {name!r}: nothing is promoted as {ref}; see `ergot libraries`"
            )
        artifact = entry.artifact
    try:
        manifest = store.get_manifest(artifact)
    except StoreError as exc:
        raise RequestError(f"input {name!r}: {exc}") from exc
    if entry is not None and manifest.sha256 != entry.sha256:
        raise SourceError(
            f"input {name!r}: {ref} names {artifact} with sha256 {entry.sha256[:12]}, but the "
            f"store holds {manifest.sha256[:12]}"
        )
    return artifact_input(
        store=store, definition=definition, name=name, manifest=manifest, via=entry
    )


def _bind_one(
    *,
    instance: DagsterInstance,
    store: ArtifactStore,
    definition: WorkflowDefinition,
    name: str,
    ref: str,
) -> WorkflowInput:
    ref = expand_library_shorthand(ref, definition.inputs[name].library)
    if ref_kind(ref) == "source":
        return source_input(
            instance=instance, definition=definition, name=name, ref=ref, store=store
        )
    return stored_input(store=store, definition=definition, name=name, ref=ref)


def _join(name: str, parts: list[WorkflowInput]) -> WorkflowInput:
    """One list-valued input from several bound refs, files and parents in the order given."""
    files: list[StageFile] = []
    parents: list[ParentRef] = []
    for part in parts:
        files += part.files if isinstance(part.files, list) else [part.files]
        parents += part.parents
    return WorkflowInput(name=name, files=files, parents=parents)


def _latest_asset_manifest(
    instance: DagsterInstance, asset: str, partition_key: str
) -> ArtifactManifest | None:
    result = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset.split("/")), asset_partitions=[partition_key]),
        limit=1,
    )
    if not result.records or result.records[0].asset_materialization is None:
        return None
    return manifest_from_metadata(dict(result.records[0].asset_materialization.metadata))


def bind_inputs(
    *,
    instance: DagsterInstance,
    store: ArtifactStore,
    definition: WorkflowDefinition,
    source_ref: str,
    partition_key: str,
    given: dict[str, str | list[str]],
) -> dict[str, WorkflowInput]:
    """Bind every input of `definition` for one run; raise naming the input that cannot be bound.

    The primary input is `source_ref`, the partition: an ingested source, or a stored artifact or
    library entry for a workflow applied to derived media.
    """
    check_input_names(definition, given)
    bound: dict[str, WorkflowInput] = {}
    for name, spec in definition.inputs.items():
        if spec.primary:
            if name in given and given[name] != source_ref:
                raise RequestError(
                    f"input {name!r} is the primary source; it is the partition ({source_ref!r})"
                )
            bound[name] = _bind_one(
                instance=instance, store=store, definition=definition, name=name, ref=source_ref
            )
            continue
        value = given.get(name)
        if value is not None:
            refs = check_arity(definition, name, value)
            parts = [
                _bind_one(instance=instance, store=store, definition=definition, name=name, ref=r)
                for r in refs
            ]
            bound[name] = _join(name, parts) if spec.many else parts[0]
        elif spec.asset:
            manifest = _latest_asset_manifest(instance, spec.asset, partition_key)
            if manifest is not None:
                bound[name] = artifact_input(
                    store=store, definition=definition, name=name, manifest=manifest
                )
            elif spec.required:
                raise SourceError(
                    f"input {name!r} needs {spec.asset} for {source_ref!r}, which has not been "
                    "materialized yet; name the artifact to use in the request's inputs"
                )
        elif spec.required:
            raise RequestError(f"input {name!r} is required and the request gave none")
    return bound
