"""Runtime target health: probing targets, and where their health is kept (the event log).

Each target is an observable asset `runtime/<target name>`. The `runtime_health` sensor probes
every target through its runtime's adapter (`RuntimeAdapter.health`) and records an observation
(status, latency, queue depth, device) plus the result of the asset check `reachable`. Routing
reads the newest observation of each target: a target whose last probe failed is skipped while
a healthy one can serve. An observation older than `max_age_s` says nothing any more (the daemon
may have been down), so its target counts as healthy again rather than being shunned forever.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetObservation,
    AssetRecordsFilter,
    DagsterInstance,
    MetadataValue,
)
from pydantic import BaseModel, Field

from ergot_dagster.resources.runtime import HealthReport, RuntimeAdapter, adapter_class
from ergot_dagster.targets.config import TargetsConfig
from ergot_dagster.targets.model import RuntimeTarget

HEALTH_PREFIX = "runtime"
CHECK_NAME = "reachable"
RECORD_KEY = "health"
DEFAULT_PROBE_TIMEOUT_S = 10.0


def max_age_s() -> float:
    """Seconds after which a recorded probe no longer counts (`ERGOT_HEALTH_MAX_AGE_S`)."""
    return float(os.environ.get("ERGOT_HEALTH_MAX_AGE_S", "900"))


def health_key(target_name: str) -> AssetKey:
    return AssetKey([HEALTH_PREFIX, target_name])


class TargetHealth(BaseModel):
    """One probe of one target."""

    target: str
    runtime: str
    healthy: bool
    status: str = Field(description="up, down, or unknown (never probed / too old)")
    detail: str = ""
    latency_ms: float | None = None
    queue_depth: int | None = None
    device: str | None = None
    info: dict[str, Any] = Field(default_factory=dict)
    checked_at: datetime | None = None

    def age_s(self, now: datetime | None = None) -> float | None:
        if self.checked_at is None:
            return None
        return ((now or datetime.now(UTC)) - self.checked_at).total_seconds()

    def observation(self) -> AssetObservation:
        """The observation of `runtime/<target>` recording this probe."""
        metadata: dict[str, Any] = {
            "status": self.status,
            "healthy": MetadataValue.bool(self.healthy),
            "detail": self.detail,
            RECORD_KEY: MetadataValue.json(self.model_dump(mode="json")),
        }
        if self.latency_ms is not None:
            metadata["latency_ms"] = MetadataValue.float(round(self.latency_ms, 1))
        if self.queue_depth is not None:
            metadata["queue_depth"] = MetadataValue.int(self.queue_depth)
        if self.device:
            metadata["device"] = self.device
        return AssetObservation(asset_key=health_key(self.target), metadata=metadata)

    def check_evaluation(self) -> AssetCheckEvaluation:
        """The `reachable` check of `runtime/<target>`: failing while the target is down."""
        return AssetCheckEvaluation(
            asset_key=health_key(self.target),
            check_name=CHECK_NAME,
            passed=self.healthy,
            severity=AssetCheckSeverity.ERROR,
            description=f"{self.target} is {self.status}: {self.detail}".strip(": "),
            metadata={"latency_ms": MetadataValue.float(round(self.latency_ms or 0.0, 1))},
        )


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _device(info: dict[str, Any]) -> str | None:
    device = info.get("device")
    if isinstance(device, str) and device:
        return device
    devices = info.get("devices")
    if isinstance(devices, list) and devices:
        names = [str(d.get("name") or d.get("type")) for d in devices if isinstance(d, dict)]
        return ", ".join(n for n in names if n and n != "None") or None
    return None


def from_report(target: RuntimeTarget, report: HealthReport) -> TargetHealth:
    """A probe's `HealthReport` as the health record of `target`."""
    return TargetHealth(
        target=target.name,
        runtime=target.runtime,
        healthy=report.healthy,
        status="up" if report.healthy else "down",
        detail=report.detail,
        latency_ms=report.latency_ms,
        queue_depth=_int(report.info.get("queue_depth")),
        device=_device(report.info),
        info={k: v for k, v in report.info.items() if v is not None},
        checked_at=datetime.now(UTC),
    )


def probe(
    target: RuntimeTarget,
    adapters: dict[str, RuntimeAdapter] | None = None,
) -> TargetHealth:
    """Probe one target with its runtime's adapter; never raises (a failure is a down target)."""
    # Importing the built-in adapters registers their runtime types.
    from ergot_dagster.resources import adapters as _builtin  # noqa: F401

    started = time.monotonic()
    try:
        adapter = (adapters or {}).get(target.runtime) or adapter_class(target.runtime)()
        report = adapter.health(target)
    except Exception as exc:
        # The type alone: an adapter's message might quote an endpoint with credentials in it.
        report = HealthReport(
            healthy=False,
            detail=f"the probe failed ({type(exc).__name__})",
            latency_ms=(time.monotonic() - started) * 1000,
        )
    return from_report(target, report)


def probe_all(
    config: TargetsConfig,
    adapters: dict[str, RuntimeAdapter] | None = None,
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
) -> list[TargetHealth]:
    """Probe every target at once (probes wait on the network); a probe still going after
    `timeout_s` counts as down."""
    if not config.targets:
        return []
    pool = ThreadPoolExecutor(max_workers=min(8, len(config.targets)))
    try:
        futures = {pool.submit(probe, target, adapters): target for target in config.targets}
        wait(futures, timeout=timeout_s)
        results = []
        for future, target in futures.items():
            if future.done():
                results.append(future.result())
            else:
                results.append(
                    TargetHealth(
                        target=target.name,
                        runtime=target.runtime,
                        healthy=False,
                        status="down",
                        detail=f"no answer to the probe within {timeout_s:g} s",
                        checked_at=datetime.now(UTC),
                    )
                )
        return results
    finally:
        # A hung probe must not hold the sensor tick; its thread ends with its own timeout.
        pool.shutdown(wait=False, cancel_futures=True)


def last_health(instance: DagsterInstance, target: RuntimeTarget) -> TargetHealth:
    """The newest recorded probe of `target`, or an `unknown` record if there is none."""
    records = instance.fetch_observations(
        AssetRecordsFilter(asset_key=health_key(target.name)), limit=1
    ).records
    for record in records:
        observation = record.asset_observation
        entry = observation.metadata.get(RECORD_KEY) if observation else None
        if entry is not None:
            return TargetHealth.model_validate(getattr(entry, "value", entry))
    return TargetHealth(
        target=target.name,
        runtime=target.runtime,
        healthy=True,
        status="unknown",
        detail="never probed",
    )


def unhealthy_targets(
    instance: DagsterInstance, config: TargetsConfig, max_age: float | None = None
) -> set[str]:
    """Names of targets whose newest probe, recent enough to count, found them down."""
    limit = max_age_s() if max_age is None else max_age
    down = set()
    for target in config.targets:
        health = last_health(instance, target)
        age = health.age_s()
        if not health.healthy and age is not None and age <= limit:
            down.add(target.name)
    return down
