"""Every FFmpeg workflow end to end: ingest, materialize, and check what a user would see.

Runs go through Dagster (`materialize` with the plane's own assets and resources) against a real
SQLite instance, real ffmpeg and real generated media. Artifacts are checked with ffprobe and
sha256; lineage is walked back to the ingested file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterUnknownPartitionError,
    materialize,
)

from ergot_dagster.artifacts.lineage import store_manifests, walk
from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.artifacts.metadata import manifest_from_metadata
from ergot_dagster.artifacts.store import LocalArtifactStore, open_store
from ergot_dagster.assets import build_assets
from ergot_dagster.definitions import build_definitions
from ergot_dagster.media.probe import probe
from ergot_dagster.media.synth import make_audio, make_clip
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import (
    SOURCE_PARTITIONS_NAME,
    latest_source_record,
    record_sources,
)
from ergot_dagster.workflows.loader import load_registry, publish
from ergot_dagster.workflows.run_config import run_config_for


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ingest(instance: DagsterInstance, root: Path, *refs: str) -> None:
    outcomes = ingest_refs(root, list(refs), lambda key: latest_source_record(instance, key))
    assert all(o.record for o in outcomes), [o.error for o in outcomes]
    record_sources(instance, [o.record for o in outcomes if o.recorded and o.record])


class Plane:
    """The assets and resources of one test plane, and a way to run a workflow on it."""

    def __init__(self, settings: ErgotSettings, instance: DagsterInstance) -> None:
        self.settings = settings
        self.instance = instance
        self.registry = load_registry(settings.workflow_defs)
        self.defs = build_definitions(settings)
        self.assets = build_assets(self.registry)
        self.store = open_store(settings.storage)
        assert isinstance(self.store, LocalArtifactStore)

    def run(
        self,
        workflow: str,
        ref: str,
        settings: dict[str, Any] | None = None,
        *,
        only: list[str] | None = None,
        inputs: dict[str, str] | None = None,
    ) -> Any:
        definition = self.registry.get(workflow)
        names = only or list(definition.outputs)
        keys = [AssetKey([definition.family, definition.name, n]) for n in names]
        return materialize(
            self.assets,
            selection=keys,
            partition_key=ref_to_partition_key(ref),
            instance=self.instance,
            resources=self.defs.resources,
            run_config=run_config_for(definition, settings, inputs),
            raise_on_error=False,
        )

    def manifests(self, result: Any) -> dict[str, ArtifactManifest]:
        return {m.name: m for m in self.store.list_run(result.run_id)}

    def path(self, manifest: ArtifactManifest) -> Path:
        return self.store.local_path(manifest.uri)

    def failure(self, result: Any) -> str:
        failures = [e for e in result.all_events if e.is_step_failure]
        assert failures, "the run was expected to fail"
        data = failures[0].step_failure_data
        return data.user_failure_data.description if data.user_failure_data else data.error.message

    def staging_is_empty(self) -> bool:
        return list((self.store.root / "tmp").iterdir()) == []


@pytest.fixture
def plane(plane_settings: ErgotSettings, instance: DagsterInstance) -> Plane:
    return Plane(plane_settings, instance)


def test_poster_skips_the_black_lead_in(plane: Plane, ingest_root: Path) -> None:
    make_clip(ingest_root / "cam" / "take 01.mov", duration=6.0, size="640x360", black_lead_s=1.5)
    _ingest(plane.instance, ingest_root, "cam/take 01.mov")
    result = plane.run("poster_extraction", "cam/take 01.mov", {"width": 480})
    assert result.success
    manifests = plane.manifests(result)
    poster, info = manifests["poster"], manifests["poster_info"]
    poster_path = plane.path(poster)
    assert poster.media_type == "image/jpeg" and poster.sha256 == _sha(poster_path)
    assert poster.size == poster_path.stat().st_size
    summary = probe(poster_path)
    assert (summary.video_streams[0].codec, summary.width) == ("mjpeg", 480)
    sidecar = json.loads(plane.path(info).read_text())
    assert sidecar["timestamp_s"] >= 1.5
    assert sidecar["reason"]
    record = latest_source_record(plane.instance, "cam/take 01.mov")
    assert record is not None
    assert [(p.kind, p.ref, p.sha256) for p in poster.parents] == [
        ("source", "cam/take 01.mov", record.sha256)
    ]
    assert poster.workflow == "core/poster_extraction@1"
    assert poster.runtime.type == "ffmpeg" and poster.runtime.job_id.startswith("pid:")
    # The materialization carries the manifest and the content hash as its data version.
    events = result.get_asset_materialization_events()
    by_key = {e.asset_key.to_user_string(): e for e in events}
    materialization = by_key["core/poster_extraction/poster"].materialization
    assert manifest_from_metadata(dict(materialization.metadata)) == poster
    assert materialization.tags["dagster/data_version"] == poster.sha256
    # What the stage decided and how long it took is recorded with the artifact.
    stage = materialization.metadata["stage_metadata"].value
    assert stage["stage"] == "extract" and stage["timestamp_s"] == sidecar["timestamp_s"]
    assert stage["elapsed_s"] > 0 and stage["job_id"] == poster.runtime.job_id
    assert plane.staging_is_empty()


def test_media_qc_report_and_checks(plane: Plane, ingest_root: Path) -> None:
    make_clip(ingest_root / "qc.mp4", duration=6.0, black_lead_s=1.5, freeze_at=3.0, freeze_s=2.5)
    _ingest(plane.instance, ingest_root, "qc.mp4")
    result = plane.run("media_qc", "qc.mp4", {"max_black_s": 1.0})
    assert result.success
    report = json.loads(plane.path(plane.manifests(result)["report"]).read_text())
    assert report["duration_s"] == pytest.approx(6.0, abs=0.1)
    assert report["video"]["width"] == 320 and report["video"]["frame_rate"] == 25
    assert report["black_segments"][0]["start_s"] == pytest.approx(0.0, abs=0.05)
    assert report["totals"]["black_s"] == pytest.approx(1.5, abs=0.1)
    assert report["frozen_segments"], "the 2.5 s freeze is found"
    assert report["loudness"]["integrated_lufs"] is not None
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) == {
        "duration_in_range",
        "loudness_in_range",
        "black_within_limit",
        "silence_within_limit",
        "frozen_within_limit",
    }
    assert not checks["black_within_limit"].passed, "1.5 s of black is over the 1.0 s limit"
    assert "over the 1 s limit" in checks["black_within_limit"].description
    assert checks["duration_in_range"].passed


def test_media_qc_of_audio_only(plane: Plane, ingest_root: Path) -> None:
    make_audio(ingest_root / "silence.wav", duration=3.0, silence=True)
    _ingest(plane.instance, ingest_root, "silence.wav")
    result = plane.run("media_qc", "silence.wav", {"require_audio": True})
    assert result.success
    report = json.loads(plane.path(plane.manifests(result)["report"]).read_text())
    assert report["video"] is None
    assert report["totals"]["silent_s"] == pytest.approx(3.0, abs=0.1)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["silence_within_limit"] is True  # 3 s is under the default 5 s
    assert checks["loudness_in_range"] is False  # digital silence has no measurable loudness


def test_review_proxy_two_artifacts_from_one_run(plane: Plane, ingest_root: Path) -> None:
    make_clip(ingest_root / "with audio.mov", duration=3.0, size="640x360")
    _ingest(plane.instance, ingest_root, "with audio.mov")
    result = plane.run("review_proxy", "with audio.mov", {"height": 180})
    assert result.success
    manifests = plane.manifests(result)
    proxy = probe(plane.path(manifests["proxy"]))
    assert manifests["proxy"].media_type == "video/mp4"
    assert [(s.type, s.codec) for s in proxy.streams] == [("video", "h264"), ("audio", "aac")]
    assert (proxy.width, proxy.height) == (320, 180)
    wav = probe(plane.path(manifests["audio"]))
    assert manifests["audio"].media_type == "audio/wav"
    assert (wav.audio_streams[0].codec, wav.audio_streams[0].sample_rate) == ("pcm_s16le", 48000)


def test_optional_artifact_absent_leaves_no_materialization(
    plane: Plane, ingest_root: Path
) -> None:
    make_clip(ingest_root / "silent film.mp4", duration=2.0, audio=False)
    _ingest(plane.instance, ingest_root, "silent film.mp4")
    result = plane.run("review_proxy", "silent film.mp4")
    assert result.success
    assert set(plane.manifests(result)) == {"proxy"}
    audio = plane.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(["core", "review_proxy", "audio"])), limit=10
    )
    assert audio.records == [], "an artifact that was not produced is not materialized"
    assert [s.type for s in probe(plane.path(plane.manifests(result)["proxy"])).streams] == [
        "video"
    ]


def test_frame_sampling_image_set_and_contact_sheet_lineage(
    plane: Plane, ingest_root: Path
) -> None:
    make_clip(ingest_root / "turntable.mp4", duration=4.0)
    _ingest(plane.instance, ingest_root, "turntable.mp4")
    result = plane.run("frame_sampling", "turntable.mp4", {"count": 5, "width": 160})
    assert result.success
    manifests = plane.manifests(result)
    frames, sheet = manifests["frames"], manifests["contact_sheet"]
    assert frames.kind == "set" and [m.name for m in frames.members] == [
        f"frame_{i:04d}.jpg" for i in range(1, 6)
    ]
    for member in frames.members:
        path = plane.store.local_path(member.uri)
        assert member.sha256 == _sha(path) and probe(path).width == 160
    assert frames.size == sum(m.size for m in frames.members)
    assert [p.ref for p in sheet.parents] == [frames.ref], "the sheet descends from the frames"
    tree = walk(
        sheet.ref,
        store_manifests(plane.store),
        lambda ref: latest_source_record(plane.instance, ref_to_partition_key(ref)),
    )
    source = tree.parents[0].parents[0]
    assert (source.kind, source.ref, source.status) == ("source", "turntable.mp4", "current")
    assert source.sha256 == _sha(ingest_root / "turntable.mp4")


def test_subset_materializes_only_what_was_asked(plane: Plane, ingest_root: Path) -> None:
    make_clip(ingest_root / "a.mp4", duration=3.0)
    _ingest(plane.instance, ingest_root, "a.mp4")
    result = plane.run("poster_extraction", "a.mp4", only=["poster_info"])
    assert result.success
    assert set(plane.manifests(result)) == {"poster_info"}
    assert [e.asset_key.path[-1] for e in result.get_asset_materialization_events()] == [
        "poster_info"
    ]


def test_bad_settings_fail_before_any_work(plane: Plane, ingest_root: Path) -> None:
    make_clip(ingest_root / "a.mp4", duration=1.0)
    _ingest(plane.instance, ingest_root, "a.mp4")
    result = plane.run("poster_extraction", "a.mp4", {"width": 5})
    assert not result.success
    assert "settings.width: 5 is less than the minimum of 16" in plane.failure(result)
    assert plane.manifests(result) == {}
    assert plane.staging_is_empty()


def test_wrong_media_type_is_refused(plane: Plane, ingest_root: Path) -> None:
    make_audio(ingest_root / "voice.wav", duration=1.0)
    _ingest(plane.instance, ingest_root, "voice.wav")
    result = plane.run("poster_extraction", "voice.wav")
    assert not result.success
    assert plane.failure(result) == (
        "poster_extraction@1: input 'source' (voice.wav) is audio/wav, but only video/* is accepted"
    )


def test_source_changed_since_ingest_is_refused(plane: Plane, ingest_root: Path) -> None:
    clip = make_clip(ingest_root / "a.mp4", duration=1.0)
    _ingest(plane.instance, ingest_root, "a.mp4")
    make_clip(clip, duration=2.0)
    result = plane.run("review_proxy", "a.mp4")
    assert not result.success
    assert "has changed since it was ingested" in plane.failure(result)


def test_touched_source_with_the_same_bytes_still_runs(plane: Plane, ingest_root: Path) -> None:
    clip = make_clip(ingest_root / "a.mp4", duration=1.0)
    _ingest(plane.instance, ingest_root, "a.mp4")
    os.utime(clip, ns=(1_000_000_000, 1_000_000_000))  # a sync that does not keep mtimes
    result = plane.run("review_proxy", "a.mp4")
    assert result.success
    assert plane.manifests(result)["proxy"].parents[0].sha256 == _sha(clip)


def test_same_size_different_bytes_is_refused(plane: Plane, ingest_root: Path) -> None:
    clip = make_clip(ingest_root / "a.mp4", duration=1.0)
    _ingest(plane.instance, ingest_root, "a.mp4")
    data = bytearray(clip.read_bytes())
    data[-100] ^= 0xFF
    clip.write_bytes(bytes(data))
    result = plane.run("review_proxy", "a.mp4")
    assert not result.success
    assert "has changed since it was ingested" in plane.failure(result)


def test_source_not_ingested_is_refused(plane: Plane, ingest_root: Path) -> None:
    make_clip(ingest_root / "a.mp4", duration=1.0)
    with pytest.raises(DagsterUnknownPartitionError):
        plane.run("review_proxy", "a.mp4")
    # A partition added by hand (e.g. from the UI) has no ingest record to process.
    plane.instance.add_dynamic_partitions(SOURCE_PARTITIONS_NAME, ["a.mp4"])
    result = plane.run("review_proxy", "a.mp4")
    assert not result.success
    assert "'a.mp4' has not been ingested" in plane.failure(result)


def _custom_defs(tmp_path: Path, mutate: Any) -> Path:
    """A copy of the repository's definitions with frame_sampling changed and re-published."""
    defs = tmp_path / "defs"
    shutil.copytree(PROJECT_ROOT / "workflow_defs", defs)
    (defs / "workflows.lock").unlink()
    path = defs / "photogrammetry" / "frame_sampling.v1.yaml"
    data = yaml.safe_load(path.read_text())
    mutate(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    publish(defs)
    return defs


def test_partial_success_keeps_the_artifacts_already_made(
    plane: Plane, ingest_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def break_sheet(data: dict[str, Any]) -> None:
        data["plan"][1]["params"]["columns"] = 1000  # the recipe allows at most 64

    monkeypatch.setenv("ERGOT_WORKFLOW_DEFS", str(_custom_defs(tmp_path, break_sheet)))
    broken = Plane(ErgotSettings.from_env(), plane.instance)
    make_clip(ingest_root / "a.mp4", duration=2.0)
    _ingest(plane.instance, ingest_root, "a.mp4")
    result = broken.run("frame_sampling", "a.mp4", {"count": 3, "width": 64})
    assert not result.success
    assert "parameter 'columns' must be in 1..64" in broken.failure(result)
    assert set(broken.manifests(result)) == {"frames"}
    materialized = [e.asset_key.path[-1] for e in result.get_asset_materialization_events()]
    assert materialized == ["frames"]
    assert broken.staging_is_empty()


def test_a_stage_that_overruns_its_timeout_fails_clearly(
    plane: Plane, ingest_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tiny_timeout(data: dict[str, Any]) -> None:
        data["plan"][0]["timeout_s"] = 0.001

    monkeypatch.setenv("ERGOT_WORKFLOW_DEFS", str(_custom_defs(tmp_path, tiny_timeout)))
    slow = Plane(ErgotSettings.from_env(), plane.instance)
    make_clip(ingest_root / "a.mp4", duration=2.0)
    _ingest(plane.instance, ingest_root, "a.mp4")
    result = slow.run("frame_sampling", "a.mp4", {"count": 3})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert "did not finish within" in failure.user_failure_data.description
    assert failure.user_failure_data.metadata["retryable"].value is True
    assert slow.manifests(result) == {}
    assert slow.staging_is_empty()


def test_two_published_versions_run_side_by_side(
    plane: Plane, ingest_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defs = tmp_path / "versions"
    shutil.copytree(PROJECT_ROOT / "workflow_defs", defs)
    v2 = yaml.safe_load((defs / "core" / "poster_extraction.v1.yaml").read_text())
    v2["version"] = 2
    v2["settings"]["properties"]["width"]["default"] = 200
    (defs / "core" / "poster_extraction.v2.yaml").write_text(yaml.safe_dump(v2, sort_keys=False))
    assert [d.spec for d in publish(defs)] == ["poster_extraction@2"]
    monkeypatch.setenv("ERGOT_WORKFLOW_DEFS", str(defs))
    both = Plane(ErgotSettings.from_env(), plane.instance)
    make_clip(ingest_root / "a.mp4", duration=3.0, size="640x360")
    _ingest(plane.instance, ingest_root, "a.mp4")

    latest = both.run("poster_extraction", "a.mp4")
    pinned = both.run("poster_extraction@1", "a.mp4")
    assert latest.success and pinned.success
    new, old = both.manifests(latest)["poster"], both.manifests(pinned)["poster"]
    assert (new.workflow, probe(both.path(new)).width) == ("core/poster_extraction@2", 200)
    assert (old.workflow, probe(both.path(old)).width) == ("core/poster_extraction@1", 640)
