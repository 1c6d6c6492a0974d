"""The ingest sensor: watches the ingest root and records new or changed source files.

Each tick walks the root, skips files still being written (modified within the settle time) and
hidden files, and ingests the rest: new files become partitions of `ergot/source` with a
materialization; changed files get a new materialization; unchanged files record nothing. Work per
tick is bounded so that a large first ingest spreads over several ticks instead of timing out.
Files that cannot be ingested are reported once per version, not on every tick.

The root may be an S3 prefix (`ERGOT_INGEST_ROOT=s3://bucket/prefix`): a tick then lists the
objects (page by page), settles them by LastModified and hashes each by streaming it. A refusal
that says nothing about the file (storage unreachable, an object replaced while read) is not
remembered, so the next tick tries again.
"""

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
from pydantic import BaseModel, Field

from ergot_dagster.errors import StoreError
from ergot_dagster.refs import InvalidRefError, ref_to_partition_key
from ergot_dagster.resources.source_root import SourceRootResource
from ergot_dagster.sources.ingest import ingest_ref
from ergot_dagster.sources.record import latest_source_record, source_partitions

INTERVAL_S = int(os.environ.get("ERGOT_INGEST_INTERVAL_S", "30"))
MAX_REMEMBERED = 10_000


def _settle_s() -> float:
    """Seconds a file must be unmodified before it is ingested (it may still be copying in)."""
    return float(os.environ.get("ERGOT_INGEST_SETTLE_S", "2"))


def _tick_budget_s() -> float:
    """Seconds of hashing per tick; the daemon gives a sensor tick about a minute."""
    return float(os.environ.get("ERGOT_INGEST_TICK_BUDGET_S", "40"))


class IngestCursor(BaseModel):
    """Files the sensor has already looked at and need not hash again until they change.

    `touched`: content unchanged but size/mtime differ from the record (e.g. `touch`ed).
    `refused`: could not be ingested; retried only when the file changes.
    Values are [size, mtime_ns].
    """

    touched: dict[str, list[int]] = Field(default_factory=dict)
    refused: dict[str, list[int]] = Field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str | None) -> "IngestCursor":
        if not raw:
            return cls()
        try:
            return cls.model_validate_json(raw)
        except ValueError:
            return cls()

    def dump(self) -> str:
        # Bound the cursor; forgetting an entry only costs one more hash of that file.
        for table in (self.touched, self.refused):
            while len(table) > MAX_REMEMBERED:
                table.pop(next(iter(table)))
        return json.dumps(self.model_dump(), separators=(",", ":"), ensure_ascii=False)


@sensor(
    name="ingest_sensor",
    minimum_interval_seconds=INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches ERGOT_INGEST_ROOT and records new or changed media as partitions and "
    "materializations of ergot/source.",
)
def ingest_sensor(
    context: SensorEvaluationContext, sources: SourceRootResource
) -> SensorResult | SkipReason:
    try:
        root = sources.open()
    except StoreError as exc:
        return SkipReason(f"ERGOT_INGEST_ROOT: {exc}")
    problem = root.problem()
    if problem:
        return SkipReason(problem)
    cursor = IngestCursor.parse(context.cursor)
    deadline = time.monotonic() + _tick_budget_s()
    settle_s = _settle_s()
    now = time.time()
    records = []
    refused = 0
    finished = True
    try:
        for entry in root.scan():
            if time.monotonic() > deadline:
                finished = False
                break
            ref = entry.ref
            if not entry.settled(settle_s, now):
                continue
            try:
                key = ref_to_partition_key(ref)
            except InvalidRefError as exc:
                if ref not in cursor.refused:
                    context.log.warning(f"not ingesting {ref!r}: {exc}")
                    cursor.refused[ref] = [0, 0]
                continue
            signature = entry.signature
            if cursor.touched.get(ref) == signature or cursor.refused.get(ref) == signature:
                continue
            outcome = ingest_ref(root, ref, latest_source_record(context.instance, key))
            cursor.refused.pop(ref, None)
            cursor.touched.pop(ref, None)
            if outcome.status == "refused":
                refused += 1
                if not outcome.retry:
                    cursor.refused[ref] = signature
                context.log.warning(f"not ingesting {ref!r}: {outcome.error}")
            elif outcome.recorded and outcome.record is not None:
                records.append(outcome.record)
                context.log.info(f"{outcome.status}: {ref} sha256 {outcome.record.sha256}")
            elif outcome.record is not None and outcome.record.mtime_ns != entry.mtime_ns:
                cursor.touched[ref] = signature
    except StoreError as exc:
        # The listing broke off (object storage went away): keep what this tick recorded.
        finished = False
        context.log.warning(f"scanning {root.location} stopped: {exc}")
    if not finished:
        context.log.info(f"ingested {len(records)} file(s); the rest continues next tick")
    if not records:
        return SensorResult(
            cursor=cursor.dump(),
            skip_reason=SkipReason(
                f"nothing new under {root.location}" + (f" ({refused} refused)" if refused else "")
            ),
        )
    return SensorResult(
        dynamic_partitions_requests=[
            source_partitions.build_add_request([r.partition_key for r in records])
        ],
        asset_events=[r.materialization() for r in records],
        cursor=cursor.dump(),
    )
