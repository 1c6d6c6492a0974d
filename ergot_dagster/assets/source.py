"""`ergot/source`: the Ergot-managed source media, one partition per source ref.

Ingest (the ingest sensor or `ergot ingest`) records a materialization per new or changed file.
Materializing a partition from the UI re-reads that file and records it again, which is how an
operator refreshes one source by hand.
"""

from dagster import AssetExecutionContext, Failure, MaterializeResult, asset

from ergot_dagster.errors import StoreError
from ergot_dagster.refs import InvalidRefError, partition_key_to_ref
from ergot_dagster.resources.source_root import SourceRootResource
from ergot_dagster.sources.ingest import ingest_ref
from ergot_dagster.sources.record import SOURCE_KEY, latest_source_record, source_partitions


@asset(
    key=SOURCE_KEY,
    partitions_def=source_partitions,
    group_name="ergot",
    description="Ergot-managed source media. The partition key is the source ref: the file's "
    "path relative to the ingest root. Each materialization records sha256, size, media type "
    "and an ffprobe summary.",
    kinds={"file"},
)
def ergot_source(context: AssetExecutionContext, sources: SourceRootResource) -> MaterializeResult:
    try:
        ref = partition_key_to_ref(context.partition_key)
    except InvalidRefError as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc
    previous = latest_source_record(context.instance, context.partition_key)
    # Re-read even if unchanged: an explicit materialization is a request to look again.
    try:
        root = sources.open()
    except StoreError as exc:
        raise Failure(description=f"ERGOT_INGEST_ROOT: {exc}", allow_retries=False) from exc
    outcome = ingest_ref(root, ref, None)
    if outcome.record is None:
        raise Failure(description=f"cannot ingest {ref!r}: {outcome.error}", allow_retries=False)
    if previous and previous.sha256 != outcome.record.sha256:
        context.log.info(f"{ref}: content changed since the last record ({previous.sha256[:12]})")
    return MaterializeResult(
        metadata=outcome.record.metadata(), data_version=outcome.record.data_version
    )
