"""The run launcher on a cluster: Dagster's K8sRunLauncher, plus two things only the plane knows.

It is a thin subclass; everything that builds and watches the Kubernetes Job (image, command,
environment, secrets, namespace, TTL, job status for run monitoring, termination) is
K8sRunLauncher's own. It adds, before the Job is created:

- the last duplicate check of a request id, as `ErgotRunLauncher` does on one machine: two
  submissions of one request too close together for the queue to see both start one Job;
- per-target scheduling for runs that were not planned: a run launched from the Dagster UI or
  a sensor carries routing tags (`ergot/target.<name>`, from the run queue) but no
  `dagster-k8s/config` tag, which `plan_run` writes. The launcher writes it from the routing
  tags and the targets file, so a GPU target's run gets its GPU wherever it was submitted from.
  A run whose targets' hints conflict is failed with the reason, never started misplaced.

A `dagster-k8s/config` tag already on the run (from planning, or set by hand) is left as it is;
the launcher's `only_allow_user_defined_k8s_config_fields` bounds what any such tag may set.
"""

from __future__ import annotations

import logging

from dagster._core.launcher import LaunchRunContext
from dagster._core.storage.dagster_run import DagsterRun
from dagster_k8s import K8sRunLauncher

from ergot_dagster.errors import ErgotError
from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.idempotency import duplicate_of
from ergot_dagster.orchestration.k8s import K8S_CONFIG_TAG, scheduling_tags_for
from ergot_dagster.settings import ErgotSettings
from ergot_dagster.targets.config import cached_targets
from ergot_dagster.targets.routing import TARGET_TAG_PREFIX, targets_from_tags

logger = logging.getLogger("ergot.k8s_launcher")


class ErgotK8sRunLauncher(K8sRunLauncher):
    """K8sRunLauncher with the request-id check and per-target scheduling for unplanned runs."""

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        first = duplicate_of(self._instance, run)
        if first is not None:
            # Two submissions of one request too close together for the queue to see both.
            self._instance.report_run_canceled(
                run, f"not started: request {run.tags.get(T.REQUEST_ID)!r} runs as {first.run_id}"
            )
            return
        scheduled = self._with_scheduling(run)
        if scheduled is not None:
            super().launch_run(LaunchRunContext(dagster_run=scheduled, workspace=context.workspace))

    def _with_scheduling(self, run: DagsterRun) -> DagsterRun | None:
        """`run` with its `dagster-k8s/config` tag; None when it cannot be scheduled (failed)."""
        routed = any(key.startswith(TARGET_TAG_PREFIX) for key in run.tags)
        if K8S_CONFIG_TAG in run.tags or not routed:
            return run
        try:
            targets = cached_targets(ErgotSettings.from_env().runtime_targets)
            scheduling = scheduling_tags_for(targets_from_tags(run.tags, targets).values())
        except ErgotError as exc:
            # Started without its targets' placement, a GPU run would fail on a CPU node (or
            # hold a GPU it does not use): say why instead.
            self._instance.report_run_failed(run, f"Cannot schedule this run on Kubernetes: {exc}")
            return None
        if not scheduling:
            return run
        self._instance.add_run_tags(run.run_id, scheduling)
        logger.info(f"run {run.run_id}: scheduled from its targets' Kubernetes hints")
        return self._instance.get_run_by_id(run.run_id) or run
