"""The artifact store in S3-compatible object storage (`ERGOT_STORAGE=s3://bucket/prefix`).

Same layout and guarantees as the local store, under the prefix:

    <prefix>/blobs/sha256/<first two hex digits>/<sha256><extension>   the bytes
    <prefix>/manifests/<run id>/<artifact name>.json                   one manifest per artifact

- **Content-addressed, never overwritten.** A blob's key is its sha256, computed by streaming the
  local file before anything is sent. An existing key is never written again: a HEAD finds it
  first, and every write also carries `If-None-Match: *` (S3 conditional writes), so that a writer
  racing another one gets `412 Precondition Failed` instead of replacing the object. A server that
  answers `501 Not Implemented` to conditional writes is written to without them from then on, and
  the HEAD check is what remains (a window only between two writers of the same content).
- **Nothing half-written is visible.** A single PUT is atomic. A file of `part_size` bytes or more
  goes up as a multipart upload (managed by s3transfer: parts are read from the file as they are
  sent, so memory stays bounded by the part size times the concurrency, never the file size); S3
  shows the object only when `CompleteMultipartUpload` succeeds, and an upload that fails or is
  interrupted is aborted, so its parts do not linger. A manifest is written only after its blob.
- **Confined to the prefix.** Every uri handed back in is checked to lie under
  `s3://bucket/prefix/` with no empty, `.` or `..` segment before any request is made.
- **Local files only while needed.** `local_path` downloads a blob into a private directory of
  this store object (`fetch_dir`, removed by `close` or as soon as the object is dropped, which
  for a step is when its code returns), checking its sha256 against its key; `scratch_dir` is
  local too.

Endpoint, region and credentials come from boto3's usual chain: `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE`
and `~/.aws/config`, instance roles. Credentials never appear in errors or logs; presigned URLs
are printed only when asked for.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import shutil
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.artifacts.store import (
    ArtifactStore,
    StoredBlob,
    blob_relative_path,
    default_local_root,
    safe_label,
)
from ergot_dagster.errors import StoreError, TransientRuntimeError
from ergot_dagster.media.hashing import CHUNK, sha256_file
from ergot_dagster.refs import InvalidRefError, parse_artifact_ref

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
# A presigned URL may live at most 7 days (SigV4).
MAX_PRESIGN_S = 7 * 24 * 3600
# Manifests are small; anything far larger under manifests/ is not one of ours.
MAX_MANIFEST_BYTES = 64 * MiB

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BLOB_NAME = re.compile(r"^(?P<sha>[0-9a-f]{64})(\.[a-z0-9]{1,8})?$")
_MISSING = {"404", "NoSuchKey", "NotFound"}
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "Throttling",
    "ThrottlingException",
    "ConditionalRequestConflict",
}


class ObjectStorageUnavailable(TransientRuntimeError, StoreError):
    """Object storage could not be reached or was overloaded; trying again may succeed.

    A `StoreError` for code that looks things up, and transient for the plane's retry policy.
    """


def is_s3_location(location: str) -> bool:
    return location.startswith("s3://")


def _check_relative(relative: str, what: str) -> None:
    if any(unicodedata.category(ch) == "Cc" for ch in relative):
        raise StoreError(f"{what} contains a control character")
    for part in relative.split("/"):
        if part in ("", ".", ".."):
            raise StoreError(f"{what} has an empty, '.' or '..' path segment")


class S3Location(BaseModel):
    """A bucket and a key prefix (without leading or trailing `/`; empty for the whole bucket)."""

    model_config = ConfigDict(frozen=True)

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket/some/prefix` -> S3Location; `StoreError` naming what is wrong."""
        if not is_s3_location(url):
            raise StoreError(f"{url!r} is not an s3:// location")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise StoreError(f"{url!r}: {bucket!r} is not a valid S3 bucket name")
        prefix = prefix.strip("/")
        if prefix:
            _check_relative(prefix, f"the prefix of {url!r}")
        return cls(bucket=bucket, prefix=prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def key_prefix(self) -> str:
        """What every key under this location starts with (`prefix/`, or nothing)."""
        return f"{self.prefix}/" if self.prefix else ""

    def key(self, relative: str) -> str:
        """The object key of `relative` (a path under the prefix), refusing any way out of it."""
        _check_relative(relative, f"{relative!r}")
        return self.key_prefix + relative

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def relative(self, uri: str) -> str:
        """The path of `uri` under this location; `StoreError` if it lies anywhere else."""
        base = f"s3://{self.bucket}/{self.key_prefix}"
        if not uri.startswith(base) or len(uri) == len(base):
            raise StoreError(f"{uri!r} is outside {self.url}/")
        relative = uri[len(base) :]
        try:
            _check_relative(relative, f"{uri!r}")
        except StoreError as exc:
            raise StoreError(f"{exc}; it is refused as outside {self.url}/") from None
        return relative


def s3_client(session: Any = None) -> Any:
    """An S3 client from boto3's usual configuration chain, with bounded waits and retries.

    botocore reads `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` (or `endpoint_url` in the profile) by
    itself. A new session unless one is given: sessions are not thread-safe, clients are.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - boto3 is a dependency
        raise StoreError("object storage needs boto3 (pip install boto3)") from exc
    session = session or boto3.session.Session()
    return session.client(
        "s3",
        config=Config(
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 5, "mode": "standard"},
            signature_version="s3v4",
        ),
    )


def error_code(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore `ClientError`; ("", 0) for anything else."""
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code, status


def is_missing(exc: BaseException) -> bool:
    code, status = error_code(exc)
    return code in _MISSING or status == 404


def is_precondition_failed(exc: BaseException) -> bool:
    code, status = error_code(exc)
    return code == "PreconditionFailed" or status == 412


def translate(exc: BaseException, what: str) -> StoreError:
    """A botocore error as a `StoreError` that says what failed and whether to try again.

    Only the error code and status are kept: servers' messages for signature errors can quote the
    canonical request, and nothing of the credentials belongs in an error.
    """
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StoreError(
            f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE)"
        )
    unreachable = (
        EndpointConnectionError,
        ConnectTimeoutError,
        ReadTimeoutError,
        ConnectionClosedError,
    )
    if isinstance(exc, unreachable):
        return ObjectStorageUnavailable(
            f"{what}: object storage unreachable ({type(exc).__name__})"
        )
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        if code == "NoSuchBucket":
            return StoreError(f"{what}: the bucket does not exist")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
            return StoreError(f"{what}: access denied by object storage ({code})")
        if status >= 500 or code in _TRANSIENT_CODES:
            return ObjectStorageUnavailable(f"{what}: object storage error {code or status}")
        return StoreError(f"{what}: object storage refused the request ({code or status})")
    return ObjectStorageUnavailable(f"{what}: {type(exc).__name__}")


def storage_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def stream_object(
    client: Any,
    bucket: str,
    key: str,
    out: IO[bytes] | None = None,
    *,
    if_match: str | None = None,
) -> tuple[str, int, str]:
    """Read an object once, in chunks, hashing it (and copying it to `out` if given).

    Returns (sha256, size, etag). With `if_match`, the read fails with 412 if the object is no
    longer that version. botocore errors propagate for the caller to translate.
    """
    extra = {"IfMatch": f'"{if_match}"'} if if_match else {}
    response = client.get_object(Bucket=bucket, Key=key, **extra)
    body = response["Body"]
    digest = hashlib.sha256()
    size = 0
    try:
        for chunk in body.iter_chunks(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        body.close()
    return digest.hexdigest(), size, str(response.get("ETag", "")).strip('"')


def download_verified(
    client: Any,
    bucket: str,
    key: str,
    dest: Path,
    *,
    check: Callable[[str, int], None],
    if_match: str | None = None,
) -> Path:
    """Stream an object to `dest`, visible there only after `check(sha256, size)` accepted it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(staged, "wb") as out:
            sha256, size, _ = stream_object(client, bucket, key, out, if_match=if_match)
        check(sha256, size)
        staged.replace(dest)
    finally:
        staged.unlink(missing_ok=True)
    return dest


def last_modified_ns(value: datetime) -> int:
    """An object's LastModified in whole seconds as ns: HEAD and LIST agree to the second only."""
    return int(value.timestamp()) * 1_000_000_000


class _WriteMode:
    """How this store's writes are sent: create-only with `If-None-Match: *`, or plain."""

    def __init__(self) -> None:
        self.conditional = True

    def create_only(self, params: dict[str, Any], **_: Any) -> None:
        if self.conditional:
            params.setdefault("IfNoneMatch", "*")


class S3ArtifactStore(ArtifactStore):
    """An artifact store in an S3-compatible bucket, under a key prefix (see the module doc)."""

    def __init__(
        self,
        location: str | S3Location,
        *,
        local_root: Path | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = 4,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.location = location if isinstance(location, S3Location) else S3Location.parse(location)
        self.local_root = Path(local_root or default_local_root()).expanduser().absolute()
        if part_size < 5 * MiB:
            raise StoreError("multipart parts must be at least 5 MiB (an S3 limit)")
        self.part_size = part_size
        # Keys per listing request (S3 gives at most 1000).
        self.list_page_size = 1000
        self._transfer = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=max_concurrency,
            # Parts waiting to be sent are read from the file when sent; keep the queue short.
            max_io_queue=max_concurrency * 2,
        )
        self._writes = _WriteMode()
        self._session = boto3.session.Session()
        self._client = s3_client(self._session)
        # Every write this store makes creates an object; none may replace one. The handler holds
        # the mode, not the store: no cycle, so a dropped store is freed (and its fetched files
        # removed) at once.
        events = self._client.meta.events
        events.register("before-parameter-build.s3.PutObject", self._writes.create_only)
        events.register(
            "before-parameter-build.s3.CompleteMultipartUpload", self._writes.create_only
        )

    def __repr__(self) -> str:
        return f"S3ArtifactStore({self.location.url!r})"

    @property
    def conditional_writes(self) -> bool:
        """Whether writes carry `If-None-Match: *` (until the server says it cannot do them)."""
        return self._writes.conditional

    def _local_scratch_root(self) -> Path:
        return self.local_root

    # -- plumbing ---------------------------------------------------------------------------

    def _head(self, key: str, what: str) -> dict[str, Any] | None:
        try:
            return dict(self._client.head_object(Bucket=self.location.bucket, Key=key))
        except storage_errors() as exc:
            if is_missing(exc):
                return None
            raise translate(exc, what) from None

    def _create(self, write: Callable[[], None], what: str) -> bool:
        """Run a create-only `write`; False if the object turned out to exist already."""
        try:
            write()
            return True
        except storage_errors() as exc:
            if is_precondition_failed(exc):
                return False
            code, status = error_code(exc)
            if self.conditional_writes and (code == "NotImplemented" or status == 501):
                # This server has no conditional writes; the caller's HEAD check is what remains.
                self._writes.conditional = False
                return self._create(write, what)
            raise translate(exc, what) from None

    def _get_small(self, key: str, what: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
        except storage_errors() as exc:
            if is_missing(exc):
                return None
            raise translate(exc, what) from None
        body = response["Body"]
        try:
            if int(response.get("ContentLength") or 0) > MAX_MANIFEST_BYTES:
                raise StoreError(f"{what}: {self.location.uri(key)} is too large to be a manifest")
            return body.read()
        except storage_errors() as exc:
            raise translate(exc, what) from None
        finally:
            body.close()

    # -- blobs ------------------------------------------------------------------------------

    def blob_key(self, sha256: str, media_type: str) -> str:
        return self.location.key(blob_relative_path(sha256, media_type))

    def put_blob(self, path: Path, media_type: str) -> StoredBlob:
        sha256, size = sha256_file(path)
        key = self.blob_key(sha256, media_type)
        uri = self.location.uri(key)
        what = f"storing {path.name} as {uri}"
        existing = self._head(key, what)
        if existing is None:
            created = self._create(lambda: self._upload(path, key, sha256, size, media_type), what)
            if not created:
                existing = self._head(key, what)
        if existing is not None and int(existing.get("ContentLength", -1)) != size:
            raise StoreError(f"blob {uri} exists with a different size; the store is corrupt")
        return StoredBlob(sha256=sha256, size=size, uri=uri)

    def _upload(self, path: Path, key: str, sha256: str, size: int, media_type: str) -> None:
        extra = {"ContentType": media_type, "Metadata": {"sha256": sha256}}
        if size < self.part_size:
            # One PUT, atomic; the server checks the bytes it got against our sha256.
            checksum = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")
            with open(path, "rb") as body:
                self._client.put_object(
                    Bucket=self.location.bucket,
                    Key=key,
                    Body=body,
                    ChecksumSHA256=checksum,
                    **extra,
                )
            return
        from s3transfer.manager import TransferManager

        # Multipart: visible only once completed; on any failure (or an interrupt, which the
        # manager's exit turns into a cancel) s3transfer aborts the upload it created.
        with TransferManager(self._client, self._transfer) as manager:
            manager.upload(str(path), self.location.bucket, key, extra_args=extra).result()

    def local_path(self, uri: str) -> Path:
        relative = self.location.relative(uri)
        parts = relative.split("/")
        match = _BLOB_NAME.match(parts[-1])
        if (
            len(parts) != 4
            or parts[:2] != ["blobs", "sha256"]
            or match is None
            or parts[2] != parts[3][:2]
        ):
            raise StoreError(f"{uri!r} is not a blob of the artifact store {self.location.url}")
        expected = match.group("sha")
        dest = self.fetch_dir() / "blobs" / parts[3]
        if dest.exists():
            return dest

        def check(sha256: str, size: int) -> None:
            if sha256 != expected:
                raise StoreError(
                    f"{uri} holds bytes with sha256 {sha256[:12]}, not the sha256 its name says; "
                    "the store is corrupt"
                )

        try:
            return download_verified(
                self._client, self.location.bucket, self.location.key(relative), dest, check=check
            )
        except storage_errors() as exc:
            if is_missing(exc):
                raise StoreError(f"{uri!r} is missing from the artifact store") from None
            raise translate(exc, f"fetching {uri}") from None

    def presigned_url(self, uri: str, expires_s: int = 3600) -> str:
        relative = self.location.relative(uri)
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise StoreError(
                f"a presigned URL lives between 1 s and {MAX_PRESIGN_S} s, not {expires_s}"
            )
        # Presigning is local arithmetic: without credentials botocore would not fail, it would
        # hand out a URL that cannot work.
        if self._session.get_credentials() is None:
            raise translate(_no_credentials(), f"presigning {uri}")
        return str(
            self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.location.bucket, "Key": self.location.key(relative)},
                ExpiresIn=expires_s,
            )
        )

    # -- manifests --------------------------------------------------------------------------

    def _manifest_key(self, ref: str) -> str:
        try:
            run_id, name = parse_artifact_ref(ref)
        except InvalidRefError as exc:
            raise StoreError(str(exc)) from exc
        return self.location.key(f"manifests/{run_id}/{name}.json")

    def manifest_uri(self, ref: str) -> str:
        return self.location.uri(self._manifest_key(ref))

    def put_manifest(self, manifest: ArtifactManifest) -> None:
        key = self._manifest_key(manifest.ref)
        what = f"writing the manifest of {manifest.ref}"
        body = manifest.model_dump_json(indent=2).encode()
        existing = self._get_small(key, what)
        if existing is None:
            checksum = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
            created = self._create(
                lambda: self._client.put_object(
                    Bucket=self.location.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/json",
                    ChecksumSHA256=checksum,
                ),
                what,
            )
            if created:
                return
            existing = self._get_small(key, what)
        if existing is None or ArtifactManifest.model_validate_json(existing) != manifest:
            raise StoreError(
                f"artifact {manifest.ref} already exists with different content; "
                "artifacts are immutable"
            )

    def get_manifest(self, ref: str) -> ArtifactManifest:
        body = self._get_small(self._manifest_key(ref), f"reading the manifest of {ref}")
        if body is None:
            raise StoreError(f"no artifact {ref} in the store at {self.location.url}")
        return ArtifactManifest.model_validate_json(body)

    def _create_record(self, relative: str, body: bytes) -> bytes | None:
        _check_relative(relative, "a record")
        key = self.location.key(relative)
        what = f"writing {self.location.uri(key)}"
        existing = self._get_small(key, what)
        if existing is not None:
            return existing
        checksum = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        created = self._create(
            lambda: self._client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=body,
                ContentType="application/json",
                ChecksumSHA256=checksum,
            ),
            what,
        )
        if created:
            return None
        return self._get_small(key, what) or b""

    def _read_record(self, relative: str) -> bytes | None:
        _check_relative(relative, "a record")
        key = self.location.key(relative)
        return self._get_small(key, f"reading {self.location.uri(key)}")

    def _list_records(self, folder: str) -> list[bytes]:
        _check_relative(folder, "a folder")
        prefix = self.location.key(folder) + "/"
        what = f"listing {self.location.uri(prefix)}"
        keys: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".json")]
        except storage_errors() as exc:
            raise translate(exc, what) from None
        bodies = [self._get_small(key, what) for key in sorted(keys)]
        return [b for b in bodies if b is not None]

    def list_run(self, run_id: str) -> list[ArtifactManifest]:
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise StoreError(f"{run_id!r} is not a run id")
        folder = self.location.key(f"manifests/{run_id}") + "/"
        what = f"listing the artifacts of run {run_id}"
        keys: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket,
                Prefix=folder,
                PaginationConfig={"PageSize": self.list_page_size},
            )
            for page in pages:
                for item in page.get("Contents") or []:
                    key = str(item["Key"])
                    name = key[len(folder) :]
                    if name.endswith(".json") and "/" not in name:
                        keys.append(key)
        except storage_errors() as exc:
            raise translate(exc, what) from None
        manifests = []
        for key in sorted(keys):
            body = self._get_small(key, what)
            if body is not None:  # removed between the listing and the read
                manifests.append(ArtifactManifest.model_validate_json(body))
        return manifests

    # -- scratch ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def scratch_dir(self, label: str) -> Iterator[Path]:
        self.local_root.mkdir(parents=True, exist_ok=True)
        path = self.local_root / f"work-{safe_label(label)}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _no_credentials() -> BaseException:
    from botocore.exceptions import NoCredentialsError

    return NoCredentialsError()
