"""The asset factory: every workflow definition becomes one Dagster multi-asset.

One multi-asset per workflow name (all its loaded versions share it; the op config chooses the
version, the latest by default), one asset per artifact, keyed `family/workflow/artifact`,
partitioned by source ref, downstream of `ergot/source` or of the artifacts it takes as inputs.
"""

import json
from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from ergot_dagster.resources.runtime import resource_key
from ergot_dagster.sources.record import SOURCE_KEY, source_partitions
from ergot_dagster.workflows.materialize import artifact_key, materialize_workflow
from ergot_dagster.workflows.model import WorkflowDefinition
from ergot_dagster.workflows.registry import WorkflowRegistry
from ergot_dagster.workflows.run_config import config_schema, op_name

DEFINITIONS_METADATA_KEY = "definitions"


def _deps(definition: WorkflowDefinition) -> list[AssetKey]:
    deps = [SOURCE_KEY]
    for spec in definition.inputs.values():
        if spec.asset:
            deps.append(AssetKey(spec.asset.split("/")))
    return deps


def _runtimes(versions: list[WorkflowDefinition]) -> list[str]:
    return sorted({s.runtime or v.runtime for v in versions for s in v.plan})


def _asset_specs(versions: list[WorkflowDefinition]) -> list[AssetSpec]:
    latest = versions[-1]
    names: list[str] = list(latest.outputs)
    for older in reversed(versions[:-1]):
        names += [n for n in older.outputs if n not in names]
    deps: list[AssetKey] = []
    for version in versions:
        deps += [d for d in _deps(version) if d not in deps]
    kinds = set(_runtimes(versions)[:2])
    specs = []
    for artifact in names:
        holder = next(v for v in reversed(versions) if artifact in v.outputs)
        output = holder.outputs[artifact]
        # An artifact is skippable unless every version must produce it; otherwise an unproduced
        # optional output would get an implicit materialization and lineage would lie.
        always = all(artifact in v.outputs and v.outputs[artifact].required for v in versions)
        specs.append(
            AssetSpec(
                key=artifact_key(latest, artifact),
                deps=deps,
                group_name=latest.family,
                description=f"{output.description or artifact} — {latest.description}".strip(),
                code_version=str(latest.version),
                skippable=not always,
                kinds=kinds | {"ergot"},
                metadata={
                    "workflow": latest.ref,
                    "versions": ", ".join(str(v.version) for v in versions),
                    "media_type": output.media_type,
                    "artifact_kind": output.kind,
                    "required": MetadataValue.bool(output.required),
                    "runtime": latest.runtime,
                    "capabilities": ", ".join(latest.capabilities) or "none",
                    "execution": f"local={latest.execution.local} remote={latest.execution.remote}",
                    "inputs": MetadataValue.json(
                        {k: v.model_dump(mode="json") for k, v in latest.inputs.items()}
                    ),
                    "settings_schema": MetadataValue.json(latest.settings),
                    "plan": MetadataValue.md(_plan_markdown(latest)),
                    # Every loaded version in full: what a consumer plans a request against
                    # over GraphQL (`client.catalog`), and what an operator reads in the UI.
                    DEFINITIONS_METADATA_KEY: MetadataValue.json(
                        {str(v.version): v.model_dump(mode="json") for v in versions}
                    ),
                },
                tags={"ergot/family": latest.family, "ergot/runtime": latest.runtime},
            )
        )
    return specs


def _plan_markdown(definition: WorkflowDefinition) -> str:
    rows = ["| stage | runtime | operation | outputs |", "| --- | --- | --- | --- |"]
    for stage in definition.plan:
        outputs = ", ".join(f"{k}→{v or '(internal)'}" for k, v in stage.outputs.items())
        operation = stage.operation or f"template ({len(json.dumps(stage.template))} bytes)"
        rows.append(
            f"| {stage.id} | {stage.runtime or definition.runtime} | {operation} | {outputs} |"
        )
    return "\n".join(rows)


def _check_specs(versions: list[WorkflowDefinition]) -> list[AssetCheckSpec]:
    latest = versions[-1]
    specs: dict[str, AssetCheckSpec] = {}
    for version in reversed(versions):
        for check in version.checks:
            if check.name not in specs:
                specs[check.name] = AssetCheckSpec(
                    name=check.name,
                    asset=artifact_key(latest, check.artifact),
                    description=check.description or None,
                    blocking=check.blocking,
                )
    return list(specs.values())


def build_workflow_asset(registry: WorkflowRegistry, name: str) -> AssetsDefinition:
    """The multi-asset of workflow `name`, covering all of its loaded versions."""
    versions = registry.versions(name)
    latest = versions[-1]

    @multi_asset(
        name=op_name(latest),
        specs=_asset_specs(versions),
        check_specs=_check_specs(versions),
        partitions_def=source_partitions,
        can_subset=True,
        config_schema=config_schema(versions),
        required_resource_keys={"artifact_store", "runtime_targets"}
        | {resource_key(r) for r in _runtimes(versions)},
        description=latest.description,
        op_tags={"ergot/workflow": latest.name, "ergot/family": latest.family},
    )
    def _workflow(context: AssetExecutionContext) -> Iterator[MaterializeResult | AssetCheckResult]:
        yield from materialize_workflow(context, registry, name)

    return _workflow


def build_workflow_assets(registry: WorkflowRegistry) -> list[AssetsDefinition]:
    """One multi-asset per workflow in the registry."""
    return [build_workflow_asset(registry, name) for name in registry.names()]
