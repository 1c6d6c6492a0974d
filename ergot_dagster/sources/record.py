"""What ingest records about one source file, and where Dagster keeps it.

The record travels as the metadata of a materialization of `ergot/source` for the file's partition,
so the Dagster event log is the source catalogue: its history shows every version of every file.
"""

from __future__ import annotations

from typing import Any

from dagster import (
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterInstance,
    DataVersion,
    DynamicPartitionsDefinition,
    MetadataValue,
)
from pydantic import BaseModel

from ergot_dagster.media.probe import ProbeSummary

SOURCE_KEY = AssetKey(["ergot", "source"])
SOURCE_PARTITIONS_NAME = "source_assets"
source_partitions = DynamicPartitionsDefinition(name=SOURCE_PARTITIONS_NAME)


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


def record_sources(instance: DagsterInstance, records: list[SourceRecord]) -> None:
    """Register partitions and record materializations for ingested files (outside any run)."""
    if not records:
        return
    instance.add_dynamic_partitions(SOURCE_PARTITIONS_NAME, [r.partition_key for r in records])
    for record in records:
        instance.report_runless_asset_event(record.materialization())
