"""The code location as the UI shows it: assets, groups, lineage edges, metadata, checks, sensor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, DagsterInstance, materialize

from ergot_dagster.assets.source import ergot_source
from ergot_dagster.definitions import build_definitions
from ergot_dagster.media.synth import make_clip
from ergot_dagster.resources.source_root import SourceRootResource
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import (
    SOURCE_KEY,
    latest_source_record,
    record_sources,
)
from ergot_dagster.targets.config import load_targets
from ergot_dagster.workflows.loader import load_registry
from tests.conftest import subprocess_env


def test_asset_graph_from_workflow_definitions(plane_settings: ErgotSettings) -> None:
    defs = build_definitions(plane_settings)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    registry = load_registry(plane_settings.workflow_defs)
    expected_keys = {"ergot/source", "ergot/library", "runtime/ffmpeg-local"} | {
        f"{d.family}/{d.name}/{artifact}" for d in registry.all() for artifact in d.outputs
    }
    # Every other asset is an artifact of a loaded workflow or a runtime target.
    assert keys == expected_keys | {k for k in keys if k.startswith("runtime/")}
    assert keys >= {
        "ergot/source",
        "core/poster_extraction/poster",
        "core/poster_extraction/poster_info",
        "core/media_qc/report",
        "core/review_proxy/proxy",
        "core/review_proxy/audio",
        "photogrammetry/frame_sampling/frames",
        "photogrammetry/frame_sampling/contact_sheet",
    }
    poster = graph.get(AssetKey(["core", "poster_extraction", "poster"]))
    assert poster.group_name == "core"
    assert poster.code_version == "1"
    assert SOURCE_KEY in poster.parent_keys
    assert poster.partitions_def is not None and poster.partitions_def.name == "source_assets"
    metadata = poster.metadata
    assert metadata["workflow"] == "core/poster_extraction@1"
    assert metadata["media_type"] == "image/jpeg"
    assert metadata["runtime"] == "ffmpeg"
    assert "video.decode" in metadata["capabilities"]
    assert metadata["settings_schema"].value["properties"]["width"]["default"] == 640
    sheet = graph.get(AssetKey(["photogrammetry", "frame_sampling", "contact_sheet"]))
    assert sheet.group_name == "photogrammetry"
    checks = {key.name for key in graph.asset_check_keys if key.asset_key.path[0] == "core"}
    runtime_checks = {
        key.asset_key.to_user_string()
        for key in graph.asset_check_keys
        if key.asset_key.path[0] == "runtime"
    }
    configured = load_targets(plane_settings.runtime_targets).targets
    assert runtime_checks == {f"runtime/{target.name}" for target in configured}
    assert checks == {
        "duration_in_range",
        "loudness_in_range",
        "black_within_limit",
        "silence_within_limit",
        "frozen_within_limit",
    }
    assert [s.name for s in defs.sensors] == ["ingest_sensor", "request_inbox", "runtime_health"]
    assert set(defs.resources) >= {
        "artifact_store",
        "sources",
        "runtime_ffmpeg",
        "target_ffmpeg_local",
    }


def test_materializing_a_source_partition_records_it_again(
    plane_settings: ErgotSettings, instance: DagsterInstance, ingest_root: Path
) -> None:
    make_clip(ingest_root / "a.mp4", duration=1.0)
    outcomes = ingest_refs(ingest_root, ["a.mp4"], lambda k: latest_source_record(instance, k))
    record_sources(instance, [o.record for o in outcomes if o.record])
    make_clip(ingest_root / "a.mp4", duration=2.0)  # changed on disk since
    result = materialize(
        [ergot_source],
        partition_key="a.mp4",
        instance=instance,
        resources={"sources": SourceRootResource(root=str(ingest_root))},
    )
    assert result.success
    record = latest_source_record(instance, "a.mp4")
    assert record is not None and record.probe.duration_s and record.probe.duration_s > 1.5


def test_loading_the_code_location_leaves_adapter_libraries_unloaded(
    plane_settings: ErgotSettings,
) -> None:
    # Every run worker loads the code location; a run that uses no face, voice or reconstruction
    # stage should not import numpy, Pillow or pycolmap on the way (they load where used).
    env = {**subprocess_env(plane_settings), "PYTHONPATH": str(PROJECT_ROOT)}
    probe = (
        "import sys, ergot_dagster.definitions; "
        "print(sorted(m for m in ('numpy', 'PIL', 'pycolmap', 'boto3') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
