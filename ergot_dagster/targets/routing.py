"""Routing: which target runs each runtime type of a workflow, for one run.

A stage goes to a target whose runtime type matches and whose capabilities cover the workflow's.
The request may name a locality (`local`, `remote`: where the run executes, which the workflow's
`execution` flags must allow) or a target, which then serves the stages of its own runtime type
while the workflow's other runtime types are routed locally. Targets known to be unhealthy are
skipped while a healthy one can serve. When none can serve, routing fails at once with what was
asked and what each target lacked.
"""

from __future__ import annotations

from collections.abc import Iterable

from ergot_dagster.errors import RequestError
from ergot_dagster.targets.config import POOL_TAG_PREFIX, TargetsConfig
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import WorkflowDefinition

LOCALITIES = ("local", "remote")
TARGET_TAG_PREFIX = "ergot/target."


class RoutingError(RequestError):
    """No target can serve a stage; the message lists what each candidate lacked."""


def runtime_types(definition: WorkflowDefinition) -> list[str]:
    return sorted({stage.runtime or definition.runtime for stage in definition.plan})


def _why_not(
    target: RuntimeTarget,
    runtime: str,
    capabilities: set[str],
    execution_target: str,
    unhealthy: set[str],
) -> str | None:
    if target.runtime != runtime:
        return f"runs {target.runtime}"
    if execution_target in LOCALITIES and target.locality.kind != execution_target:
        return f"is {target.locality.kind}"
    if execution_target not in LOCALITIES and target.name != execution_target:
        return "was not the named target"
    missing = sorted(capabilities - set(target.capabilities))
    if missing:
        return f"lacks {', '.join(missing)}"
    if target.name in unhealthy:
        return "is unhealthy"
    return None


def check_execution(definition: WorkflowDefinition, execution_target: str) -> None:
    """Refuse a locality the workflow's `execution` flags do not allow."""
    remote = execution_target == "remote"
    if remote and not definition.execution.remote:
        raise RoutingError(f"{definition.spec} does not support remote execution")
    if not remote and not definition.execution.local:
        raise RoutingError(f"{definition.spec} does not support local execution")


def route(
    definition: WorkflowDefinition,
    config: TargetsConfig,
    execution_target: str = "local",
    *,
    unhealthy: Iterable[str] = (),
) -> dict[str, RuntimeTarget]:
    """The target for each runtime type `definition` uses, or `RoutingError` saying why not."""
    if execution_target not in LOCALITIES and config.get(execution_target) is None:
        known = ", ".join(t.name for t in config.targets) or "none"
        raise RoutingError(
            f"execution target {execution_target!r} is neither local, remote nor a known target "
            f"(known: {known})"
        )
    check_execution(definition, execution_target)
    named = config.get(execution_target) if execution_target not in LOCALITIES else None
    down = set(unhealthy)
    routed: dict[str, RuntimeTarget] = {}
    for runtime in runtime_types(definition):
        asked = execution_target
        if named is not None and named.runtime != runtime:
            asked = "local"
        capabilities = definition.required_capabilities(runtime)
        reasons: dict[str, str] = {}
        candidates = []
        for target in config.targets:
            reason = _why_not(target, runtime, capabilities, asked, down)
            if reason is None:
                candidates.append(target)
            else:
                reasons[target.name] = reason
        if not candidates:
            # Unhealthy targets are a last resort only in the sense of a clear error: a run is
            # never sent to a target known to be down.
            lacking = "; ".join(f"{name} {why}" for name, why in reasons.items()) or "none exist"
            raise RoutingError(
                f"no runtime target can run {runtime} stages of {definition.spec} "
                f"(asked: {asked}, capabilities {sorted(capabilities) or 'none'}): "
                f"{lacking}"
            )
        preferred = [t for t in candidates if definition.name in t.routing.prefer_for]
        routed[runtime] = (preferred or candidates)[0]
    return routed


def routing_tags(routed: dict[str, RuntimeTarget]) -> dict[str, str]:
    """Run tags recording the routing; each target's tag counts against its concurrency limit."""
    tags = {target.concurrency_tag: runtime for runtime, target in routed.items()}
    tags["ergot/targets"] = ",".join(sorted(t.name for t in routed.values()))
    for target in routed.values():
        if target.routing.pool:
            # Counted against the pool's limit as well as the target's own.
            tags[POOL_TAG_PREFIX + target.routing.pool] = target.name
    return tags


def targets_from_tags(tags: dict[str, str], config: TargetsConfig) -> dict[str, RuntimeTarget]:
    """The routing recorded in a run's tags (runtime type -> target), as far as still configured."""
    routed: dict[str, RuntimeTarget] = {}
    for key, runtime in tags.items():
        if key.startswith(TARGET_TAG_PREFIX):
            target = config.get(key.removeprefix(TARGET_TAG_PREFIX))
            if target is not None and target.runtime == runtime:
                routed[runtime] = target
    return routed
