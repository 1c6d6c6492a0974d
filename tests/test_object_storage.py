"""Object storage: the artifact store and the ingest root in an S3-compatible bucket.

Everything runs against a real S3 server on loopback (`moto_server`, started by the fixture) with
fake credentials in the usual AWS variables, real ffmpeg/ffprobe on generated media, and real
Dagster runs. What the store did is checked on the server: objects, their part counts, pending
multipart uploads and the headers of the requests it received (moto's request recorder).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from click.testing import CliRunner
from dagster import AssetKey, DagsterInstance, build_sensor_context, materialize

from ergot_dagster.artifacts.manifest import ArtifactManifest, ParentRef, RuntimeInfo
from ergot_dagster.artifacts.metadata import manifest_from_metadata
from ergot_dagster.artifacts.s3_store import S3ArtifactStore
from ergot_dagster.artifacts.store import open_store
from ergot_dagster.assets import build_assets
from ergot_dagster.cli import main
from ergot_dagster.client import ArtifactUnreachableError, ErgotClient
from ergot_dagster.definitions import build_definitions
from ergot_dagster.errors import StoreError
from ergot_dagster.media.synth import make_audio, make_clip, make_image
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.resources.source_root import SourceRootResource
from ergot_dagster.sensors.ingest_sensor import ingest_sensor
from ergot_dagster.settings import ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import (
    SOURCE_PARTITIONS_NAME,
    SourceRecord,
    latest_source_record,
    record_sources,
)
from ergot_dagster.sources.root import S3SourceRoot
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.run_config import run_config_for
from tests.support import free_port, stop, until

RUN_ID = "5e0b9c1a-3f7d-4e2b-9a6c-0d1e2f3a4b5c"
MiB = 1024 * 1024


# -- the server ---------------------------------------------------------------------------


class MotoServer:
    """A `moto_server` process on a loopback port, and what the tests ask it directly."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.recording = workdir / "recording.jsonl"
        env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(self.recording)}
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "moto_server"),
                "-H",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        until("moto_server to answer", self._ready, timeout_s=30)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"moto_server exited with status {self.proc.returncode}")
        try:
            return httpx.get(f"{self.url}/moto-api/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def start_recording(self) -> None:
        httpx.post(f"{self.url}/moto-api/recorder/reset-recording", timeout=10)
        httpx.post(f"{self.url}/moto-api/recorder/start-recording", timeout=10)

    def stop_recording(self) -> list[dict[str, Any]]:
        httpx.post(f"{self.url}/moto-api/recorder/stop-recording", timeout=10)
        text = httpx.get(f"{self.url}/moto-api/recorder/download-recording", timeout=30).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        stop(server.proc)


@pytest.fixture
def s3_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """The usual AWS variables pointing at the server, with fake credentials and nothing else."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ergot-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ergot-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto


@pytest.fixture
def bucket(s3_env: MotoServer) -> str:
    name = f"ergot-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3() -> Any:
    """A plain client of the test's own, to look at the bucket behind the plane's back."""
    return boto3.client("s3")


def _key(uri: str) -> str:
    return uri.split("/", 3)[3]


def _object_sha256(s3: Any, bucket: str, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(MiB):
        digest.update(chunk)
    return digest.hexdigest()


def _random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, MiB))
            out.write(chunk)
            left -= len(chunk)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(store: S3ArtifactStore, path: Path, name: str = "poster") -> ArtifactManifest:
    blob = store.put_blob(path, "image/jpeg")
    return ArtifactManifest(
        ref=f"artifact:{RUN_ID}/{name}",
        name=name,
        media_type="image/jpeg",
        size=blob.size,
        sha256=blob.sha256,
        uri=blob.uri,
        workflow="core/poster_extraction@1",
        run_id=RUN_ID,
        source_ref="cam/a.mov",
        parents=[ParentRef(kind="source", ref="cam/a.mov", sha256="ab" * 32, input="source")],
        runtime=RuntimeInfo(type="ffmpeg", target="ffmpeg-local", job_id="pid:1"),
        created_at=datetime(2026, 11, 24, tzinfo=UTC),
    )


def _header(entry: dict[str, Any], name: str) -> str | None:
    return next((v for k, v in entry["headers"].items() if k.lower() == name.lower()), None)


# -- the artifact store -----------------------------------------------------------------------


def test_blobs_are_content_addressed_idempotent_and_presigned(
    bucket: str, s3: Any, s3_env: MotoServer, tmp_path: Path
) -> None:
    store = open_store(f"s3://{bucket}/plane/artifacts")
    assert isinstance(store, S3ArtifactStore)
    data = b"\xff\xd8\xff" + b"jpeg bytes" * 1000
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(data)
    b.write_bytes(data)
    first = store.put_blob(a, "image/jpeg")
    sha = hashlib.sha256(data).hexdigest()
    assert first.sha256 == sha and first.size == len(data)
    assert first.uri == f"s3://{bucket}/plane/artifacts/blobs/sha256/{sha[:2]}/{sha}.jpg"
    before = s3.head_object(Bucket=bucket, Key=_key(first.uri))
    assert before["ContentType"] == "image/jpeg"
    assert store.put_blob(b, "image/jpeg") == first
    after = s3.head_object(Bucket=bucket, Key=_key(first.uri))
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == [_key(first.uri)]

    # A consumer that cannot reach the bucket gets the bytes with a plain HTTP GET.
    url = store.presigned_url(first.uri, expires_s=120)
    assert url.startswith(s3_env.url) and "X-Amz-Signature=" in url
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and hashlib.sha256(response.content).hexdigest() == sha

    # Reading it back locally checks the bytes, and `close` removes the local copy.
    local = store.local_path(first.uri)
    assert local.read_bytes() == data and local.name == f"{sha}.jpg"
    store.close()
    assert not local.exists()


def test_manifests_round_trip_are_written_once_and_listed(
    bucket: str, s3: Any, tmp_path: Path
) -> None:
    store = S3ArtifactStore(f"s3://{bucket}/arts")
    manifests = []
    for name in ("poster_info", "poster"):
        src = tmp_path / f"{name}.jpg"
        src.write_bytes(b"\xff\xd8\xff " + name.encode())
        manifests.append(_manifest(store, src, name))
        store.put_manifest(manifests[-1])
    poster = manifests[1]
    store.put_manifest(poster)  # the same content again is a no-op
    assert store.get_manifest(poster.ref) == poster
    assert store.manifest_uri(poster.ref) == f"s3://{bucket}/arts/manifests/{RUN_ID}/poster.json"
    key = _key(store.manifest_uri(poster.ref))
    written = s3.head_object(Bucket=bucket, Key=key)
    with pytest.raises(StoreError, match="already exists with different content"):
        store.put_manifest(poster.model_copy(update={"sha256": "cd" * 32}))
    assert s3.head_object(Bucket=bucket, Key=key)["ETag"] == written["ETag"]
    assert [m.name for m in store.list_run(RUN_ID)] == ["poster", "poster_info"]
    assert store.list_run("7f000000-0000-4000-8000-000000000000") == []
    with pytest.raises(StoreError, match="no artifact"):
        store.get_manifest("artifact:7f000000-0000-4000-8000-000000000000/poster")
    with pytest.raises(StoreError, match="not a run id"):
        store.list_run("../x")


def test_list_run_pages_through_the_listing(
    bucket: str, s3_env: MotoServer, tmp_path: Path
) -> None:
    store = S3ArtifactStore(f"s3://{bucket}/arts")
    store.list_page_size = 2
    src = tmp_path / "p.jpg"
    src.write_bytes(b"\xff\xd8\xff many")
    base = _manifest(store, src)
    names = [f"a{i}" for i in range(5)]
    for name in names:
        store.put_manifest(
            base.model_copy(update={"ref": f"artifact:{RUN_ID}/{name}", "name": name})
        )
    s3_env.start_recording()
    try:
        listed = store.list_run(RUN_ID)
    finally:
        requests = s3_env.stop_recording()
    assert [m.name for m in listed] == names
    listings = [r for r in requests if r["method"] == "GET" and "list-type=2" in r["url"]]
    assert len(listings) == 3, "five manifests, two keys a page"


def test_writes_are_create_only_on_the_wire(
    bucket: str, s3_env: MotoServer, tmp_path: Path
) -> None:
    # One request at a time: the server's recorder appends each request to its log unlocked.
    store = S3ArtifactStore(f"s3://{bucket}/arts", part_size=5 * MiB, max_concurrency=1)
    small = tmp_path / "small.jpg"
    small.write_bytes(b"\xff\xd8\xff small")
    medium = _random_file(tmp_path / "medium.mp4", 11 * MiB)
    s3_env.start_recording()
    try:
        store.put_blob(small, "image/jpeg")
        store.put_blob(medium, "video/mp4")
        store.put_manifest(_manifest(store, small))
    finally:
        requests = s3_env.stop_recording()
    puts = [r for r in requests if r["method"] == "PUT" and "partNumber=" not in r["url"]]
    completes = [r for r in requests if r["method"] == "POST" and "uploadId=" in r["url"]]
    parts = [r for r in requests if r["method"] == "PUT" and "partNumber=" in r["url"]]
    assert len(puts) == 2 and len(completes) == 1 and len(parts) == 3
    for request in puts + completes:
        assert _header(request, "If-None-Match") == "*", request["url"]
    # The single PUTs carry the sha256 the server checks the bytes against.
    assert all(_header(r, "x-amz-checksum-sha256") for r in puts)


@pytest.mark.slow
def test_a_large_file_goes_up_in_parts_with_bounded_memory(
    bucket: str, s3: Any, tmp_path: Path
) -> None:
    store = S3ArtifactStore(f"s3://{bucket}/arts")
    big = _random_file(tmp_path / "big.mp4", 30 * MiB)
    tracemalloc.start()
    try:
        blob = store.put_blob(big, "video/mp4")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"uploading 30 MiB held {peak / MiB:.1f} MiB"
    head = s3.head_object(Bucket=bucket, Key=_key(blob.uri), PartNumber=1)
    assert head["PartsCount"] == 4  # 8 + 8 + 8 + 6 MiB
    assert s3.head_object(Bucket=bucket, Key=_key(blob.uri))["ContentLength"] == 30 * MiB
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with httpx.stream("GET", store.presigned_url(blob.uri), timeout=60) as response:
        digest = hashlib.sha256()
        for chunk in response.iter_bytes(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == blob.sha256 == _sha(big)


@pytest.mark.slow
def test_an_object_that_appears_during_an_upload_is_never_replaced(
    bucket: str, s3: Any, tmp_path: Path
) -> None:
    # One part at a time, so that the upload is still going when the other writer strikes.
    store = S3ArtifactStore(f"s3://{bucket}/arts", part_size=5 * MiB, max_concurrency=1)
    big = _random_file(tmp_path / "big.mp4", 30 * MiB)
    key = _key(store.location.uri(store.blob_key(_sha(big), "video/mp4")))
    outcome: dict[str, Any] = {}

    def upload() -> None:
        try:
            outcome["blob"] = store.put_blob(big, "video/mp4")
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=upload)
    worker.start()
    deadline = time.monotonic() + 30
    while not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert worker.is_alive() and time.monotonic() < deadline, "no multipart upload started"
    # Another writer gets there first (it, too, only creates).
    s3.put_object(Bucket=bucket, Key=key, Body=b"someone else's bytes", IfNoneMatch="*")
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert isinstance(outcome.get("error"), StoreError), outcome
    assert "exists with a different size" in str(outcome["error"])
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"someone else's bytes"
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the upload was aborted"


class NoConditionalWrites(http.server.ThreadingHTTPServer):
    """An S3 front for servers without conditional writes: it answers `501 Not Implemented` to any
    request carrying `If-None-Match` (as such servers do) and passes everything else to moto."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refused = 0
        super().__init__(("127.0.0.1", 0), _NoConditionalHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _NoConditionalHandler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 answers botocore's `Expect: 100-continue` at once instead of letting it wait.
    protocol_version = "HTTP/1.1"
    server: NoConditionalWrites

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("If-None-Match") is not None:
            self.server.refused += 1
            error = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                b"<Message>A header you provided implies functionality that is not implemented"
                b"</Message></Error>"
            )
            self.send_response(501)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "expect")}
        response = httpx.request(
            self.command,
            self.server.upstream + self.path,
            headers=headers,
            content=body,
            timeout=30,
        )
        self.send_response(response.status_code)
        for name, value in response.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        # A HEAD answer has no body but the object's length.
        length = response.headers.get("Content-Length", "0")
        self.send_header(
            "Content-Length", length if self.command == "HEAD" else str(len(response.content))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.content)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_a_server_without_conditional_writes_gets_plain_writes_behind_a_head_check(
    bucket: str, s3: Any, s3_env: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    front = NoConditionalWrites(s3_env.url)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", front.url)
        store = S3ArtifactStore(f"s3://{bucket}/arts")
        src = tmp_path / "p.jpg"
        src.write_bytes(b"\xff\xd8\xff plain")
        manifest = _manifest(store, src)
        assert front.refused == 1 and not store.conditional_writes
        store.put_manifest(manifest)
        assert store.get_manifest(manifest.ref) == manifest
        assert _object_sha256(s3, bucket, _key(manifest.uri)) == _sha(src)
        # Still create-only: what exists is found first and never replaced.
        other = S3ArtifactStore(f"s3://{bucket}/arts")
        with pytest.raises(StoreError, match="already exists with different content"):
            other.put_manifest(manifest.model_copy(update={"size": 1}))
        assert other.put_blob(src, "image/jpeg").uri == manifest.uri
        assert front.refused == 1, "the second store found both objects before writing"
    finally:
        front.shutdown()
        front.server_close()


def test_a_foreign_object_under_a_blob_key_is_kept_and_caught(
    bucket: str, s3: Any, tmp_path: Path
) -> None:
    store = S3ArtifactStore(f"s3://{bucket}/arts")
    src = tmp_path / "p.jpg"
    src.write_bytes(b"\xff\xd8\xff real bytes")
    sha = _sha(src)
    key = f"arts/blobs/sha256/{sha[:2]}/{sha}.jpg"
    s3.put_object(Bucket=bucket, Key=key, Body=b"\xff\xd8\xff fake bytes")  # same size
    blob = store.put_blob(src, "image/jpeg")
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"\xff\xd8\xff fake bytes"
    with pytest.raises(StoreError, match="store is corrupt"):
        store.local_path(blob.uri)
    assert list((store.fetch_dir() / "blobs").iterdir()) == [], "nothing unverified is kept"


def test_uris_outside_the_prefix_are_refused(bucket: str, tmp_path: Path) -> None:
    store = S3ArtifactStore(f"s3://{bucket}/arts")
    sha = "ab" * 32
    for uri in (
        f"s3://{bucket}/other/blobs/sha256/ab/{sha}.jpg",
        f"s3://{bucket}/artsy/blobs/sha256/ab/{sha}.jpg",
        f"s3://not-{bucket}/arts/blobs/sha256/ab/{sha}.jpg",
        f"s3://{bucket}/arts/blobs/sha256/ab/../../../../secret",
        f"s3://{bucket}/arts//blobs/sha256/ab/{sha}.jpg",
        f"s3://{bucket}/arts/",
        "file:///etc/passwd",
        "/etc/passwd",
    ):
        with pytest.raises(StoreError, match=r"outside|is not"):
            store.local_path(uri)
        with pytest.raises(StoreError, match=r"outside|is not"):
            store.presigned_url(uri)
    # Inside the prefix but not a blob: local_path only fetches verifiable content.
    with pytest.raises(StoreError, match="not a blob"):
        store.local_path(f"s3://{bucket}/arts/manifests/{RUN_ID}/poster.json")
    with pytest.raises(StoreError, match="missing"):
        store.local_path(f"s3://{bucket}/arts/blobs/sha256/ab/{sha}.jpg")
    for bad in ("s3://Bad_Bucket/x", "s3://ab", f"s3://{bucket}/a/../b"):
        with pytest.raises(StoreError):
            open_store(bad)
    with pytest.raises(StoreError, match="between 1 s"):
        store.presigned_url(f"s3://{bucket}/arts/blobs/sha256/ab/{sha}.jpg", expires_s=10**7)


def test_presigning_without_credentials_is_refused(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3ArtifactStore(f"s3://{bucket}/arts")
    with pytest.raises(StoreError, match="no AWS credentials"):
        store.presigned_url(f"s3://{bucket}/arts/blobs/sha256/ab/{'ab' * 32}.jpg")
    with pytest.raises(StoreError, match="no AWS credentials") as caught:
        store.get_manifest(f"artifact:{RUN_ID}/poster")
    assert "ergot-test" not in str(caught.value)


# -- ingest from a bucket -------------------------------------------------------------------


@pytest.fixture
def media(tmp_path: Path) -> dict[str, Path]:
    """Real media, made locally and uploaded by the tests."""
    made = tmp_path / "made"
    return {
        "cam/take 01.mov": make_clip(made / "take.mov", duration=2.0),
        "audio/tone.wav": make_audio(made / "tone.wav", duration=1.5),
        "stills/portrait.jpg": make_image(made / "portrait.jpg"),
    }


def test_ingest_sensor_and_command_with_a_bucket_root(
    bucket: str,
    s3: Any,
    media: dict[str, Path],
    plane_settings: ErgotSettings,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = f"s3://{bucket}/ingest"
    monkeypatch.setenv("ERGOT_INGEST_ROOT", root)
    monkeypatch.setenv("ERGOT_INGEST_SETTLE_S", "0")
    for ref, path in media.items():
        s3.upload_file(str(path), bucket, f"ingest/{ref}")
    s3.put_object(Bucket=bucket, Key="ingest/notes.txt", Body=b"not media at all")
    s3.put_object(Bucket=bucket, Key="ingest/.hidden.mov", Body=b"skip me")
    s3.put_object(Bucket=bucket, Key="ingest/odd//empty segment.mov", Body=b"x")
    s3.put_object(Bucket=bucket, Key="elsewhere/outside.mov", Body=b"x")
    resources = {"sources": SourceRootResource(root=root)}

    result = ingest_sensor(build_sensor_context(instance=instance, resources=resources))
    added = [k for request in result.dynamic_partitions_requests for k in request.partition_keys]
    assert sorted(added) == sorted(media)
    records = [SourceRecord.model_validate(e.metadata["record"].value) for e in result.asset_events]
    by_ref = {r.ref: r for r in records}
    for ref, path in media.items():
        assert by_ref[ref].sha256 == _sha(path) and by_ref[ref].size == path.stat().st_size
        assert by_ref[ref].uri == f"{root}/{ref}" and by_ref[ref].root == root
        assert by_ref[ref].etag
    assert by_ref["cam/take 01.mov"].media_type == "video/quicktime"
    assert by_ref["cam/take 01.mov"].probe.duration_s == pytest.approx(2.0, abs=0.1)
    assert by_ref["cam/take 01.mov"].probe.video_streams[0].width == 320
    assert by_ref["audio/tone.wav"].media_type == "audio/wav"
    assert by_ref["stills/portrait.jpg"].media_type == "image/jpeg"
    cursor = json.loads(result.cursor)
    assert "notes.txt" in cursor["refused"] and "odd//empty segment.mov" in cursor["refused"]
    record_sources(instance, records)

    again = ingest_sensor(
        build_sensor_context(instance=instance, resources=resources, cursor=result.cursor)
    )
    assert not again.asset_events and not again.dynamic_partitions_requests

    # A replaced object is a new version; a re-upload of the same bytes records nothing.
    make_clip(media["cam/take 01.mov"], duration=1.0)
    s3.upload_file(str(media["cam/take 01.mov"]), bucket, "ingest/cam/take 01.mov")
    s3.upload_file(str(media["audio/tone.wav"]), bucket, "ingest/audio/tone.wav")
    changed = ingest_sensor(
        build_sensor_context(instance=instance, resources=resources, cursor=again.cursor)
    )
    assert [e.partition for e in changed.asset_events] == ["cam/take 01.mov"]
    record_sources(
        instance,
        [SourceRecord.model_validate(e.metadata["record"].value) for e in changed.asset_events],
    )

    # `ergot ingest` takes refs and folders relative to the prefix (or s3:// uris under it).
    out = CliRunner().invoke(main, ["ingest", "--json", "cam", "stills/portrait.jpg"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["root"] == root
    assert {i["ref"]: i["status"] for i in report["ingested"]} == {
        "cam/take 01.mov": "unchanged",
        "stills/portrait.jpg": "unchanged",
    }
    refused = CliRunner().invoke(
        main,
        ["ingest", "../etc/passwd", f"s3://{bucket}/elsewhere/outside.mov", "nothing", "notes.txt"],
    )
    assert refused.exit_code == 1
    assert "refused ../etc/passwd: source ref '../etc/passwd' contains a '..' segment" in (
        refused.stderr
    )
    assert f"is not inside the ingest root {root}" in refused.stderr
    assert f"refused nothing: no object or folder 'nothing' under {root}" in refused.stderr
    assert "refused notes.txt: notes.txt: not readable media" in refused.stderr
    assert "X-Amz-" not in refused.stderr, "no signed URL in errors"
    assert sorted(instance.get_dynamic_partitions(SOURCE_PARTITIONS_NAME)) == sorted(media)


# -- a real workflow on object storage ------------------------------------------------------


@pytest.mark.slow
def test_poster_extraction_with_store_and_ingest_root_in_a_bucket(
    bucket: str,
    s3: Any,
    tmp_path: Path,
    plane_settings: ErgotSettings,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ERGOT_STORAGE", f"s3://{bucket}/plane/artifacts")
    monkeypatch.setenv("ERGOT_INGEST_ROOT", f"s3://{bucket}/plane/ingest")
    settings = ErgotSettings.from_env()
    clip = make_clip(tmp_path / "made" / "take.mov", duration=6.0, size="640x360", black_lead_s=1.5)
    s3.upload_file(str(clip), bucket, "plane/ingest/cam/take 01.mov")
    root = S3SourceRoot(settings.ingest_root)
    outcomes = ingest_refs(root, ["cam/take 01.mov"], lambda k: latest_source_record(instance, k))
    assert outcomes[0].record is not None, outcomes[0].error
    record_sources(instance, [outcomes[0].record])

    registry = load_registry(settings.workflow_defs)
    definition = registry.get("poster_extraction")
    defs = build_definitions(settings)

    def run() -> Any:
        return materialize(
            build_assets(registry),
            selection=[
                AssetKey([definition.family, definition.name, n]) for n in definition.outputs
            ],
            partition_key=ref_to_partition_key("cam/take 01.mov"),
            instance=instance,
            resources=defs.resources,
            run_config=run_config_for(definition, {"width": 480}, None),
            raise_on_error=False,
        )

    result = run()
    assert result.success
    store = open_store(settings.storage)
    manifests = {m.name: m for m in store.list_run(result.run_id)}
    assert set(manifests) == {"poster", "poster_info"}
    for manifest in manifests.values():
        assert manifest.uri.startswith(f"s3://{bucket}/plane/artifacts/blobs/sha256/")
        assert _object_sha256(s3, bucket, _key(manifest.uri)) == manifest.sha256
        assert manifest.parents == [
            ParentRef(kind="source", ref="cam/take 01.mov", sha256=_sha(clip), input="source")
        ]
    poster_info = json.loads(store.local_path(manifests["poster_info"].uri).read_text())
    assert poster_info["timestamp_s"] >= 1.5 and poster_info["width"] == 480
    events = {e.asset_key.to_user_string(): e for e in result.get_asset_materialization_events()}
    materialization = events["core/poster_extraction/poster"].materialization
    assert materialization.metadata["uri"].value == manifests["poster"].uri
    assert manifest_from_metadata(dict(materialization.metadata)) == manifests["poster"]
    assert "preview" in materialization.metadata, "the thumbnail was made from the fetched blob"
    store.close()

    # Nothing of the run stays on local disk: scratch and fetched files are gone.
    leftovers = [
        p
        for p in plane_settings.home.rglob("*")
        if p.is_file() and plane_settings.dagster_home not in p.parents
    ]
    assert leftovers == []

    # Consumers that cannot reach the bucket get presigned URLs from a machine of the plane.
    out = CliRunner().invoke(main, ["artifacts", result.run_id, "--presign", "--json"])
    assert out.exit_code == 0, out.output
    for row in json.loads(out.stdout):
        assert row["uri"].startswith("s3://") and row["presigned_expires_s"] == 3600
        response = httpx.get(row["presigned_url"], timeout=30)
        assert hashlib.sha256(response.content).hexdigest() == row["sha256"]

    # The bytes in the bucket change (same size, so only the hash can tell): the run fails.
    data = bytearray(clip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key="plane/ingest/cam/take 01.mov", Body=bytes(data))
    failed = run()
    assert not failed.success
    failure = next(e for e in failed.all_events if e.is_step_failure).step_failure_data
    description = failure.user_failure_data.description if failure.user_failure_data else ""
    assert "source 'cam/take 01.mov' has changed since it was ingested" in description
    assert not [p for p in (plane_settings.home / "tmp").rglob("*") if p.is_file()]


class _StoreCatalog:
    """What a consumer's client needs from a catalog, answered by the store itself (no GraphQL
    server here): only manifests are looked up when reading an artifact."""

    def __init__(self, store: S3ArtifactStore) -> None:
        self.store = store

    def artifact(self, ref: str) -> ArtifactManifest | None:
        return self.store.get_manifest(ref)


def test_the_client_reads_s3_artifacts_with_its_own_credentials_or_says_how_not(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(f"s3://{bucket}/plane/artifacts")
    assert isinstance(store, S3ArtifactStore)
    poster = tmp_path / "poster.jpg"
    poster.write_bytes(b"\xff\xd8\xff" + os.urandom(4096))
    manifest = _manifest(store, poster)
    store.put_manifest(manifest)
    client = ErgotClient(
        f"http://127.0.0.1:{free_port()}",
        catalog=_StoreCatalog(store),  # type: ignore[arg-type]
    )
    copy = client.download(manifest.ref, tmp_path / "out" / "poster.jpg")
    assert _sha(copy) == manifest.sha256
    # Without credentials for the bucket: a clear way forward, and no partial file.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ArtifactUnreachableError, match="--presign"):
        client.download(manifest.ref, tmp_path / "again" / "poster.jpg")
    assert not list((tmp_path / "again").iterdir())
