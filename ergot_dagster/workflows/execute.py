"""Running a workflow's plan: stage by stage, storing each artifact as soon as it exists.

This is runtime-neutral: each stage goes to the adapter of its runtime type, and what comes back is
stored content-addressed with a manifest naming its parents. Artifacts are yielded one by one so
that a failure in a later stage keeps the artifacts already produced (partial success), and the run
records exactly which ones exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ergot_dagster.artifacts.manifest import ArtifactManifest, ParentRef, RuntimeInfo, SetMember
from ergot_dagster.artifacts.store import ArtifactStore
from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.media.sniff import verify_media_type
from ergot_dagster.refs import artifact_ref
from ergot_dagster.resources.runtime import (
    RuntimeAdapter,
    StageFile,
    StageRequest,
    StageResult,
)
from ergot_dagster.workflows.model import StageSpec, WorkflowDefinition, parse_binding


@dataclass
class WorkflowInput:
    """A workflow input made ready for stages: its file(s) and the lineage it brings."""

    name: str
    files: StageFile | list[StageFile]
    parents: list[ParentRef]


@dataclass
class _StageOutcome:
    files: dict[str, StageFile | list[StageFile]] = field(default_factory=dict)
    parents: dict[str, list[ParentRef]] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact just stored, with what its stage reported (timings, job ids, choices made)."""

    manifest: ArtifactManifest
    stage_metadata: dict[str, Any]


class MissingArtifactsError(PermanentRuntimeError):
    """The plan finished but required artifacts were not produced."""


def needed_stages(definition: WorkflowDefinition, selected: set[str]) -> list[StageSpec]:
    """The stages that must run to produce the `selected` artifacts, in plan order."""
    by_id = {stage.id: stage for stage in definition.plan}
    wanted: set[str] = set()
    pending = [s.id for s in definition.plan if set(s.outputs.values()) & selected]
    while pending:
        stage_id = pending.pop()
        if stage_id in wanted:
            continue
        wanted.add(stage_id)
        for value in by_id[stage_id].inputs.values():
            binding = parse_binding(value)
            if binding and binding.scope == "stages":
                pending.append(binding.path[0])
    return [stage for stage in definition.plan if stage.id in wanted]


def _lookup(container: dict[str, Any], path: list[str], what: str) -> Any:
    value: Any = container
    for part in path:
        if not isinstance(value, dict) or part not in value:
            raise PermanentRuntimeError(f"{what} is not set")
        value = value[part]
    return value


def resolve_params(
    stage: StageSpec, settings: dict[str, Any], inputs: dict[str, WorkflowInput]
) -> dict[str, Any]:
    """Substitute `${settings.*}` and `${inputs.*}` in a stage's params."""
    resolved = {}
    for key, value in stage.params.items():
        binding = parse_binding(value)
        if binding is None:
            resolved[key] = value
        elif binding.scope == "settings":
            resolved[key] = _lookup(settings, binding.path, f"setting {'.'.join(binding.path)}")
        elif binding.scope == "inputs":
            files = inputs[binding.path[0]].files
            resolved[key] = (
                [str(f.path) for f in files] if isinstance(files, list) else str(files.path)
            )
        else:
            raise PermanentRuntimeError(f"stage {stage.id!r}: param {key!r} cannot bind {value}")
    return resolved


def _set_digest(members: list[SetMember]) -> str:
    listing = [{"name": m.name, "sha256": m.sha256} for m in members]
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def store_artifact(
    *,
    store: ArtifactStore,
    definition: WorkflowDefinition,
    artifact: str,
    produced: Path | list[Path],
    run_id: str,
    source_ref: str,
    parents: list[ParentRef],
    result: StageResult,
    stage: StageSpec,
) -> ArtifactManifest:
    """Put an artifact's bytes in the store and write its manifest."""
    spec = definition.outputs[artifact]
    what = f"{definition.spec} stage {stage.id!r} artifact {artifact!r}"
    ref = artifact_ref(run_id, artifact)
    members: list[SetMember] = []
    if spec.kind == "set":
        paths = produced if isinstance(produced, list) else [produced]
        if not paths:
            raise PermanentRuntimeError(f"{what} is an empty set")
        names = [p.name for p in paths]
        if len(set(names)) != len(names):
            raise PermanentRuntimeError(f"{what} has members with the same file name")
        for path in paths:
            verify_media_type(path, spec.media_type, f"{what} member {path.name}")
            blob = store.put_blob(path, spec.media_type)
            members.append(
                SetMember(
                    name=path.name,
                    media_type=spec.media_type,
                    size=blob.size,
                    sha256=blob.sha256,
                    uri=blob.uri,
                )
            )
        sha256 = _set_digest(members)
        size = sum(m.size for m in members)
        # A set's bytes are its members; its own uri is the manifest that lists them.
        uri = store.manifest_uri(ref)
    else:
        if isinstance(produced, list):
            raise PermanentRuntimeError(f"{what} is one file but the stage returned several")
        verify_media_type(produced, spec.media_type, what)
        blob = store.put_blob(produced, spec.media_type)
        sha256, size, uri = blob.sha256, blob.size, blob.uri
    manifest = ArtifactManifest(
        ref=ref,
        name=artifact,
        kind=spec.kind,
        media_type=spec.media_type,
        size=size,
        sha256=sha256,
        uri=uri,
        workflow=definition.ref,
        run_id=run_id,
        source_ref=source_ref,
        parents=parents,
        runtime=RuntimeInfo(
            type=stage.runtime or definition.runtime, target=result.target, job_id=result.job_id
        ),
        stage=stage.id,
        members=members,
        created_at=datetime.now(UTC),
    )
    store.put_manifest(manifest)
    return manifest


def execute_plan(
    *,
    definition: WorkflowDefinition,
    settings: dict[str, Any],
    inputs: dict[str, WorkflowInput],
    selected: set[str],
    adapters: dict[str, RuntimeAdapter],
    store: ArtifactStore,
    run_id: str,
    source_ref: str,
    log: logging.Logger,
) -> Iterator[StoredArtifact]:
    """Run the stages needed for `selected` and yield each artifact once stored.

    Raises after yielding what was produced if a stage fails or a required artifact is missing.
    """
    outcome = _StageOutcome()
    stored: dict[str, ArtifactManifest] = {}
    with store.scratch_dir(run_id) as workdir:
        for stage in needed_stages(definition, selected):
            runtime_type = stage.runtime or definition.runtime
            adapter = adapters[runtime_type]
            stage_inputs: dict[str, StageFile | list[StageFile]] = {}
            stage_parents: list[ParentRef] = []
            for key, value in stage.inputs.items():
                binding = parse_binding(value)
                assert binding is not None  # the model only admits bindings here
                if binding.scope == "inputs":
                    bound = inputs.get(binding.path[0])
                    if bound is None:  # an optional input the request did not give
                        continue
                    stage_inputs[key] = bound.files
                    stage_parents.extend(bound.parents)
                else:
                    output_key = ".".join(binding.path)
                    if output_key not in outcome.files:
                        raise PermanentRuntimeError(
                            f"stage {stage.id!r} needs {value}, which the earlier stage did not "
                            "produce"
                        )
                    stage_inputs[key] = outcome.files[output_key]
                    stage_parents.extend(outcome.parents[output_key])
            stage_parents = _unique(stage_parents)
            stage_dir = workdir / stage.id
            stage_dir.mkdir()
            timeout_s = stage.timeout_s or adapter.default_timeout_s
            log.info(
                f"stage {stage.id}: {runtime_type} {stage.operation or 'template'} on "
                f"{adapter.target} (timeout {timeout_s:g} s)"
            )
            started = time.monotonic()
            result = adapter.run_stage(
                StageRequest(
                    workflow=definition.ref,
                    stage=stage,
                    run_id=run_id,
                    inputs=stage_inputs,
                    params=resolve_params(stage, settings, inputs),
                    output_types={
                        out: definition.outputs[art].media_type
                        for out, art in stage.outputs.items()
                        if art is not None
                    },
                    workdir=stage_dir,
                    timeout_s=timeout_s,
                ),
                log,
            )
            report = {
                "stage": stage.id,
                "runtime": runtime_type,
                "target": result.target,
                "job_id": result.job_id,
                "elapsed_s": round(time.monotonic() - started, 3),
                "outputs": sorted(result.outputs),
                **result.metadata,
            }
            # One structured line per stage: what ran where, how long, and what it decided.
            log.info(f"stage {stage.id} done: {json.dumps(report, default=str)}")
            for output, artifact in stage.outputs.items():
                produced = result.outputs.get(output)
                if produced is None:
                    continue
                key = f"{stage.id}.{output}"
                media_type = (
                    definition.outputs[artifact].media_type
                    if artifact
                    else "application/octet-stream"
                )
                outcome.files[key] = (
                    [StageFile(path=p, media_type=media_type) for p in produced]
                    if isinstance(produced, list)
                    else StageFile(path=produced, media_type=media_type)
                )
                outcome.parents[key] = stage_parents
                if artifact is None or artifact not in selected:
                    continue
                manifest = store_artifact(
                    store=store,
                    definition=definition,
                    artifact=artifact,
                    produced=produced,
                    run_id=run_id,
                    source_ref=source_ref,
                    parents=stage_parents,
                    result=result,
                    stage=stage,
                )
                stored[artifact] = manifest
                # Later stages that consume this output descend from the artifact itself.
                outcome.parents[key] = [
                    ParentRef(kind="artifact", ref=manifest.ref, sha256=manifest.sha256)
                ]
                yield StoredArtifact(manifest=manifest, stage_metadata=report)
    missing = sorted(
        name for name in selected if definition.outputs[name].required and name not in stored
    )
    if missing:
        raise MissingArtifactsError(
            f"{definition.spec} finished without the required artifact(s) {', '.join(missing)}"
        )


def _unique(parents: list[ParentRef]) -> list[ParentRef]:
    seen: set[tuple[str, str]] = set()
    result = []
    for parent in parents:
        if (parent.kind, parent.ref) not in seen:
            seen.add((parent.kind, parent.ref))
            result.append(parent)
    return result
