"""The ingest root: a local directory, or a prefix in S3-compatible object storage.

`ERGOT_INGEST_ROOT` is either. A source ref is the file's path relative to the root: on disk,
relative to the directory; in a bucket, the object key relative to the prefix
(`s3://media/ingest` + `cam/take 01.mov` = key `ingest/cam/take 01.mov`). Refs are validated the
same way for both (`refs.validate_source_ref`: no `..`, not absolute, no control characters), and
a key is only ever built by appending a valid ref to the prefix, so nothing outside it is reached.

On S3, an object's LastModified plays the part of the file's mtime (objects appear only whole, so
settling only waits out a writer that replaces an object repeatedly) and its ETag tells versions
of the same size and second apart. Hashing streams the object once; ffprobe reads the object
through a short-lived presigned URL, fetching only the parts it needs with HTTP range requests
(so a large file is never downloaded to be probed, whatever the position of its index), and a
HEAD afterwards makes sure the object probed is the version hashed.
"""

from __future__ import annotations

import json
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pydantic import BaseModel

from ergot_dagster.artifacts.s3_store import (
    ObjectStorageUnavailable,
    S3Location,
    download_verified,
    is_missing,
    is_precondition_failed,
    is_s3_location,
    last_modified_ns,
    s3_client,
    storage_errors,
    stream_object,
    translate,
)
from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError, SourceError, StoreError
from ergot_dagster.media.probe import PROBE_TIMEOUT_S, ProbeSummary, ffprobe_binary, summarize
from ergot_dagster.media.process import run_process
from ergot_dagster.refs import InvalidRefError, validate_source_ref
from ergot_dagster.sources.record import SourceRecord

# Long enough for ffprobe to read what it needs, short enough to be worthless soon after.
PROBE_URL_TTL_S = 600
# ffprobe's wait on any one network read or write, in microseconds.
PROBE_RW_TIMEOUT_US = 30_000_000
_SIGNATURE_PARAM = re.compile(r"X-Amz-[A-Za-z-]+=[^&\s]*")


class SourceEntry(BaseModel):
    """One file (or object) under the ingest root as a scan saw it."""

    ref: str
    size: int = 0
    mtime_ns: int = 0
    etag: str | None = None
    error: str | None = None

    @property
    def signature(self) -> list[int]:
        return [self.size, self.mtime_ns]

    def settled(self, settle_s: float, now: float | None = None) -> bool:
        """Whether it has been still for `settle_s` seconds (so it is not being written)."""
        if self.error is not None:
            return False
        return ((now or time.time()) - self.mtime_ns / 1e9) >= settle_s


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


def source_changed(record: SourceRecord) -> SourceError:
    """The error for a source whose bytes are no longer those recorded at ingest."""
    return SourceError(
        f"source {record.ref!r} has changed since it was ingested (sha256 {record.sha256[:12]}); "
        "ingest it again before processing it"
    )


class SourceRoot(ABC):
    """Where source refs point: what ingest scans and what a run reads its source from."""

    @property
    @abstractmethod
    def location(self) -> str:
        """The root as records keep it (`SourceRecord.root`)."""

    @abstractmethod
    def problem(self) -> str | None:
        """Why the root cannot be scanned now (missing, unreachable), or None."""

    @abstractmethod
    def scan(self) -> Iterator[SourceEntry]:
        """Every candidate file under the root, hidden ones left out."""


class LocalSourceRoot(SourceRoot):
    """An ingest root in a local (or mounted) directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()

    @property
    def location(self) -> str:
        return str(self.path)

    def problem(self) -> str | None:
        return None if self.path.is_dir() else f"the ingest root {self.path} does not exist"

    def scan(self) -> Iterator[SourceEntry]:
        for ref in scan_root(self.path):
            try:
                stat = (self.path / ref).stat()
            except OSError as exc:
                yield SourceEntry(ref=ref, error=str(exc))
                continue
            yield SourceEntry(ref=ref, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


class S3SourceRoot(SourceRoot):
    """An ingest root under a prefix of an S3-compatible bucket (see the module doc)."""

    def __init__(self, location: str | S3Location) -> None:
        self.s3 = location if isinstance(location, S3Location) else S3Location.parse(location)
        self._client = s3_client()

    @property
    def location(self) -> str:
        return self.s3.url

    def __repr__(self) -> str:
        return f"S3SourceRoot({self.s3.url!r})"

    def key(self, ref: str) -> str:
        """The object key of a source ref; `InvalidRefError` for a ref that is not acceptable."""
        return self.s3.key_prefix + validate_source_ref(ref)

    def uri(self, ref: str) -> str:
        return self.s3.uri(self.key(ref))

    def problem(self) -> str | None:
        try:
            self._client.list_objects_v2(
                Bucket=self.s3.bucket, Prefix=self.s3.key_prefix, MaxKeys=1
            )
        except storage_errors() as exc:
            return str(translate(exc, f"the ingest root {self.s3.url}"))
        return None

    def _entries(self, under: str) -> Iterator[SourceEntry]:
        """Objects whose ref starts with `under`, skipping folder markers and hidden names."""
        start = len(self.s3.key_prefix)
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.s3.bucket, Prefix=self.s3.key_prefix + under
            )
            for page in pages:
                for item in page.get("Contents") or []:
                    ref = str(item["Key"])[start:]
                    if not ref or ref.endswith("/"):
                        continue
                    if any(part.startswith(".") for part in ref.split("/")):
                        continue
                    yield SourceEntry(
                        ref=ref,
                        size=int(item["Size"]),
                        mtime_ns=last_modified_ns(item["LastModified"]),
                        etag=str(item.get("ETag", "")).strip('"') or None,
                    )
        except storage_errors() as exc:
            raise translate(exc, f"listing {self.s3.url}/{under}") from None

    def scan(self) -> Iterator[SourceEntry]:
        return self._entries("")

    def stat(self, ref: str) -> SourceEntry:
        """The object of `ref` now; `FileNotFoundError` if there is none."""
        key = self.key(ref)
        try:
            head = self._client.head_object(Bucket=self.s3.bucket, Key=key)
        except storage_errors() as exc:
            if is_missing(exc):
                raise FileNotFoundError(
                    f"source ref {ref!r} does not exist under {self.s3.url}"
                ) from None
            raise translate(exc, f"reading {self.s3.uri(key)}") from None
        return SourceEntry(
            ref=ref,
            size=int(head["ContentLength"]),
            mtime_ns=last_modified_ns(head["LastModified"]),
            etag=str(head.get("ETag", "")).strip('"') or None,
        )

    def sha256(self, entry: SourceEntry) -> tuple[str, int]:
        """Hash the object by streaming it, insisting on the version `entry` saw."""
        key = self.key(entry.ref)
        try:
            sha256, size, _ = stream_object(self._client, self.s3.bucket, key, if_match=entry.etag)
        except storage_errors() as exc:
            if is_precondition_failed(exc) or is_missing(exc):
                raise ObjectStorageUnavailable(
                    f"{entry.ref}: replaced while it was being read; it is read again later"
                ) from None
            raise translate(exc, f"reading {self.s3.uri(key)}") from None
        return sha256, size

    def probe(self, entry: SourceEntry) -> ProbeSummary:
        """ffprobe the object through a presigned URL; `SourceError` if it is not media."""
        key = self.key(entry.ref)
        name = PurePosixPath(entry.ref).name
        url = str(
            self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.s3.bucket, "Key": key},
                ExpiresIn=PROBE_URL_TTL_S,
            )
        )
        args = [
            ffprobe_binary(),
            "-v",
            "error",
            "-rw_timeout",
            str(PROBE_RW_TIMEOUT_US),
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
            "--",
            url,
        ]
        try:
            result = run_process(args, timeout_s=PROBE_TIMEOUT_S, tool="ffprobe")
        except RuntimeTimeoutError:
            raise ObjectStorageUnavailable(
                f"{name}: ffprobe did not finish reading it from object storage within "
                f"{PROBE_TIMEOUT_S:g} s"
            ) from None
        except PermanentRuntimeError as exc:
            message = self._scrub(str(exc), url, key)
            # An HTTP failure says nothing about the media; anything else is ffprobe's verdict.
            now = self.stat(entry.ref)
            if now.etag != entry.etag:
                raise ObjectStorageUnavailable(
                    f"{entry.ref}: replaced while it was being probed; it is read again later"
                ) from None
            if "Server returned" in message or "Connection" in message:
                raise ObjectStorageUnavailable(f"{name}: probing failed ({message})") from None
            raise SourceError(f"{name}: not readable media ({message})") from None
        if self.stat(entry.ref).etag != entry.etag:
            raise ObjectStorageUnavailable(
                f"{entry.ref}: replaced while it was being probed; it is read again later"
            )
        try:
            summary = summarize(json.loads(result.stdout or b"{}"))
        except json.JSONDecodeError as exc:
            raise SourceError(f"{name}: ffprobe returned unreadable output") from exc
        if not summary.streams:
            raise SourceError(f"{name}: ffprobe found no audio, video or image streams")
        return summary

    def _scrub(self, text: str, url: str, key: str) -> str:
        # ffprobe names its input in errors: never let a signed URL out.
        return _SIGNATURE_PARAM.sub("X-Amz-…", text.replace(url, self.s3.uri(key)))

    def expand(self, names: tuple[str, ...] | list[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """Refs for what `ergot ingest` was given: refs or folders relative to the prefix, or
        `s3://` uris under it. Returns (refs, [(name, why refused)])."""
        refs: list[str] = []
        errors: list[tuple[str, str]] = []
        for raw in names:
            try:
                name = self.s3.relative(raw) if is_s3_location(raw) else raw
                name = name.strip("/")
                if name in ("", "."):
                    refs += [e.ref for e in self.scan()]
                    continue
                validate_source_ref(name)
                try:
                    self.stat(name)
                    refs.append(name)
                    continue
                except FileNotFoundError:
                    pass
                under = [e.ref for e in self._entries(name + "/")]
                if not under:
                    raise SourceError(f"no object or folder {name!r} under {self.s3.url}")
                refs += under
            except StoreError as exc:
                message = str(exc)
                if is_s3_location(raw) and "is outside" in message:
                    message = f"{raw} is not inside the ingest root {self.s3.url}"
                errors.append((raw, message))
            except (InvalidRefError, SourceError) as exc:
                errors.append((raw, str(exc)))
        return list(dict.fromkeys(refs)), errors

    def fetch(self, record: SourceRecord, dest_dir: Path) -> Path:
        """Download the recorded source into `dest_dir`, checking it is the version ingested."""
        try:
            entry = self.stat(record.ref)
        except FileNotFoundError as exc:
            raise SourceError(f"source {record.ref!r}: {exc}") from None
        except InvalidRefError as exc:
            raise SourceError(f"source {record.ref!r}: {exc}") from None
        if entry.size != record.size:
            raise source_changed(record)
        dest = dest_dir / "sources" / record.sha256[:16] / PurePosixPath(record.ref).name
        if dest.is_file():
            return dest

        def check(sha256: str, _size: int) -> None:
            if sha256 != record.sha256:
                raise source_changed(record)

        try:
            return download_verified(
                self._client,
                self.s3.bucket,
                self.key(record.ref),
                dest,
                check=check,
                if_match=entry.etag,
            )
        except storage_errors() as exc:
            if is_precondition_failed(exc) or is_missing(exc):
                raise source_changed(record) from None
            raise translate(exc, f"fetching source {record.ref!r}") from None


def open_source_root(location: str | Path) -> SourceRoot:
    """The ingest root at `location`: `s3://bucket/prefix` or a local directory."""
    if isinstance(location, str) and is_s3_location(location):
        return S3SourceRoot(location)
    return LocalSourceRoot(Path(location))
