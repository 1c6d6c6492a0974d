"""Ingest: turning files under the ingest root into source records.

Shared by the ingest sensor and `ergot ingest`. A file is hashed and probed only when its size or
modification time differ from its last record; a file whose bytes did not change records nothing
new. A file that is not readable media, or whose ref is unsafe, is refused with the reason.

`ingest_refs` works on a list of refs as a pipeline: ffprobe of one file runs in a thread while
the next file is looked up and hashed, and the records go to the instance in batches from a
second thread as they come, so that a folder costs about what its hashing and probing cost.

The root is a local directory or an S3 prefix (`sources.root`); for an object, its ETag joins size
and LastModified in the cheap "unchanged" test.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
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

# Files hashed and waiting for ffprobe at most: enough to keep ffprobe busy while the next file is
# looked up and hashed, few enough that a file is probed soon after it is hashed.
PROBE_AHEAD = 2
# New records go to the instance once this many are waiting and the previous write is done (more
# gather while it is not): a write per batch instead of per file, and a short last write.
MIN_RECORD_BATCH = 16


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
    step = _begin(root, ref, previous, uri_for=uri_for)
    return step if isinstance(step, IngestOutcome) else step()


# What is left of ingesting a file once it is hashed: its probe, which gives the outcome.
_Probe = Callable[[], IngestOutcome]


def _begin(
    root: Path | SourceRoot,
    ref: str,
    previous: SourceRecord | None,
    *,
    uri_for: Callable[[Path], str] | None = None,
) -> IngestOutcome | _Probe:
    """Look at and hash one file: its outcome if that settles it (unchanged, refused), else
    the probe that finishes it."""
    if isinstance(root, S3SourceRoot):
        return _begin_object(root, ref, previous)
    if isinstance(root, LocalSourceRoot):
        root = root.path
    elif not isinstance(root, Path):
        raise TypeError(f"cannot ingest from {root!r}")
    local_root = root
    try:
        path = resolve_under_root(local_root, ref)
        if not path.is_file():
            raise InvalidRefError(f"source ref {ref!r} is not a regular file")
        stat = path.stat()
        if previous and previous.size == stat.st_size and previous.mtime_ns == stat.st_mtime_ns:
            return IngestOutcome(ref=ref, status="unchanged", record=previous)
        sha256, size = sha256_file(path)
        if previous and previous.sha256 == sha256:
            return IngestOutcome(ref=ref, status="unchanged", record=previous)
    except (ErgotError, InvalidRefError, OSError) as exc:
        return IngestOutcome(ref=ref, status="refused", error=str(exc))

    def finish() -> IngestOutcome:
        try:
            summary = probe(path)
            record = SourceRecord(
                ref=ref,
                partition_key=ref_to_partition_key(ref),
                root=str(local_root.resolve()),
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

    return finish


def _refused_object(ref: str, exc: Exception) -> IngestOutcome:
    retry = isinstance(exc, RuntimeFailure) and exc.transient
    return IngestOutcome(ref=ref, status="refused", error=str(exc), retry=retry)


def _begin_object(
    root: S3SourceRoot, ref: str, previous: SourceRecord | None
) -> IngestOutcome | _Probe:
    """`_begin` for an object under an S3 prefix."""
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
    except (ErgotError, InvalidRefError, OSError) as exc:
        return _refused_object(ref, exc)

    def finish() -> IngestOutcome:
        try:
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
            return _refused_object(ref, exc)
        return IngestOutcome(ref=ref, status="changed" if previous else "new", record=record)

    return finish


def settled(root: Path, ref: str, settle_s: float, now: float | None = None) -> bool:
    """Whether the file has been still for `settle_s` seconds (so it is not being copied in)."""
    try:
        mtime = (root / ref).stat().st_mtime
    except OSError:
        return False
    return ((now or time.time()) - mtime) >= settle_s


class _Recorder:
    """Hands new and changed records to `record` in batches, from a thread of its own, so that
    the instance's writes overlap the hashing and probing of the files after them."""

    def __init__(self, record: Callable[[list[SourceRecord]], None] | None) -> None:
        self._record = record
        self._pending: list[SourceRecord] = []
        self._writes: list[Future[None]] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ergot-record") if record else None

    def add(self, outcome: IngestOutcome) -> None:
        if self._pool is None or not outcome.recorded or outcome.record is None:
            return
        self._pending.append(outcome.record)
        last = self._writes[-1] if self._writes else None
        if last is not None and last.done():
            last.result()  # a failed write stops the ingest here rather than at the end
        if len(self._pending) >= MIN_RECORD_BATCH and (last is None or last.done()):
            self._flush()

    def _flush(self) -> None:
        if self._pool is not None and self._record is not None and self._pending:
            self._writes.append(self._pool.submit(self._record, self._pending))
            self._pending = []

    def finish(self) -> None:
        """Write what is left and wait for every write; raises the first write's failure."""
        self._flush()
        for write in self._writes:
            write.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def ingest_refs(
    root: Path | SourceRoot,
    refs: Iterable[str],
    lookup: Callable[[str], SourceRecord | None],
    *,
    record: Callable[[list[SourceRecord]], None] | None = None,
) -> list[IngestOutcome]:
    """Ingest each ref, looking up its previous record by partition key through `lookup`.

    With `record`, the new and changed records are passed to it in batches, in the order of
    `refs`, and all of them have been passed (and `record` has returned) when this returns; an
    exception from `record` stops the ingest and is raised here. Outcomes come in the order of
    `refs`.
    """
    outcomes: list[IngestOutcome | Future[IngestOutcome]] = []
    probing: deque[Future[IngestOutcome]] = deque()
    recorder = _Recorder(record)
    # One ffprobe at a time, as the bare tools run it: the gain is in doing the rest meanwhile.
    prober = ThreadPoolExecutor(1, thread_name_prefix="ergot-probe")
    try:
        for ref in refs:
            try:
                previous = lookup(ref_to_partition_key(ref))
            except InvalidRefError as exc:
                outcomes.append(IngestOutcome(ref=ref, status="refused", error=str(exc)))
                continue
            step = _begin(root, ref, previous)
            if isinstance(step, IngestOutcome):
                outcomes.append(step)
            else:
                future = prober.submit(step)
                outcomes.append(future)
                probing.append(future)
            while probing and (probing[0].done() or len(probing) > PROBE_AHEAD):
                recorder.add(probing.popleft().result())
        while probing:
            recorder.add(probing.popleft().result())
        recorder.finish()
    finally:
        prober.shutdown(wait=True, cancel_futures=True)
        recorder.close()
    return [o if isinstance(o, IngestOutcome) else o.result() for o in outcomes]
