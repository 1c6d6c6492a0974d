"""The artifact store: content-addressed, atomic, never overwritten, confined to its root."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ergot_dagster.artifacts.manifest import ArtifactManifest, ParentRef, RuntimeInfo
from ergot_dagster.artifacts.store import LocalArtifactStore
from ergot_dagster.errors import StoreError

RUN_ID = "0d9f6c3e-5b7a-4c1e-8f2d-1a2b3c4d5e6f"


def _manifest(store: LocalArtifactStore, path: Path, name: str = "poster") -> ArtifactManifest:
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


def test_blobs_are_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    data = b"\xff\xd8\xff" + b"jpeg bytes" * 1000
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(data)
    b.write_bytes(data)
    first, second = store.put_blob(a, "image/jpeg"), store.put_blob(b, "image/jpeg")
    assert first == second
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    stored = store.local_path(first.uri)
    assert stored.read_bytes() == data
    assert stored.name == f"{first.sha256}.jpg"
    assert not stored.stat().st_mode & 0o222, "blobs are read-only"
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_manifest_is_written_once_and_never_replaced(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    src = tmp_path / "p.jpg"
    src.write_bytes(b"\xff\xd8\xff one")
    manifest = _manifest(store, src)
    store.put_manifest(manifest)
    store.put_manifest(manifest)  # the same content again is a no-op
    assert store.get_manifest(manifest.ref) == manifest
    other = manifest.model_copy(update={"sha256": "cd" * 32})
    with pytest.raises(StoreError, match="immutable"):
        store.put_manifest(other)
    assert store.get_manifest(manifest.ref) == manifest
    assert store.list_run(RUN_ID) == [manifest]


def test_store_refuses_uris_and_refs_outside_it(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    (tmp_path / "secret").write_text("x")
    with pytest.raises(StoreError, match="outside the artifact store"):
        store.local_path(f"file://{tmp_path}/secret")
    with pytest.raises(StoreError, match="outside the artifact store"):
        store.local_path(f"file://{tmp_path}/store/blobs/../../secret")
    with pytest.raises(StoreError, match="not an artifact ref"):
        store.get_manifest("artifact:../../secret/x")
    with pytest.raises(StoreError, match="not a run id"):
        store.list_run("../..")


def test_scratch_dirs_are_removed_even_on_failure(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    with pytest.raises(RuntimeError), store.scratch_dir("run/1") as work:
        (work / "half-written.mp4").write_bytes(b"partial")
        raise RuntimeError("runtime died")
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
