"""The run queue: Dagster's QueuedRunCoordinator, told about runtime targets.

Two additions, both feeding Dagster's own mechanisms:

- at submission, each run is routed (`targets.routing`) and tagged `ergot/target.<name>` for every
  target it will use, whether it came from a request, the UI or a sensor;
- the queue's tag concurrency limits include one limit per target, from its `concurrency`, so a
  target's limit holds across all runs and a run waiting for a slot stays visibly QUEUED.

A run that no target can serve is failed at once with the reason, instead of waiting forever.
A second submission of a request id returns the request's first run (`idempotency`).
"""

from __future__ import annotations

import logging
from typing import Any

from dagster import AssetKey, DagsterInstance
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._core.run_coordinator.queued_run_coordinator import RunQueueConfig
from dagster._core.storage.dagster_run import DagsterRun

from ergot_dagster.errors import ErgotError
from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.idempotency import duplicate_of, same_request
from ergot_dagster.settings import ErgotSettings
from ergot_dagster.targets.config import POOL_TAG_PREFIX, cached_targets
from ergot_dagster.targets.health import unhealthy_targets
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.targets.routing import TARGET_TAG_PREFIX, route, routing_tags
from ergot_dagster.workflows.loader import cached_registry
from ergot_dagster.workflows.model import WorkflowDefinition
from ergot_dagster.workflows.run_config import op_name

logger = logging.getLogger("ergot.run_coordinator")


def workflows_of_run(run: DagsterRun, settings: ErgotSettings) -> list[WorkflowDefinition]:
    """The workflow versions a run materializes, from its asset selection and op config."""
    registry = cached_registry(settings.workflow_defs)
    keys: set[AssetKey] = set(run.asset_selection or [])
    found: dict[str, WorkflowDefinition] = {}
    for key in keys:
        if len(key.path) != 3 or key.path[1] not in registry.names():
            continue
        latest = registry.latest(key.path[1])
        if latest.family != key.path[0] or latest.name in found:
            continue
        op_config = ((run.run_config or {}).get("ops") or {}).get(op_name(latest)) or {}
        version = (op_config.get("config") or {}).get("version")
        found[latest.name] = registry.get(f"{latest.name}@{version}" if version else latest.name)
    return list(found.values())


def route_run(
    run: DagsterRun, settings: ErgotSettings, instance: DagsterInstance
) -> dict[str, RuntimeTarget]:
    """Route every workflow in the run, skipping targets last found down; `RoutingError` if one
    cannot be served."""
    targets = cached_targets(settings.runtime_targets)
    execution_target = run.tags.get(T.EXECUTION_TARGET, "local")
    down = unhealthy_targets(instance, targets)
    routed: dict[str, RuntimeTarget] = {}
    for definition in workflows_of_run(run, settings):
        for runtime, target in route(definition, targets, execution_target, unhealthy=down).items():
            routed.setdefault(runtime, target)
    return routed


class ErgotRunCoordinator(QueuedRunCoordinator):
    """QueuedRunCoordinator with per-target concurrency limits and routing at submission."""

    def get_run_queue_config(self) -> RunQueueConfig:
        config = super().get_run_queue_config()
        try:
            targets_config = cached_targets(ErgotSettings.from_env().runtime_targets)
        except (ErgotError, OSError) as exc:
            logger.warning(f"runtime targets unreadable, no per-target limits applied: {exc}")
            return config
        configured = {limit.get("key") for limit in config.tag_concurrency_limits}
        limits: list[dict[str, Any]] = list(config.tag_concurrency_limits)
        for target in targets_config.targets:
            if target.concurrency_tag not in configured:
                limits.append({"key": target.concurrency_tag, "limit": target.concurrency})
        for pool, limit in targets_config.pools.items():
            if POOL_TAG_PREFIX + pool not in configured:
                limits.append({"key": POOL_TAG_PREFIX + pool, "limit": limit})
        return config._replace(tag_concurrency_limits=limits)

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        instance: DagsterInstance = self._instance
        first = duplicate_of(instance, run)
        if first is not None:
            if not same_request(first, run):
                return self._refuse(
                    run,
                    f"request id {run.tags.get(T.REQUEST_ID)!r} was already used for a different "
                    f"request (run {first.run_id}); use a new request id",
                )
            # The same request again: it has a run already. This one never existed.
            instance.delete_run(run.run_id)
            logger.info(f"run {run.run_id} repeats request of run {first.run_id}; removed")
            return instance.get_run_by_id(first.run_id) or first
        already_routed = any(key.startswith(TARGET_TAG_PREFIX) for key in run.tags)
        if run.status.value == "NOT_STARTED" and not already_routed:
            failure = self._route(run)
            if failure is not None:
                return self._refuse(run, failure)
            reloaded = instance.get_run_by_id(run.run_id)
            assert reloaded is not None
            context = SubmitRunContext(reloaded, context.workspace)
        return super().submit_run(context)

    def _refuse(self, run: DagsterRun, reason: str) -> DagsterRun:
        """Fail a run that must not run, and make sure run retries do not start it again."""
        instance: DagsterInstance = self._instance
        # Run retries re-run any failure that is not a step failure, deciding from the run's own
        # `dagster/max_retries` when it fails; this one would only fail the same way again.
        instance.add_run_tags(run.run_id, {T.MAX_RETRIES: "0"})
        instance.report_run_failed(run, reason)
        return instance.get_run_by_id(run.run_id) or run

    def _route(self, run: DagsterRun) -> str | None:
        """Tag the run with its targets; return the reason when it cannot be routed."""
        try:
            routed = route_run(run, ErgotSettings.from_env(), self._instance)
        except ErgotError as exc:
            return f"Cannot route this run: {exc}"
        if routed:
            self._instance.add_run_tags(run.run_id, routing_tags(routed))
        return None
