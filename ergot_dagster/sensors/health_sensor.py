"""The runtime health sensor: probes every runtime target and records what it found.

Each tick probes all targets at once (bounded by `ERGOT_HEALTH_PROBE_TIMEOUT_S`) through their
adapters' health probes and records, as asset events of `runtime/<target>`, an observation
(status, latency, queue depth, device) and the `reachable` check result. To keep the event log
small, a target's health is recorded when its status changes and otherwise at most every
`ERGOT_HEALTH_RECORD_EVERY_S`; routing reads these records (`targets.health`).
"""

from __future__ import annotations

import json
import os
import time

from dagster import (
    DefaultSensorStatus,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ergot_dagster.resources.targets import RuntimeTargetsResource
from ergot_dagster.targets.health import probe_all

INTERVAL_S = int(os.environ.get("ERGOT_HEALTH_INTERVAL_S", "30"))


def _record_every_s() -> float:
    return float(os.environ.get("ERGOT_HEALTH_RECORD_EVERY_S", "300"))


def _probe_timeout_s() -> float:
    return float(os.environ.get("ERGOT_HEALTH_PROBE_TIMEOUT_S", "10"))


def _cursor(raw: str | None) -> dict[str, list]:
    """Per target: [last recorded status, when it was recorded (epoch seconds)]."""
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@sensor(
    name="runtime_health",
    minimum_interval_seconds=INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Probes every runtime target and records its health as observations and the "
    "`reachable` check of runtime/<target>; routing skips targets found down.",
)
def runtime_health(
    context: SensorEvaluationContext, runtime_targets: RuntimeTargetsResource
) -> SensorResult | SkipReason:
    config = runtime_targets.get()
    if not config.targets:
        return SkipReason("no runtime targets are configured")
    seen = _cursor(context.cursor)
    now = time.time()
    events = []
    for health in probe_all(config, timeout_s=_probe_timeout_s()):
        last_status, last_time = (seen.get(health.target) or [None, 0.0])[:2]
        changed = health.status != last_status
        if changed or now - float(last_time or 0.0) >= _record_every_s():
            events += [health.observation(), health.check_evaluation()]
            seen[health.target] = [health.status, now]
        if changed:
            context.log.info(f"runtime target {health.target} is {health.status}: {health.detail}")
    for name in list(seen):
        if config.get(name) is None:
            del seen[name]
    return SensorResult(asset_events=events, cursor=json.dumps(seen, sort_keys=True))
