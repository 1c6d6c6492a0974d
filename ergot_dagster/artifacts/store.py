"""The artifact store: immutable, content-addressed bytes plus one manifest per artifact.

Layout under the store root:

    blobs/sha256/<first two hex digits>/<sha256><extension>   the bytes, read-only
    manifests/<run id>/<artifact name>.json                   one manifest per artifact
    tmp/                                                      staging, same filesystem as blobs

Bytes are written to `tmp/`, flushed, and linked into place; a link never replaces an existing file,
so nothing is ever overwritten and nothing half-written is ever visible under `blobs/` or
`manifests/`. A manifest is written only after its bytes are in place.

`open_store` also opens the same layout in S3-compatible object storage (`s3://bucket/prefix`,
`ergot_dagster.artifacts.s3_store`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from pydantic import BaseModel

from ergot_dagster.artifacts.library import LibraryEntry, entry_relative_path
from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.errors import StoreError
from ergot_dagster.media.hashing import CHUNK
from ergot_dagster.refs import InvalidRefError, parse_artifact_ref, parse_library_ref
from ergot_dagster.settings import ErgotSettings

_EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "application/json": ".json",
    "application/x-npy": ".npy",
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "audio/wav": ".wav",
    "audio/mpeg": ".mp3",
    "audio/flac": ".flac",
    "audio/mp4": ".m4a",
    "text/plain": ".txt",
    "text/vtt": ".vtt",
    "application/x-subrip": ".srt",
    "model/x-ply": ".ply",
    "application/zip": ".zip",
}


class StoredBlob(BaseModel):
    """Where a blob landed and what it is."""

    sha256: str
    size: int
    uri: str


def extension_for(media_type: str) -> str:
    return _EXTENSIONS.get(media_type, "")


def blob_relative_path(sha256: str, media_type: str) -> str:
    """Where a blob lives under a store's root or prefix: `blobs/sha256/<xx>/<sha256><ext>`."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}{extension_for(media_type)}"


def safe_label(label: str) -> str:
    """`label` reduced to characters that are safe in a directory name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:80]


def default_local_root() -> Path:
    """Where a store without a local root of its own keeps scratch and fetched files."""
    return ErgotSettings.from_env().home / "tmp"


class ArtifactStore(ABC):
    """What every artifact store offers, whether a local directory or object storage.

    Files fetched to this machine while a step works (`fetch_dir`: blobs from object storage,
    source files from an S3 ingest root) live in a private directory of the store object, removed
    by `close` or when the object is dropped. Each step gets its own store from the resource and
    drops it when its code returns (stores hold no reference cycles, so that happens at once).
    """

    _fetched: Path | None = None
    _finalizer: weakref.finalize | None = None

    @abstractmethod
    def put_blob(self, path: Path, media_type: str) -> StoredBlob:
        """Store the file at `path` by content and return where it is. Idempotent."""

    @abstractmethod
    def put_manifest(self, manifest: ArtifactManifest) -> None:
        """Record `manifest`. Refuses to replace an existing manifest with different content."""

    @abstractmethod
    def get_manifest(self, ref: str) -> ArtifactManifest:
        """The manifest of artifact `ref`; `StoreError` if there is none."""

    @abstractmethod
    def manifest_uri(self, ref: str) -> str:
        """Where the manifest of `ref` is (or will be) stored."""

    @abstractmethod
    def list_run(self, run_id: str) -> list[ArtifactManifest]:
        """Every manifest written by run `run_id`, by artifact name."""

    @abstractmethod
    def local_path(self, uri: str) -> Path:
        """A local path holding the bytes at `uri` (fetched first if the store is remote)."""

    @abstractmethod
    @contextlib.contextmanager
    def scratch_dir(self, label: str) -> Iterator[Path]:
        """A private directory for a runtime's outputs, removed afterwards whatever happens."""

    @abstractmethod
    def _local_scratch_root(self) -> Path:
        """The local directory that scratch and fetched files go under."""

    # -- small records written once (library entries) -------------------------------------

    @abstractmethod
    def _create_record(self, relative: str, body: bytes) -> bytes | None:
        """Write `body` at `relative` unless something is there: None if written, else what is."""

    @abstractmethod
    def _read_record(self, relative: str) -> bytes | None:
        """The record at `relative`, or None."""

    @abstractmethod
    def _list_records(self, folder: str) -> list[bytes]:
        """Every record directly under `folder` (relative), in name order."""

    def put_library_entry(self, entry: LibraryEntry) -> LibraryEntry:
        """Record `entry` unless its name is taken; the entry that holds the name is returned.

        A name already promoted with the same artifact returns the stored entry (a repeat); one
        promoted with another artifact raises `StoreError`: entries are immutable.
        """
        relative = entry_relative_path(entry.ref)
        existing = self._create_record(relative, entry.model_dump_json(indent=2).encode())
        if existing is None:
            return entry
        stored = LibraryEntry.model_validate_json(existing)
        if not stored.same_promotion(entry):
            raise StoreError(
                f"{entry.ref} already names {stored.artifact} (sha256 {stored.sha256[:12]}); "
                "library entries are immutable, promote under another name"
            )
        return stored

    def get_library_entry(self, ref: str) -> LibraryEntry | None:
        """The entry `ref` names, or None if nothing was promoted under it."""
        try:
            relative = entry_relative_path(ref)
        except InvalidRefError as exc:
            raise StoreError(str(exc)) from exc
        body = self._read_record(relative)
        return None if body is None else LibraryEntry.model_validate_json(body)

    def list_library(self, library: str) -> list[LibraryEntry]:
        """Every entry of `library`, by name."""
        parse_library_ref(f"library:{library}/x")  # refuses a malformed library name
        return [
            LibraryEntry.model_validate_json(body)
            for body in self._list_records(f"library/{library}")
        ]

    def presigned_url(self, uri: str, expires_s: int = 3600) -> str:
        """A URL anyone holding it can GET the bytes at `uri` from, for `expires_s` seconds."""
        raise StoreError(
            f"{uri!r}: only object storage (s3://) gives presigned URLs; this store's files are "
            "read where they lie"
        )

    def fetch_dir(self) -> Path:
        """A private local directory for fetched files, created on first use, removed by `close`."""
        if self._fetched is None or not self._fetched.is_dir():
            root = self._local_scratch_root()
            root.mkdir(parents=True, exist_ok=True)
            self._fetched = Path(tempfile.mkdtemp(prefix="fetched-", dir=root))
            # Also removed if the store is dropped without `close` (or at interpreter exit).
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._fetched, True)
        return self._fetched

    def close(self) -> None:
        """Remove what `fetch_dir` holds. The store stays usable; it fetches again if asked."""
        if self._finalizer is not None:
            self._finalizer()
        self._fetched = None
        self._finalizer = None


class LocalArtifactStore(ArtifactStore):
    """An artifact store in a local (or mounted) directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()
        for sub in ("blobs/sha256", "manifests", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- blobs -----------------------------------------------------------------------------

    def _local_scratch_root(self) -> Path:
        return self.root / "tmp"

    def blob_path(self, sha256: str, media_type: str) -> Path:
        return self.root / blob_relative_path(sha256, media_type)

    def _uri(self, path: Path) -> str:
        return "file://" + quote(str(path))

    def put_blob(self, path: Path, media_type: str) -> StoredBlob:
        staged = self.root / "tmp" / f"blob-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as src, open(staged, "wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            sha256 = digest.hexdigest()
            final = self.blob_path(sha256, media_type)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(staged, 0o444)
            _link_no_replace(staged, final)
        finally:
            staged.unlink(missing_ok=True)
        if final.stat().st_size != size:
            raise StoreError(
                f"blob {final.name} exists with a different size; the store is corrupt"
            )
        return StoredBlob(sha256=sha256, size=size, uri=self._uri(final))

    def local_path(self, uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise StoreError(f"{uri!r} is not in this store")
        path = Path(unquote(parsed.path))
        blobs = (self.root / "blobs").resolve()
        if not path.resolve().is_relative_to(blobs):
            raise StoreError(f"{uri!r} is outside the artifact store")
        if not path.exists():
            raise StoreError(f"{uri!r} is missing from the artifact store")
        return path

    # -- manifests -------------------------------------------------------------------------

    def _manifest_path(self, ref: str) -> Path:
        try:
            run_id, name = parse_artifact_ref(ref)
        except InvalidRefError as exc:
            raise StoreError(str(exc)) from exc
        return self.root / "manifests" / run_id / f"{name}.json"

    def put_manifest(self, manifest: ArtifactManifest) -> None:
        final = self._manifest_path(manifest.ref)
        final.parent.mkdir(parents=True, exist_ok=True)
        body = manifest.model_dump_json(indent=2).encode()
        staged = self.root / "tmp" / f"manifest-{uuid.uuid4().hex}"
        try:
            with open(staged, "wb") as dst:
                dst.write(body)
                dst.flush()
                os.fsync(dst.fileno())
            os.chmod(staged, 0o444)
            try:
                _link_no_replace(staged, final, exist_ok=False)
            except FileExistsError:
                existing = ArtifactManifest.model_validate_json(final.read_bytes())
                if existing != manifest:
                    raise StoreError(
                        f"artifact {manifest.ref} already exists with different content; "
                        "artifacts are immutable"
                    ) from None
        finally:
            staged.unlink(missing_ok=True)

    def manifest_uri(self, ref: str) -> str:
        return self._uri(self._manifest_path(ref))

    def get_manifest(self, ref: str) -> ArtifactManifest:
        path = self._manifest_path(ref)
        if not path.exists():
            raise StoreError(f"no artifact {ref} in the store at {self.root}")
        return ArtifactManifest.model_validate_json(path.read_bytes())

    def list_run(self, run_id: str) -> list[ArtifactManifest]:
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise StoreError(f"{run_id!r} is not a run id")
        folder = self.root / "manifests" / run_id
        if not folder.is_dir():
            return []
        return [
            ArtifactManifest.model_validate_json(p.read_bytes())
            for p in sorted(folder.glob("*.json"))
        ]

    # -- records -------------------------------------------------------------------------

    def _record_path(self, relative: str) -> Path:
        path = self.root.joinpath(*relative.split("/"))
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise StoreError(f"{relative!r} is outside the artifact store")
        return path

    def _create_record(self, relative: str, body: bytes) -> bytes | None:
        final = self._record_path(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = self.root / "tmp" / f"record-{uuid.uuid4().hex}"
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(staged, "wb") as dst:
                dst.write(body)
                dst.flush()
                os.fsync(dst.fileno())
            os.chmod(staged, 0o444)
            try:
                _link_no_replace(staged, final, exist_ok=False)
            except FileExistsError:
                return final.read_bytes()
            return None
        finally:
            staged.unlink(missing_ok=True)

    def _read_record(self, relative: str) -> bytes | None:
        path = self._record_path(relative)
        return path.read_bytes() if path.is_file() else None

    def _list_records(self, folder: str) -> list[bytes]:
        path = self._record_path(folder)
        if not path.is_dir():
            return []
        return [p.read_bytes() for p in sorted(path.glob("*.json"))]

    # -- scratch ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def scratch_dir(self, label: str) -> Iterator[Path]:
        path = self.root / "tmp" / f"work-{safe_label(label)}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _link_no_replace(staged: Path, final: Path, *, exist_ok: bool = True) -> None:
    """Make `staged` visible at `final` atomically, never replacing what is there."""
    try:
        os.link(staged, final)
    except FileExistsError:
        if not exist_ok:
            raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP):
            raise
        # A filesystem without hard links. A rename is still atomic; the check before it leaves a
        # window only between two writers of the same name, which for blobs hold the same bytes
        # and for manifests belong to the same run.
        if final.exists():
            if not exist_ok:
                raise FileExistsError(final) from exc
            return
        os.rename(staged, final)


def open_store(location: str) -> ArtifactStore:
    """The store at `location`: `s3://bucket/prefix`, a local directory or a `file://` URL."""
    if location.startswith("s3://"):
        # Imported here: boto3 costs time to import and only object storage needs it.
        from ergot_dagster.artifacts.s3_store import S3ArtifactStore

        return S3ArtifactStore(location)
    if location.startswith("file://"):
        location = unquote(urlparse(location).path)
    return LocalArtifactStore(Path(location))
