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

from ergot_dagster.artifacts.manifest import (
    ArtifactManifest,
    ExecutedBy,
    ParentRef,
    RuntimeInfo,
    SetMember,
)
from ergot_dagster.artifacts.store import ArtifactStore
from ergot_dagster.errors import ErgotError, PermanentRuntimeError, RuntimeFailure
from ergot_dagster.media.sniff import verify_media_type
from ergot_dagster.orchestration.events import RunEvents
from ergot_dagster.refs import artifact_ref
from ergot_dagster.resources.runtime import (
    RuntimeAdapter,
    StageFile,
    StageRequest,
    StageResult,
)
from ergot_dagster.targets.model import RuntimeTarget
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
    """An artifact ready for the run's record, with what its stage reported.

    `reused` is true when the artifact was stored by an earlier attempt of this run or by the run
    this one retries; its bytes and manifest are not written again.
    """

    manifest: ArtifactManifest
    stage_metadata: dict[str, Any]
    reused: bool = False


class PlanFailure(RuntimeFailure):
    """Some selected artifacts could not be produced. Others may have been: see `failures`.

    Transient when any cause was transient, since trying again could then produce what is missing
    (and artifacts already stored are reused, not made twice).
    """

    def __init__(self, failures: dict[str, ErgotError]) -> None:
        self.failures = failures
        by_cause: dict[int, list[str]] = {}
        for artifact, error in failures.items():
            by_cause.setdefault(id(error), []).append(artifact)
        parts = []
        for artifacts in by_cause.values():
            error = failures[artifacts[0]]
            parts.append(f"{', '.join(sorted(artifacts))}: {error}")
        super().__init__(
            "; ".join(parts),
            job_id=next(
                (
                    getattr(e, "job_id", None)
                    for e in failures.values()
                    if getattr(e, "job_id", None)
                ),
                None,
            ),
        )
        self.transient = any(getattr(e, "transient", False) for e in failures.values())

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per artifact: the error class, message and whether retrying could help."""
        return {
            artifact: {
                "error_type": type(error).__name__,
                "message": str(error),
                "retryable": bool(getattr(error, "transient", False)),
            }
            for artifact, error in sorted(self.failures.items())
        }


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
    endpoint: str | None = None,
    executed_by: ExecutedBy | None = None,
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
            type=stage.runtime or definition.runtime,
            target=result.target,
            job_id=result.job_id,
            endpoint=endpoint,
        ),
        stage=stage.id,
        members=members,
        created_at=datetime.now(UTC),
        executed_by=executed_by,
    )
    store.put_manifest(manifest)
    return manifest


def _consumed_outputs(stages: list[StageSpec]) -> set[str]:
    """`stage.output` keys that a later stage among `stages` takes as input."""
    consumed = set()
    for stage in stages:
        for value in stage.inputs.values():
            binding = parse_binding(value)
            if binding and binding.scope == "stages":
                consumed.add(".".join(binding.path))
    return consumed


def _stage_inputs(
    stage: StageSpec, inputs: dict[str, WorkflowInput], outcome: _StageOutcome
) -> tuple[dict[str, StageFile | list[StageFile]], list[ParentRef]]:
    stage_inputs: dict[str, StageFile | list[StageFile]] = {}
    parents: list[ParentRef] = []
    for key, value in stage.inputs.items():
        binding = parse_binding(value)
        assert binding is not None  # the model only admits bindings here
        if binding.scope == "inputs":
            bound = inputs.get(binding.path[0])
            if bound is None:  # an optional input the request did not give
                continue
            stage_inputs[key] = bound.files
            parents.extend(bound.parents)
        else:
            output_key = ".".join(binding.path)
            if output_key not in outcome.files:
                raise PermanentRuntimeError(
                    f"stage {stage.id!r} needs {value}, which the earlier stage did not produce"
                )
            stage_inputs[key] = outcome.files[output_key]
            parents.extend(outcome.parents[output_key])
    return stage_inputs, _unique(parents)


def _stored_files(store: ArtifactStore, manifest: ArtifactManifest) -> StageFile | list[StageFile]:
    if manifest.kind == "set":
        return [
            StageFile(path=store.local_path(m.uri), media_type=m.media_type)
            for m in manifest.members
        ]
    return StageFile(path=store.local_path(manifest.uri), media_type=manifest.media_type)


def _upstream_stages(stage: StageSpec) -> set[str]:
    upstream = set()
    for value in stage.inputs.values():
        binding = parse_binding(value)
        if binding and binding.scope == "stages":
            upstream.add(binding.path[0])
    return upstream


def execute_plan(
    *,
    definition: WorkflowDefinition,
    settings: dict[str, Any],
    inputs: dict[str, WorkflowInput],
    selected: set[str],
    adapters: dict[str, RuntimeAdapter],
    targets: dict[str, RuntimeTarget],
    store: ArtifactStore,
    run_id: str,
    source_ref: str,
    events: RunEvents,
    reusable: dict[str, ArtifactManifest] | None = None,
    log: logging.Logger | None = None,
    executed_by: ExecutedBy | None = None,
) -> Iterator[StoredArtifact]:
    """Run the stages needed for `selected`, yielding each artifact as soon as it is stored.

    `reusable` holds artifacts this request already stored (an earlier attempt of the run, or
    the run it retries): a stage whose needed outputs all exist there is not run again. A stage
    that fails fails only its own artifacts and the stages that depend on it; independent stages
    still run. At the end, `PlanFailure` names every artifact that could not be produced.
    """
    reusable = reusable or {}
    stages = needed_stages(definition, selected)
    consumed = _consumed_outputs(stages)
    outcome = _StageOutcome()
    stored: dict[str, ArtifactManifest] = {}
    failures: dict[str, ErgotError] = {}
    failed_stages: dict[str, ErgotError] = {}
    with store.scratch_dir(run_id) as workdir:
        for stage in stages:
            runtime_type = stage.runtime or definition.runtime
            mine = {a for a in stage.outputs.values() if a is not None and a in selected}
            broken = _upstream_stages(stage) & set(failed_stages)
            if broken:
                cause = failed_stages[sorted(broken)[0]]
                error = PermanentRuntimeError(f"not run: stage {sorted(broken)[0]!r} failed")
                error.transient = getattr(cause, "transient", False)
                failed_stages[stage.id] = error
                failures.update(dict.fromkeys(mine, error))
                continue

            wanted = {
                output
                for output, artifact in stage.outputs.items()
                if (artifact is not None and artifact in selected)
                or f"{stage.id}.{output}" in consumed
            }
            reused = {
                output: reusable[artifact]
                for output, artifact in stage.outputs.items()
                if artifact is not None and artifact in reusable
            }
            if wanted and wanted <= set(reused):
                # Everything this stage would give is already stored for this request.
                for output, manifest in reused.items():
                    key = f"{stage.id}.{output}"
                    outcome.files[key] = _stored_files(store, manifest)
                    outcome.parents[key] = [
                        ParentRef(kind="artifact", ref=manifest.ref, sha256=manifest.sha256)
                    ]
                    if manifest.name in selected:
                        stored[manifest.name] = manifest
                        yield StoredArtifact(
                            manifest=manifest,
                            reused=True,
                            stage_metadata={"stage": stage.id, "reused_from_run": manifest.run_id},
                        )
                events.emit(
                    "stage_reused",
                    f"stage {stage.id}: not run again, its outputs are already stored",
                    stage=stage.id,
                    artifacts=sorted(m.ref for m in reused.values()),
                )
                continue

            target = targets[runtime_type]
            adapter = adapters[runtime_type]
            timeout_s = stage.timeout_s or adapter.default_timeout_s
            started = time.monotonic()
            try:
                stage_inputs, stage_parents = _stage_inputs(stage, inputs, outcome)
                stage_dir = workdir / stage.id
                stage_dir.mkdir(exist_ok=True)
                events.emit(
                    "stage_started",
                    f"stage {stage.id} started: {runtime_type} {stage.operation or 'template'} "
                    f"on {target.name} (timeout {timeout_s:g} s)",
                    stage=stage.id,
                    runtime=runtime_type,
                    target=target.name,
                    operation=stage.operation,
                    timeout_s=timeout_s,
                )
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
                        target=target,
                        progress=events.progress_reporter(stage.id),
                    ),
                    log or logging.getLogger(f"ergot.stage.{stage.id}"),
                )
            except ErgotError as exc:
                failed_stages[stage.id] = exc
                failures.update(dict.fromkeys(mine, exc))
                events.emit(
                    "stage_failed",
                    f"stage {stage.id} failed after {time.monotonic() - started:.2f} s: {exc}",
                    stage=stage.id,
                    runtime=runtime_type,
                    target=target.name,
                    error_type=type(exc).__name__,
                    error=str(exc),
                    retryable=bool(getattr(exc, "transient", False)),
                    job_id=getattr(exc, "job_id", None),
                    elapsed_s=round(time.monotonic() - started, 3),
                )
                continue
            # What the adapter reported, under the plane's own fields (which always win).
            report = {
                **result.metadata,
                "stage": stage.id,
                "runtime": runtime_type,
                "target": result.target,
                "job_id": result.job_id,
                "elapsed_s": round(time.monotonic() - started, 3),
                "outputs": sorted(result.outputs),
            }
            events.emit(
                "stage_finished",
                f"stage {stage.id} finished in {report['elapsed_s']:.2f} s (job {result.job_id})",
                **report,
            )
            for output, artifact in stage.outputs.items():
                key = f"{stage.id}.{output}"
                if artifact is not None and artifact in reusable:
                    # Stored by an earlier attempt: keep those bytes, so lineage stays true.
                    manifest = reusable[artifact]
                    outcome.files[key] = _stored_files(store, manifest)
                    outcome.parents[key] = [
                        ParentRef(kind="artifact", ref=manifest.ref, sha256=manifest.sha256)
                    ]
                    if artifact in selected:
                        stored[artifact] = manifest
                        yield StoredArtifact(manifest=manifest, stage_metadata=report, reused=True)
                    continue
                produced = result.outputs.get(output)
                if produced is None:
                    continue
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
                try:
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
                        endpoint=target.public_endpoint,
                        executed_by=executed_by,
                    )
                except ErgotError as exc:
                    failures[artifact] = exc
                    # A later stage must not consume what could not be stored.
                    outcome.files.pop(key, None)
                    events.emit(
                        "artifact_failed",
                        f"artifact {artifact} failed: {exc}",
                        artifact=artifact,
                        stage=stage.id,
                        error_type=type(exc).__name__,
                        error=str(exc),
                    )
                    continue
                stored[artifact] = manifest
                # Later stages that consume this output descend from the artifact itself.
                outcome.parents[key] = [
                    ParentRef(kind="artifact", ref=manifest.ref, sha256=manifest.sha256)
                ]
                events.emit(
                    "artifact_stored",
                    f"artifact {artifact} stored: {manifest.ref}",
                    artifact=artifact,
                    ref=manifest.ref,
                    sha256=manifest.sha256,
                    size=manifest.size,
                    media_type=manifest.media_type,
                )
                yield StoredArtifact(manifest=manifest, stage_metadata=report)
    for name in sorted(selected - set(stored) - set(failures)):
        if definition.outputs[name].required:
            failures[name] = PermanentRuntimeError(
                f"required artifact {name!r} was not produced by its stage"
            )
    if failures:
        raise PlanFailure(failures)


def _unique(parents: list[ParentRef]) -> list[ParentRef]:
    seen: set[tuple[str, str]] = set()
    result = []
    for parent in parents:
        if (parent.kind, parent.ref) not in seen:
            seen.add((parent.kind, parent.ref))
            result.append(parent)
    return result
