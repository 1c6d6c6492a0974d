"""Ingest: turning files under the ingest root into source records.

Shared by the ingest sensor and `ergot ingest`. A file is hashed and probed only when its size or
modification time differ from its last record; a file whose bytes did not change records nothing
new. A file that is not readable media, or whose ref is unsafe, is refused with the reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from ergot_dagster.errors import ErgotError
from ergot_dagster.media.hashing import sha256_file
from ergot_dagster.media.probe import media_type_for, probe
from ergot_dagster.refs import InvalidRefError, ref_to_partition_key, resolve_under_root
from ergot_dagster.sources.record import SourceRecord

Status = Literal["new", "changed", "unchanged", "refused"]


class IngestOutcome(BaseModel):
    """What ingesting one ref did."""

    ref: str
    status: Status
    record: SourceRecord | None = None
    error: str | None = None

    @property
    def recorded(self) -> bool:
        return self.status in ("new", "changed")


def scan_root(root: Path) -> Iterator[str]:
    """Every candidate ref under `root`, in sorted order, skipping hidden files and folders."""
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            try:
                yield path.relative_to(real_root).as_posix()
            except ValueError:  # pragma: no cover - os.walk stays under its root
                continue


def ingest_ref(
    root: Path,
    ref: str,
    previous: SourceRecord | None,
    *,
    uri_for: Callable[[Path], str] | None = None,
) -> IngestOutcome:
    """Hash and probe one file if it changed since `previous`; never raises for a bad file."""
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


def settled(root: Path, ref: str, settle_s: float, now: float | None = None) -> bool:
    """Whether the file has been still for `settle_s` seconds (so it is not being copied in)."""
    try:
        mtime = (root / ref).stat().st_mtime
    except OSError:
        return False
    return ((now or time.time()) - mtime) >= settle_s


def ingest_refs(
    root: Path,
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
