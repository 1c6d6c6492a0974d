"""Ingest from `ergot ingest` and from the ingest sensor, on real generated media."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import AssetRecordsFilter, DagsterInstance, build_sensor_context

from ergot_dagster.cli import main
from ergot_dagster.media.synth import make_audio, make_clip, make_image
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.resources.source_root import SourceRootResource
from ergot_dagster.sensors.ingest_sensor import ingest_sensor
from ergot_dagster.sources.ingest import MIN_RECORD_BATCH
from ergot_dagster.sources.record import (
    SOURCE_KEY,
    SOURCE_PARTITIONS_NAME,
    SourceRecord,
    SourceRecordLookup,
    latest_source_record,
    latest_source_records,
    record_sources,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ingest(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["ingest", "--json", *args])
    return result.exit_code, json.loads(result.stdout)


def _materializations(instance: DagsterInstance, ref: str) -> int:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=SOURCE_KEY, asset_partitions=[ref_to_partition_key(ref)]),
        limit=100,
    ).records
    return len(records)


def test_ingest_records_hash_type_and_probe(ingest_root: Path, instance: DagsterInstance) -> None:
    clip = make_clip(ingest_root / "camA" / "2026-11-24" / "take 01.mov", duration=2.0)
    wav = make_audio(ingest_root / "audio" / "tone.wav", duration=1.5)
    still = make_image(ingest_root / "stills" / "portrait.jpg")
    code, out = _ingest(str(clip), str(wav), str(still))
    assert code == 0, out
    by_ref = {item["ref"]: item for item in out["ingested"]}
    assert by_ref["camA/2026-11-24/take 01.mov"]["sha256"] == _sha(clip)
    assert by_ref["camA/2026-11-24/take 01.mov"]["media_type"] == "video/quicktime"
    assert by_ref["audio/tone.wav"]["media_type"] == "audio/wav"
    assert by_ref["stills/portrait.jpg"]["media_type"] == "image/jpeg"
    assert set(instance.get_dynamic_partitions(SOURCE_PARTITIONS_NAME)) == set(by_ref)

    record = latest_source_record(instance, "camA/2026-11-24/take 01.mov")
    assert record is not None
    assert record.sha256 == _sha(clip) and record.size == clip.stat().st_size
    assert record.probe.duration_s == pytest.approx(2.0, abs=0.1)
    video = record.probe.video_streams[0]
    assert (video.codec, video.width, video.height, video.frame_rate) == ("h264", 320, 180, 25.0)
    assert record.probe.audio_streams[0].sample_rate == 48000
    assert record.uri == clip.resolve().as_uri()


def test_unchanged_files_record_nothing_and_changed_files_a_new_version(
    ingest_root: Path, instance: DagsterInstance
) -> None:
    clip = make_clip(ingest_root / "a.mp4", duration=1.0)
    assert _ingest(str(clip))[1]["ingested"][0]["status"] == "new"
    assert _ingest(str(clip))[1]["ingested"][0]["status"] == "unchanged"
    os.utime(clip)  # touched, same bytes
    assert _ingest(str(clip))[1]["ingested"][0]["status"] == "unchanged"
    assert _materializations(instance, "a.mp4") == 1
    first = _sha(clip)
    make_clip(clip, duration=1.5)
    out = _ingest(str(clip))[1]["ingested"][0]
    assert out["status"] == "changed" and out["sha256"] == _sha(clip) != first
    assert _materializations(instance, "a.mp4") == 2


def test_odd_names_become_reversible_partition_keys(
    ingest_root: Path, instance: DagsterInstance
) -> None:
    names = [
        "interview, take 3 — café.mov",
        "wait... what.mp4",
        "日本 撮影.mp4",
        "[b-roll] 50%.mov",
    ]
    paths = [make_clip(ingest_root / "odd" / n, duration=0.5, audio=False) for n in names]
    code, out = _ingest(str(ingest_root / "odd"))
    assert code == 0
    assert sorted(i["ref"] for i in out["ingested"]) == sorted(f"odd/{n}" for n in names)
    keys = instance.get_dynamic_partitions(SOURCE_PARTITIONS_NAME)
    assert "odd/interview%2C take 3 — café.mov" in keys
    assert "odd/wait%2E%2E%2E what.mp4" in keys
    assert "odd/日本 撮影.mp4" in keys
    for path in paths:
        record = latest_source_record(instance, ref_to_partition_key(f"odd/{path.name}"))
        assert record is not None and record.ref == f"odd/{path.name}"


def test_bad_files_are_refused_and_the_rest_ingested(
    ingest_root: Path, instance: DagsterInstance, tmp_path: Path
) -> None:
    good = make_clip(ingest_root / "good.mp4", duration=0.5)
    corrupt = ingest_root / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(4096))
    outside = make_clip(tmp_path / "outside.mp4", duration=0.5)
    os.symlink(outside, ingest_root / "sneaky.mp4")
    result = CliRunner().invoke(
        main, ["ingest", str(good), str(corrupt), str(ingest_root / "sneaky.mp4"), str(outside)]
    )
    assert result.exit_code == 1
    assert f"{_sha(good)}  good.mp4  (new, video/mp4)" in result.stdout
    assert "refused corrupt.mp4: corrupt.mp4: not readable media" in result.stderr
    assert "refused sneaky.mp4: source ref 'sneaky.mp4' resolves outside the ingest root" in (
        result.stderr
    )
    assert f"refused {outside}: {outside} is not inside the ingest root" in result.stderr
    assert instance.get_dynamic_partitions(SOURCE_PARTITIONS_NAME) == ["good.mp4"]


def test_ingest_root_option(tmp_path: Path, instance: DagsterInstance) -> None:
    other = tmp_path / "elsewhere"
    clip = make_clip(other / "x" / "y.mp4", duration=0.5)
    code, out = _ingest("--root", str(other), str(clip))
    assert code == 0 and out["ingested"][0]["ref"] == "x/y.mp4"
    record = latest_source_record(instance, "x/y.mp4")
    assert record is not None and record.root == str(other.resolve())


def test_sensor_ingests_new_and_changed_files_once(
    ingest_root: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERGOT_INGEST_SETTLE_S", "0")
    make_clip(ingest_root / "cam" / "one.mp4", duration=0.5)
    make_image(ingest_root / "cam" / "two.jpg")
    (ingest_root / ".hidden.mp4").write_bytes(b"skip me")
    (ingest_root / "notes.txt").write_text("not media")
    resources = {"sources": SourceRootResource(root=str(ingest_root))}

    context = build_sensor_context(instance=instance, resources=resources)
    result = ingest_sensor(context)
    added = [
        key for request in result.dynamic_partitions_requests for key in request.partition_keys
    ]
    assert sorted(added) == ["cam/one.mp4", "cam/two.jpg"]
    records = [SourceRecord.model_validate(e.metadata["record"].value) for e in result.asset_events]
    assert {r.ref: r.sha256 for r in records} == {
        "cam/one.mp4": _sha(ingest_root / "cam" / "one.mp4"),
        "cam/two.jpg": _sha(ingest_root / "cam" / "two.jpg"),
    }
    # What the daemon does with the result, so the next tick sees it.
    record_sources(instance, records)

    context = build_sensor_context(instance=instance, resources=resources, cursor=result.cursor)
    again = ingest_sensor(context)
    assert not again.asset_events and not again.dynamic_partitions_requests
    assert "notes.txt" in again.cursor, "a refused file is remembered, not re-probed every tick"

    make_clip(ingest_root / "cam" / "one.mp4", duration=1.0)
    context = build_sensor_context(instance=instance, resources=resources, cursor=again.cursor)
    changed = ingest_sensor(context)
    assert [e.partition for e in changed.asset_events] == ["cam/one.mp4"]


def test_sensor_waits_for_files_to_settle(
    ingest_root: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERGOT_INGEST_SETTLE_S", "3600")
    make_clip(ingest_root / "copying.mp4", duration=0.5)
    context = build_sensor_context(
        instance=instance, resources={"sources": SourceRootResource(root=str(ingest_root))}
    )
    result = ingest_sensor(context)
    assert not result.asset_events


def test_folder_ingest_records_each_file_once_across_batches(
    ingest_root: Path, instance: DagsterInstance
) -> None:
    # More files than one record batch, with refused files among them, so that the pipelined
    # path (probe in a thread, records written in batches) goes through several batches.
    folder = ingest_root / "many"
    for index in range(MIN_RECORD_BATCH + 5):
        make_audio(folder / f"tone_{index:02d}.wav", duration=0.2, tone_hz=300.0 + 10 * index)
    (folder / "tone_03b.wav").write_bytes(os.urandom(2048))
    (folder / "tone_17b.wav").write_text("not media")
    good = sorted(p for p in folder.iterdir() if p.stat().st_size > 4096)

    result = CliRunner().invoke(main, ["ingest", "--json", str(folder)])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert [(i["ref"], i["status"]) for i in out["ingested"]] == [
        (f"many/{p.name}", "new") for p in good
    ]
    assert sorted(r["path"] for r in out["refused"]) == ["many/tone_03b.wav", "many/tone_17b.wav"]
    assert all("not readable media" in r["error"] for r in out["refused"])
    keys = [f"many/{p.name}" for p in good]
    assert sorted(instance.get_dynamic_partitions(SOURCE_PARTITIONS_NAME)) == keys

    lookup = SourceRecordLookup(instance, [*keys, "many/tone_03b.wav", "never/seen.wav"])
    for path in good:
        ref = f"many/{path.name}"
        stored = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=SOURCE_KEY, asset_partitions=[ref]), limit=10
        ).records
        assert len(stored) == 1
        record = latest_source_record(instance, ref)
        assert record is not None and record.sha256 == _sha(path)
        assert lookup(ref) == record
        expected = record.materialization()
        materialization = stored[0].asset_materialization
        assert materialization is not None
        assert materialization.metadata == expected.metadata
        assert materialization.tags == expected.tags
    assert lookup("many/tone_03b.wav") is None and lookup("never/seen.wav") is None
    # Asked again (a caller that repeats a ref), a key is read afresh rather than answered None.
    assert lookup(f"many/{good[0].name}") == latest_source_record(instance, f"many/{good[0].name}")

    make_audio(good[-1], duration=0.3, tone_hz=1234.0)
    again = json.loads(CliRunner().invoke(main, ["ingest", "--json", str(folder)]).stdout)
    statuses = {i["ref"]: i["status"] for i in again["ingested"]}
    assert statuses.pop(f"many/{good[-1].name}") == "changed"
    assert set(statuses.values()) == {"unchanged"}
    assert _materializations(instance, f"many/{good[0].name}") == 1
    assert _materializations(instance, f"many/{good[-1].name}") == 2
    assert latest_source_records(instance, keys)[f"many/{good[-1].name}"].sha256 == _sha(good[-1])
