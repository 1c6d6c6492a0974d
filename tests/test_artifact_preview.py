"""Artifact previews: thumbnails of real generated images, JSON and text bodies, and their bounds.

Every preview here is made by real ffmpeg from media made with lavfi; the last tests run real
workflows through Dagster and read the preview back from the materialization's metadata.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey, DagsterInstance, MarkdownMetadataValue, materialize

from ergot_dagster.artifacts.manifest import ArtifactManifest, ParentRef, RuntimeInfo, SetMember
from ergot_dagster.artifacts.metadata import manifest_from_metadata, manifest_metadata
from ergot_dagster.artifacts.preview import (
    PREVIEW_KEY,
    TEXT_MAX_BYTES,
    THUMBNAIL_MAX_BYTES,
    THUMBNAIL_MAX_PX,
    artifact_preview,
)
from ergot_dagster.artifacts.store import LocalArtifactStore, open_store
from ergot_dagster.assets import build_assets
from ergot_dagster.definitions import build_definitions
from ergot_dagster.media.synth import make_clip, make_image
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.settings import ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.run_config import run_config_for

RUN_ID = "3f1c2b4a-9d8e-4f70-a6b5-c4d3e2f1a0b9"
DATA_URI = re.compile(r"!\[[^\]]*\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)")


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


def _manifest(
    store: LocalArtifactStore, path: Path, media_type: str, name: str = "art"
) -> ArtifactManifest:
    blob = store.put_blob(path, media_type)
    return ArtifactManifest(
        ref=f"artifact:{RUN_ID}/{name}",
        name=name,
        media_type=media_type,
        size=blob.size,
        sha256=blob.sha256,
        uri=blob.uri,
        workflow="core/test@1",
        run_id=RUN_ID,
        source_ref="cam/a.mov",
        parents=[ParentRef(kind="source", ref="cam/a.mov", sha256="ab" * 32, input="source")],
        runtime=RuntimeInfo(type="ffmpeg", target="ffmpeg-local", job_id="pid:1"),
        created_at=datetime(2026, 11, 24, tzinfo=UTC),
    )


def _frame_size(jpeg: bytes, tmp_path: Path) -> tuple[int, int]:
    path = tmp_path / "decoded.jpg"
    path.write_bytes(jpeg)
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,width,height",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    stream = json.loads(out)["streams"][0]
    assert stream["codec_name"] == "mjpeg"
    return stream["width"], stream["height"]


def _thumbnail(preview: dict[str, Any]) -> tuple[bytes, str]:
    value = preview[PREVIEW_KEY]
    assert isinstance(value, MarkdownMetadataValue)
    found = DATA_URI.search(value.md_str)
    assert found, value.md_str[:200]
    return base64.b64decode(found.group(1)), value.md_str


@pytest.mark.parametrize(
    ("suffix", "media_type", "size", "expected"),
    [
        (".png", "image/png", "1280x720", (320, 180)),
        (".jpg", "image/jpeg", "480x640", (240, 320)),
        (".webp", "image/webp", "200x100", (200, 100)),  # small images are never enlarged
    ],
)
def test_image_thumbnail_is_a_small_embedded_jpeg(
    store: LocalArtifactStore,
    tmp_path: Path,
    suffix: str,
    media_type: str,
    size: str,
    expected: tuple[int, int],
) -> None:
    image = make_image(tmp_path / f"still{suffix}", size=size)
    manifest = _manifest(store, image, media_type, name="poster")
    thumbnail, markdown = _thumbnail(artifact_preview(manifest, store.local_path))
    assert thumbnail[:2] == b"\xff\xd8", "a JPEG"
    assert len(thumbnail) <= THUMBNAIL_MAX_BYTES
    assert _frame_size(thumbnail, tmp_path) == expected
    assert markdown.startswith("![poster](data:image/jpeg;base64,")
    assert media_type in markdown


def test_a_busy_image_is_squeezed_under_the_byte_limit(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    # Random noise defeats JPEG: at the best quality its 320 px thumbnail is twice the limit.
    noise = tmp_path / "noise.png"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "nullsrc=s=900x900:d=1,geq=lum='random(1)*255':cb='random(2)*255':cr='random(3)*255'",
            "-frames:v",
            "1",
            str(noise),
        ],
        check=True,
        timeout=60,
    )
    thumbnail, _ = _thumbnail(
        artifact_preview(_manifest(store, noise, "image/png"), store.local_path)
    )
    assert len(thumbnail) <= THUMBNAIL_MAX_BYTES
    assert max(_frame_size(thumbnail, tmp_path)) == THUMBNAIL_MAX_PX


def test_an_image_set_is_previewed_by_its_first_member(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    members = []
    for i, size in enumerate(["640x320", "320x640", "500x500"], start=1):
        path = make_image(tmp_path / f"frame_{i:04d}.jpg", size=size)
        blob = store.put_blob(path, "image/jpeg")
        members.append(
            SetMember(
                name=path.name,
                media_type="image/jpeg",
                size=blob.size,
                sha256=blob.sha256,
                uri=blob.uri,
            )
        )
    frames = _manifest(store, tmp_path / "frame_0001.jpg", "image/jpeg", name="frames")
    frames = frames.model_copy(
        update={"kind": "set", "members": members, "uri": store.manifest_uri(frames.ref)}
    )
    thumbnail, markdown = _thumbnail(artifact_preview(frames, store.local_path))
    assert _frame_size(thumbnail, tmp_path) == (320, 160), "the first member's shape"
    assert "frames/frame_0001.jpg" in markdown and "first of 3" in markdown


def test_json_artifacts_are_shown_as_json(store: LocalArtifactStore, tmp_path: Path) -> None:
    report = {"black_s": 1.52, "segments": [{"start": 0.0, "end": 1.52}], "ok": False}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    preview = artifact_preview(_manifest(store, path, "application/json"), store.local_path)
    assert preview[PREVIEW_KEY].value == report


def test_markdown_and_plain_text_are_shown_as_markdown(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# Take 3\n\n*Slate* missed, audio clean.\n")
    preview = artifact_preview(_manifest(store, notes, "text/markdown"), store.local_path)
    assert preview[PREVIEW_KEY].md_str == notes.read_text()
    # Text with a fence of its own still ends up inside one code block.
    transcript = tmp_path / "t.txt"
    transcript.write_text("say ``` twice\n")
    preview = artifact_preview(_manifest(store, transcript, "text/plain"), store.local_path)
    assert preview[PREVIEW_KEY].md_str == "````text\nsay ``` twice\n\n````"


def test_media_without_a_preview_get_none(store: LocalArtifactStore, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", duration=1.0)
    assert artifact_preview(_manifest(store, clip, "video/mp4"), store.local_path) == {}


def test_previews_are_bounded_and_failures_only_logged(
    store: LocalArtifactStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps(["x" * 100] * (TEXT_MAX_BYTES // 100)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 50)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    cases = [
        _manifest(store, big, "application/json", name="big"),
        _manifest(store, broken, "image/jpeg", name="broken"),
        _manifest(store, scalar, "application/json", name="scalar"),
    ]
    missing = cases[1].model_copy(
        update={
            "ref": f"artifact:{RUN_ID}/gone",
            "uri": cases[1].uri.replace(cases[1].sha256, "00" * 32),
        }
    )
    with caplog.at_level(logging.WARNING, logger="ergot_dagster.artifacts.preview"):
        for manifest in [*cases, missing]:
            assert artifact_preview(manifest, store.local_path) == {}
    logged = caplog.text
    assert "no preview for artifact:" in logged and "/big:" in logged and "limit" in logged
    assert "/broken: ffmpeg (preview) exited" in logged
    assert "/gone:" in logged and "missing from the artifact store" in logged


def test_manifest_metadata_carries_the_preview_but_keeps_the_manifest(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "p.jpg", size="320x240")
    manifest = _manifest(store, image, "image/jpeg", name="poster")
    preview = artifact_preview(manifest, store.local_path)
    metadata = manifest_metadata(manifest, {**preview, "sha256": "forged"})
    assert metadata[PREVIEW_KEY] == preview[PREVIEW_KEY]
    assert metadata["sha256"] == manifest.sha256, "a preview never replaces a manifest field"
    assert manifest_from_metadata(metadata) == manifest
    assert PREVIEW_KEY not in manifest_metadata(manifest)


def test_workflow_runs_record_previews_in_their_materializations(
    plane_settings: ErgotSettings, instance: DagsterInstance, ingest_root: Path, tmp_path: Path
) -> None:
    make_clip(ingest_root / "cam" / "take.mov", duration=3.0, size="640x360")
    outcomes = ingest_refs(
        ingest_root, ["cam/take.mov"], lambda key: latest_source_record(instance, key)
    )
    record_sources(instance, [o.record for o in outcomes if o.record])
    registry = load_registry(plane_settings.workflow_defs)
    assets = build_assets(registry)
    resources = build_definitions(plane_settings).resources
    metadata: dict[str, Any] = {}
    for workflow, settings in [("poster_extraction", {"width": 480}), ("frame_sampling", None)]:
        definition = registry.get(workflow)
        keys = [AssetKey([definition.family, definition.name, n]) for n in definition.outputs]
        result = materialize(
            assets,
            selection=keys,
            partition_key=ref_to_partition_key("cam/take.mov"),
            instance=instance,
            resources=resources,
            run_config=run_config_for(definition, settings, None),
        )
        assert result.success
        for event in result.get_asset_materialization_events():
            metadata[event.asset_key.path[-1]] = dict(event.materialization.metadata)
    poster, _ = _thumbnail(metadata["poster"])
    assert _frame_size(poster, tmp_path) == (320, 180)
    store = open_store(plane_settings.storage)
    info = manifest_from_metadata(metadata["poster_info"])
    assert info is not None
    sidecar = json.loads(store.local_path(info.uri).read_text())
    assert metadata["poster_info"][PREVIEW_KEY].value == sidecar
    _thumbnail(metadata["frames"])
    _thumbnail(metadata["contact_sheet"])
