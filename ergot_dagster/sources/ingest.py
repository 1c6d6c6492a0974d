"""Ingest: turning files under the ingest root into source records.

Shared by the ingest sensor and `ergot ingest`. A file is hashed and probed only when its size or
modification time differ from its last record; a file whose bytes did not change records nothing
new. A file that is not readable media, or whose ref is unsafe, is refused with the reason.

The root is a local directory or an S3 prefix (`sources.root`); for an object, its ETag joins size
and LastModified in the cheap "unchanged" test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from ergot_dagster.errors import ErgotError, RuntimeFailure
from ergot_dagster.media.hashing import sha256_file
from ergot_dagster.media.probe import media_type_for, probe
from ergot_dagster.refs import InvalidRefError, ref_to_partition_key, resolve_under_root
from ergot_dagster.sources.record import SourceRecord
from ergot_dagster.sources.root import LocalSourceRoot, S3SourceRoot, SourceRoot, scan_root

__all__ = ["IngestOutcome", "ingest_ref", "ingest_refs", "scan_root", "settled"]

Status = Literal["new", "changed", "unchanged", "refused"]


class IngestOutcome(BaseModel):
    """What ingesting one ref did."""

    ref: str
    status: Status
    record: SourceRecord | None = None
    error: str | None = None
    retry: bool = False  # refused for now only (storage unreachable, object being replaced)

    @property
    def recorded(self) -> bool:
        return self.status in ("new", "changed")


def ingest_ref(
    root: Path | SourceRoot,
    ref: str,
    previous: SourceRecord | None,
    *,
    uri_for: Callable[[Path], str] | None = None,
) -> IngestOutcome:
    """Hash and probe one file if it changed since `previous`; never raises for a bad file."""
    if isinstance(root, S3SourceRoot):
        return _ingest_object(root, ref, previous)
    if isinstance(root, LocalSourceRoot):
        root = root.path
    elif not isinstance(root, Path):
        raise TypeError(f"cannot ingest from {root!r}")
    try:
        path = resolve_under_root(root, ref)
        if not path.is_file():
            raise InvalidRefError(f"source ref {ref!r} is not a regular file")
        stat = path.stat()
        if previous and previous.size == stat.st_size and previous.mtime_ns == stat.st_mtime_ns:
            return IngestOutcome(ref=ref, status="unchanged", record=previous)
        sha256, size = sha256_file(path)
        if previous and previous.sha256 == sha256:
            return IngestOutcome(ref=ref, status="unchanged", record=previous)
        summary = probe(path)
        record = SourceRecord(
            ref=ref,
            partition_key=ref_to_partition_key(ref),
            root=str(root.resolve()),
            uri=uri_for(path) if uri_for else path.as_uri(),
            sha256=sha256,
            size=size,
            mtime_ns=stat.st_mtime_ns,
            media_type=media_type_for(path, summary),
            probe=summary,
        )
    except (ErgotError, InvalidRefError, OSError) as exc:
        return IngestOutcome(ref=ref, status="refused", error=str(exc))
    return IngestOutcome(ref=ref, status="changed" if previous else "new", record=record)


def _ingest_object(root: S3SourceRoot, ref: str, previous: SourceRecord | None) -> IngestOutcome:
    """`ingest_ref` for an object under an S3 prefix."""
    try:
        entry = root.stat(ref)
        if (
            previous
            and previous.size == entry.size
            and previous.mtime_ns == entry.mtime_ns
            and previous.etag == entry.etag
        ):
            return IngestOutcome(ref=ref, status="unchanged", record=previous)
        sha256, size = root.sha256(entry)
        if previous and previous.sha256 == sha256:
            return IngestOutcome(ref=ref, status="unchanged", record=previous)
        summary = root.probe(entry)
        record = SourceRecord(
            ref=ref,
            partition_key=ref_to_partition_key(ref),
            root=root.location,
            uri=root.uri(ref),
            sha256=sha256,
            size=size,
            mtime_ns=entry.mtime_ns,
            media_type=media_type_for(Path(ref), summary),
            probe=summary,
            etag=entry.etag,
        )
    except (ErgotError, InvalidRefError, OSError) as exc:
        retry = isinstance(exc, RuntimeFailure) and exc.transient
        return IngestOutcome(ref=ref, status="refused", error=str(exc), retry=retry)
    return IngestOutcome(ref=ref, status="changed" if previous else "new", record=record)


def settled(root: Path, ref: str, settle_s: float, now: float | None = None) -> bool:
    """Whether the file has been still for `settle_s` seconds (so it is not being copied in)."""
    try:
        mtime = (root / ref).stat().st_mtime
    except OSError:
        return False
    return ((now or time.time()) - mtime) >= settle_s


def ingest_refs(
    root: Path | SourceRoot,
    refs: Iterable[str],
    lookup: Callable[[str], SourceRecord | None],
) -> list[IngestOutcome]:
    """Ingest each ref, looking up its previous record by partition key through `lookup`."""
    outcomes = []
    for ref in refs:
        try:
            previous = lookup(ref_to_partition_key(ref))
        except InvalidRefError as exc:
            outcomes.append(IngestOutcome(ref=ref, status="refused", error=str(exc)))
            continue
        outcomes.append(ingest_ref(root, ref, previous))
    return outcomes
