"""`ergot/library`: artifacts promoted to reusable, named references, one partition per entry.

The partition key is `<library>/<name>` (e.g. `voices/narrator-01`); a request names the entry
as `library:voices/narrator-01`. Materializing a partition is the promotion: it is given the
artifact ref as config, writes the entry create-only into the artifact store (the store decides
which promotion of a name wins, so two racing promotions cannot both succeed), and records the
entry as the materialization's metadata, which is where consumers list libraries from.

Promotion runs as an ordinary Dagster run (from the UI's launchpad, `ergot promote` or the
client), so the event log says who promoted what, when.
"""

from datetime import UTC, datetime

from dagster import (
    AssetExecutionContext,
    AssetKey,
    Config,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from ergot_dagster.artifacts.library import LibraryEntry, entry_for
from ergot_dagster.errors import StoreError
from ergot_dagster.refs import InvalidRefError, library_ref, parse_artifact_ref
from ergot_dagster.resources.artifact_store import ArtifactStoreResource

LIBRARY_KEY = AssetKey(["ergot", "library"])
LIBRARY_PARTITIONS_NAME = "library_entries"
ENTRY_METADATA_KEY = "entry"
LIBRARY_OP = "ergot__library"  # the op of LIBRARY_KEY, which run config is keyed by
library_partitions = DynamicPartitionsDefinition(name=LIBRARY_PARTITIONS_NAME)


class PromotionConfig(Config):
    """What to promote under the run's partition (the entry name)."""

    artifact: str = Field(description="the artifact ref to promote, artifact:<run id>/<name>")
    note: str = Field(default="", max_length=2000, description="why, for whoever reuses it")


def entry_metadata(entry: LibraryEntry) -> dict[str, MetadataValue]:
    """The materialization metadata of a promotion: the whole entry, plus its fields to scan."""
    return {
        ENTRY_METADATA_KEY: MetadataValue.json(entry.model_dump(mode="json")),
        "ref": MetadataValue.text(entry.ref),
        "artifact": MetadataValue.text(entry.artifact),
        "sha256": MetadataValue.text(entry.sha256),
        "media_type": MetadataValue.text(entry.media_type),
        "workflow": MetadataValue.text(entry.workflow),
    }


def _refuse(message: str) -> Failure:
    return Failure(description=message, allow_retries=False, metadata={"retryable": False})


@asset(
    key=LIBRARY_KEY,
    partitions_def=library_partitions,
    group_name="ergot",
    description="Promoted artifacts: reusable, immutable references (a voice, a face, a look) "
    "that requests name as inputs, `library:<library>/<name>`. The partition key is "
    "`<library>/<name>`; materializing one promotes the artifact given in its config.",
    kinds={"ergot"},
)
def ergot_library(
    context: AssetExecutionContext, config: PromotionConfig, artifact_store: ArtifactStoreResource
) -> MaterializeResult:
    try:
        ref = library_ref(*context.partition_key.split("/", 1))
        parse_artifact_ref(config.artifact)
    except (InvalidRefError, TypeError) as exc:
        raise _refuse(f"cannot promote: {exc}") from None
    store = artifact_store.get_store()
    try:
        manifest = store.get_manifest(config.artifact)
    except StoreError as exc:
        raise _refuse(f"cannot promote {config.artifact} as {ref}: {exc}") from None
    entry = entry_for(
        ref,
        manifest,
        promoted_at=datetime.now(UTC),
        note=config.note,
        promotion_run_id=context.run_id,
    )
    try:
        stored = store.put_library_entry(entry)
    except StoreError as exc:
        raise _refuse(str(exc)) from None
    if stored is not entry:
        context.log.info(f"{ref} already names {stored.artifact}; nothing changed")
    else:
        context.log.info(f"promoted {manifest.ref} ({manifest.media_type}) as {ref}")
    return MaterializeResult(metadata=entry_metadata(stored))
