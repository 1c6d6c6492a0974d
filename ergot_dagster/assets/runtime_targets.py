"""Runtime targets as observable assets: `runtime/<target name>`, in the group `runtime`.

Nothing materializes them; the `runtime_health` sensor records observations of them (status,
latency, queue depth, device) and the result of their `reachable` check, so the Dagster UI shows
each target's health over time beside the workflows that run on it.
"""

from collections.abc import Iterator

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSpec,
    AssetSpec,
    MetadataValue,
    multi_asset_check,
)

from ergot_dagster.targets.config import TargetsConfig
from ergot_dagster.targets.health import CHECK_NAME, health_key, probe_all


def target_specs(config: TargetsConfig) -> list[AssetSpec]:
    """One external asset per configured target, described by its declaration."""
    specs = []
    for target in config.targets:
        declaration = target.model_dump(mode="json", exclude={"auth", "endpoint"})
        declaration["endpoint"] = target.public_endpoint
        declaration["auth"] = {
            "kind": target.auth.kind,
            # The variable's name only: the secret itself is never read here.
            "token_env": target.auth.token_env,
        }
        where = target.locality.kind + (
            f" ({target.locality.site})" if target.locality.site else ""
        )
        specs.append(
            AssetSpec(
                key=health_key(target.name),
                group_name="runtime",
                description=(
                    f"Runtime target {target.name}: {target.runtime}, {where}, "
                    f"{target.concurrency} at a time. Observed by the runtime_health sensor."
                ),
                kinds={target.runtime},
                metadata={
                    "runtime": target.runtime,
                    "locality": where,
                    "concurrency": MetadataValue.int(target.concurrency),
                    "capabilities": ", ".join(target.capabilities) or "none",
                    "endpoint": target.public_endpoint or "(local)",
                    "declaration": MetadataValue.json(declaration),
                },
                tags={"ergot/runtime": target.runtime, "ergot/locality": target.locality.kind},
            )
        )
    return specs


def target_check_specs(config: TargetsConfig) -> list[AssetCheckSpec]:
    """The `reachable` check of every target, failing while its last probe failed."""
    return [
        AssetCheckSpec(
            name=CHECK_NAME,
            asset=health_key(target.name),
            description="the target answered its last health probe",
        )
        for target in config.targets
    ]


def build_target_checks(config: TargetsConfig) -> list[AssetChecksDefinition]:
    """The `reachable` checks as one executable check: running it (from the UI, or `dagster
    asset check`) probes every target now and records what it found."""
    if not config.targets:
        return []

    @multi_asset_check(
        specs=target_check_specs(config),
        name="probe_runtime_targets",
        description="Probe every runtime target through its adapter's health probe.",
    )
    def probe_runtime_targets(
        context: AssetCheckExecutionContext,
    ) -> Iterator[AssetCheckResult]:
        for health in probe_all(config):
            # The observation carries the figures; the check says up or down.
            context.op_execution_context.log_event(health.observation())
            evaluation = health.check_evaluation()
            yield AssetCheckResult(
                asset_key=evaluation.asset_key,
                check_name=evaluation.check_name,
                passed=evaluation.passed,
                severity=evaluation.severity,
                description=evaluation.description,
                metadata=evaluation.metadata,
            )

    return [probe_runtime_targets]
