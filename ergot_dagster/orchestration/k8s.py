"""Per-target scheduling on Kubernetes: the `dagster-k8s/config` tag of a run.

Dagster's K8sRunLauncher reads the run tag `dagster-k8s/config` (JSON with `container_config`,
`pod_spec_config`, `pod_template_spec_metadata`, ...) and merges it into the Job it creates for
the run. This module writes that tag from the `routing.kubernetes` hints of the targets a run is
routed to, so that a run using a GPU ComfyUI target lands on a GPU node with the GPU requested,
and an FFmpeg run stays on CPU nodes.

A run that uses several targets gets them all: node selectors, tolerations and pod labels are
united, each resource is the largest any target asks for (requests and limits separately). Two
targets that need different values for one node label (or label, or service account) cannot
share a pod: that is a `SchedulingConflict` naming both, raised when the run is planned.

Planning (`requests.planning.plan_run`) adds the tag; runs that were not planned (launched from
the UI, a sensor) get it from the launcher (`orchestration.k8s_launcher`), from their routing
tags. Without hints on the run's targets there is no tag, and the launcher's defaults apply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ergot_dagster.orchestration.k8s_hints import Toleration, parse_quantity
from ergot_dagster.targets.config import TargetsConfig
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.targets.routing import RoutingError, route
from ergot_dagster.workflows.model import WorkflowDefinition

# dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY, spelled out so that planning (which consumers run
# too) does not import the kubernetes client; tests/test_k8s_manifests.py checks they agree.
K8S_CONFIG_TAG = "dagster-k8s/config"


class SchedulingConflict(RoutingError):
    """Two targets of one run ask for incompatible pod placement."""


def _unite(
    merged: dict[str, tuple[str, str]], wanted: dict[str, str], target: str, what: str
) -> None:
    """Add `wanted` (key -> value, from `target`) to `merged` (key -> (value, whose))."""
    for key, value in wanted.items():
        held = merged.get(key)
        if held is not None and held[0] != value:
            raise SchedulingConflict(
                f"targets {held[1]} and {target} cannot share a Kubernetes pod: {what} {key} is "
                f"{held[0]!r} for {held[1]} and {value!r} for {target}"
            )
        merged.setdefault(key, (value, target))


def _largest(merged: dict[str, str], wanted: dict[str, str]) -> None:
    for name, quantity in wanted.items():
        if name not in merged or parse_quantity(quantity) > parse_quantity(merged[name]):
            merged[name] = quantity


def scheduling_config(targets: Iterable[RuntimeTarget]) -> dict[str, Any] | None:
    """The `dagster-k8s/config` value for a run using `targets`, or None when none has hints.

    Raises `SchedulingConflict` when two targets need different values of one node label, pod
    label or service account, or when the united resources ask for more than they allow.
    """
    hinted = [t for t in targets if t.routing.kubernetes is not None]
    if not hinted:
        return None
    selector: dict[str, tuple[str, str]] = {}
    labels: dict[str, tuple[str, str]] = {}
    account: dict[str, tuple[str, str]] = {}
    tolerations: list[Toleration] = []
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for target in sorted(hinted, key=lambda t: t.name):
        hints = target.routing.kubernetes
        assert hints is not None
        _unite(selector, hints.node_selector, target.name, "node label")
        _unite(labels, hints.labels, target.name, "pod label")
        if hints.service_account_name:
            _unite(account, {"name": hints.service_account_name}, target.name, "service account")
        tolerations += [t for t in hints.tolerations if t not in tolerations]
        _largest(requests, hints.resources.requests)
        _largest(limits, hints.resources.limits)
    for name, request in requests.items():
        # Each target's own block is coherent, but one target's request can exceed another's
        # limit; Kubernetes would refuse the pod when the run starts, so refuse the plan now.
        if name in limits and parse_quantity(request) > parse_quantity(limits[name]):
            whose = ", ".join(t.name for t in hinted)
            raise SchedulingConflict(
                f"targets {whose} cannot share a Kubernetes pod: {name} request {request} is more "
                f"than the limit {limits[name]}"
            )

    config: dict[str, Any] = {}
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    if resources:
        config["container_config"] = {"resources": resources}
    pod_spec: dict[str, Any] = {}
    if selector:
        pod_spec["node_selector"] = {k: v for k, (v, _) in sorted(selector.items())}
    if tolerations:
        pod_spec["tolerations"] = [t.as_k8s() for t in tolerations]
    if account:
        pod_spec["service_account_name"] = account["name"][0]
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    if labels:
        config["pod_template_spec_metadata"] = {
            "labels": {k: v for k, (v, _) in sorted(labels.items())}
        }
    return config or None


def scheduling_tags_for(targets: Iterable[RuntimeTarget]) -> dict[str, str]:
    """`{"dagster-k8s/config": <JSON>}` for a run using `targets`, or `{}` without hints."""
    config = scheduling_config(targets)
    if config is None:
        return {}
    return {K8S_CONFIG_TAG: json.dumps(config, sort_keys=True, separators=(",", ":"))}


def scheduling_tags(
    definition: WorkflowDefinition,
    targets: TargetsConfig | None,
    execution_target: str,
    unhealthy: Iterable[str] = (),
) -> dict[str, str]:
    """The scheduling tag of a planned run: routed as planning routes it, then
    `scheduling_tags_for` the chosen targets. `{}` when the plane has no targets file."""
    if targets is None:
        return {}
    routed = route(definition, targets, execution_target, unhealthy=unhealthy)
    return scheduling_tags_for(routed.values())
