"""What ingest records about one source file, and where Dagster keeps it.

The record travels as the metadata of a materialization of `ergot/source` for the file's partition,
so the Dagster event log is the source catalogue: its history shows every version of every file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from dagster import (
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DataVersion,
    DynamicPartitionsDefinition,
    EventLogEntry,
    MetadataValue,
)
from pydantic import BaseModel

from ergot_dagster.media.probe import ProbeSummary

SOURCE_KEY = AssetKey(["ergot", "source"])
SOURCE_PARTITIONS_NAME = "source_assets"
source_partitions = DynamicPartitionsDefinition(name=SOURCE_PARTITIONS_NAME)
# Materializations per event log write: PostgreSQL's event storage inserts a batch in one statement.
RECORD_BATCH = 1000
# Sources whose last records one query reads, ahead of their files being hashed.
LOOKUP_CHUNK = 500


class SourceRecord(BaseModel):
    """One version of one ingested source file.

    Under an S3 ingest root, `root` is `s3://bucket/prefix`, `uri` the object's `s3://` uri,
    `mtime_ns` its LastModified (whole seconds) and `etag` its ETag; on disk `etag` is None.
    """

    ref: str
    partition_key: str
    root: str
    uri: str
    sha256: str
    size: int
    mtime_ns: int
    media_type: str
    probe: ProbeSummary
    etag: str | None = None

    def metadata(self) -> dict[str, Any]:
        """Materialization metadata: readable fields for the UI, plus the whole record."""
        return {
            "ref": self.ref,
            "uri": MetadataValue.url(self.uri) if self.uri.startswith("s3://") else self.uri,
            "sha256": self.sha256,
            "size": MetadataValue.int(self.size),
            "media_type": self.media_type,
            "duration_s": MetadataValue.float(self.probe.duration_s or 0.0),
            "streams": ", ".join(
                f"{s.type}:{s.codec}"
                + (f" {s.width}x{s.height}" if s.width else "")
                + (f" {s.sample_rate}Hz" if s.sample_rate else "")
                for s in self.probe.streams
            ),
            "record": MetadataValue.json(self.model_dump(mode="json")),
        }

    def materialization(self) -> AssetMaterialization:
        return AssetMaterialization(
            asset_key=SOURCE_KEY,
            partition=self.partition_key,
            metadata=self.metadata(),
            tags={
                "dagster/data_version": self.sha256,
                "dagster/data_version_is_user_provided": "true",
            },
        )

    @property
    def data_version(self) -> DataVersion:
        return DataVersion(self.sha256)


def latest_source_record(instance: DagsterInstance, partition_key: str) -> SourceRecord | None:
    """The newest record of the source with this partition key, or None if never ingested."""
    result = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=SOURCE_KEY, asset_partitions=[partition_key]), limit=1
    )
    if not result.records:
        return None
    materialization = result.records[0].asset_materialization
    if materialization is None or "record" not in materialization.metadata:
        return None
    return SourceRecord.model_validate(materialization.metadata["record"].value)


def latest_source_records(
    instance: DagsterInstance, partition_keys: Iterable[str]
) -> dict[str, SourceRecord]:
    """The newest record of each of these sources that has one, by partition key: what
    `latest_source_record` gives for each, in two queries per `LOOKUP_CHUNK` keys."""
    keys = list(dict.fromkeys(partition_keys))
    found: dict[str, SourceRecord] = {}
    for start in range(0, len(keys), LOOKUP_CHUNK):
        # Never an empty set: Dagster reads no partitions filter as all partitions.
        latest = instance.get_latest_storage_id_by_partition(
            SOURCE_KEY,
            DagsterEventType.ASSET_MATERIALIZATION,
            set(keys[start : start + LOOKUP_CHUNK]),
        )
        if not latest:
            continue
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=SOURCE_KEY, storage_ids=list(latest.values())),
            limit=len(latest),
        )
        for event in result.records:
            materialization = event.asset_materialization
            if materialization is None or materialization.partition is None:
                continue
            if "record" in materialization.metadata:
                found[materialization.partition] = SourceRecord.model_validate(
                    materialization.metadata["record"].value
                )
    return found


class SourceRecordLookup:
    """`latest_source_record` for the refs of one ingest, read a chunk of keys at a time.

    Given the partition keys in the order they will be asked for, a miss reads the records of
    that key and the `LOOKUP_CHUNK` - 1 after it in one go; a key it was not given, or asked for
    a second time (its record may have been written since), is read alone.
    """

    def __init__(self, instance: DagsterInstance, partition_keys: Iterable[str]) -> None:
        self._instance = instance
        self._keys = list(dict.fromkeys(partition_keys))
        self._position = {key: index for index, key in enumerate(self._keys)}
        self._read: set[str] = set()
        self._answered: set[str] = set()
        self._records: dict[str, SourceRecord] = {}

    def __call__(self, partition_key: str) -> SourceRecord | None:
        if partition_key in self._answered:
            return latest_source_record(self._instance, partition_key)
        self._answered.add(partition_key)
        if partition_key not in self._read:
            at = self._position.get(partition_key)
            if at is None:
                return latest_source_record(self._instance, partition_key)
            chunk = [k for k in self._keys[at : at + LOOKUP_CHUNK] if k not in self._read]
            self._records.update(latest_source_records(self._instance, chunk))
            self._read.update(chunk)
        return self._records.pop(partition_key, None)


def record_sources(instance: DagsterInstance, records: list[SourceRecord]) -> None:
    """Register partitions and record materializations for ingested files (outside any run).

    All the partitions first, then the materializations in batches: the same runless events as
    `instance.report_runless_asset_event`, handed to the event storage a batch at a time as
    Dagster's own batched event writes do (`DAGSTER_EVENT_BATCH_SIZE`), without turning that
    process-wide setting on. PostgreSQL writes a batch in one transaction; SQLite's storage has no
    batch write and stores them one by one, as before.
    """
    if not records:
        return
    instance.add_dynamic_partitions(SOURCE_PARTITIONS_NAME, [r.partition_key for r in records])
    for start in range(0, len(records), RECORD_BATCH):
        batch = [_runless_entry(r) for r in records[start : start + RECORD_BATCH]]
        instance.event_log_storage.store_event_batch(batch)


def _runless_entry(record: SourceRecord) -> EventLogEntry:
    """The event log entry `report_runless_asset_event` writes for the record's materialization."""
    from dagster._core.events import StepMaterializationData
    from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

    event = DagsterEvent(
        event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
        event_specific_data=StepMaterializationData(record.materialization()),
        job_name=RUNLESS_JOB_NAME,
    )
    return EventLogEntry(
        user_message="",
        level=logging.INFO,
        job_name=RUNLESS_JOB_NAME,
        run_id=RUNLESS_RUN_ID,
        error_info=None,
        timestamp=time.time(),
        step_key=None,
        dagster_event=event,
    )
