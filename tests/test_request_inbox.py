"""The request inbox sensor on real parts: a real instance, real generated media, real ingest.

Ticks are evaluated the way the daemon evaluates them (`evaluate_tick`, which resolves each
RunRequest against the sensor's asset selection and the code location), and the run a RunRequest
asks for is created in the instance as the daemon creates it, tagged with its run key. The last
test runs `dagster dev` and lets the real daemon do all of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    DagsterInstance,
    Definitions,
    RunRequest,
    build_sensor_context,
)
from dagster._core.definitions.sensor_definition import SensorExecutionData
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

from ergot_dagster.client.models import InboxOutcome
from ergot_dagster.definitions import build_definitions
from ergot_dagster.media.synth import make_audio, make_clip
from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.idempotency import first_run_of_request
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.resources.artifact_store import ArtifactStoreResource
from ergot_dagster.resources.targets import RuntimeTargetsResource
from ergot_dagster.sensors.request_inbox import (
    MAX_FILE_BYTES,
    MAX_FILES_PER_TICK,
    request_inbox,
    write_outcome,
)
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from tests.conftest import subprocess_env
from tests.support import dagster_dev, until


def _request(request_id: str = "r-1", **fields: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "workflow": "poster_extraction",
        "sources": {"primary": "cam/a.mp4"},
        **fields,
    }


def _outcome(inbox: Path, name: str) -> InboxOutcome | None:
    path = inbox / name.replace(".json", ".outcome.json")
    return InboxOutcome.model_validate_json(path.read_text()) if path.exists() else None


@dataclass
class Plane:
    """One private plane with an inbox, and the sensor ticked against it."""

    instance: DagsterInstance
    inbox: Path
    settings: ErgotSettings
    defs: Definitions
    cursor: str | None = None

    def drop(self, name: str, content: dict[str, Any] | list[Any] | str | bytes) -> Path:
        path = self.inbox / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
        return path

    def tick(self) -> SensorExecutionData:
        context = build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            resources={
                "artifact_store": ArtifactStoreResource(location=self.settings.storage),
                "runtime_targets": RuntimeTargetsResource(path=str(self.settings.runtime_targets)),
            },
            definitions=self.defs,
        )
        result = request_inbox.evaluate_tick(context)
        self.cursor = result.cursor
        return result

    def create_run(self, run_request: RunRequest) -> DagsterRun:
        """Create the run for `run_request` as the sensor daemon does: its tags plus the run key."""
        assert run_request.job_name and run_request.asset_selection is not None
        return self.instance.create_run_for_job(
            self.defs.resolve_job_def(run_request.job_name),
            run_config=run_request.run_config,
            tags={**run_request.tags, RUN_KEY_TAG: run_request.run_key or ""},
            asset_selection=frozenset(run_request.asset_selection),
        )

    def outcome(self, name: str) -> InboxOutcome | None:
        return _outcome(self.inbox, name)

    def decided(self, name: str) -> InboxOutcome:
        found = self.outcome(name)
        assert found is not None, f"no outcome for {name}"
        return found


@pytest.fixture
def plane(
    plane_settings: ErgotSettings,
    instance: DagsterInstance,
    ingest_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Plane:
    inbox = plane_settings.home / "requests"
    inbox.mkdir()
    monkeypatch.setenv("ERGOT_REQUEST_INBOX", str(inbox))
    monkeypatch.setenv("ERGOT_INBOX_SETTLE_S", "0")
    make_clip(ingest_root / "cam" / "a.mp4", duration=1.0)
    make_audio(ingest_root / "cam" / "voice.wav", duration=1.0)
    outcomes = ingest_refs(
        ingest_root, ["cam/a.mp4", "cam/voice.wav"], lambda key: latest_source_record(instance, key)
    )
    record_sources(instance, [o.record for o in outcomes if o.record])
    settings = ErgotSettings.from_env()
    assert settings.request_inbox == inbox
    return Plane(instance, inbox, settings, build_definitions(settings))


def test_inbox_defaults_under_ergot_home(plane_settings: ErgotSettings) -> None:
    assert plane_settings.request_inbox == plane_settings.home / "inbox"


def test_a_valid_request_becomes_one_run_and_its_outcome_names_it(plane: Plane) -> None:
    request = _request("qc-1", workflow="media_qc", priority=5, settings={"max_black_s": 2})
    plane.drop("qc-1.json", request)

    first = plane.tick()
    assert len(first.run_requests) == 1
    asked = first.run_requests[0]
    assert asked.run_key == "qc-1"
    assert asked.job_name == "__ASSET_JOB"
    assert asked.partition_key == "cam/a.mp4"
    assert asked.asset_selection == [AssetKey(["core", "media_qc", "report"])]
    assert asked.asset_check_keys and all(
        isinstance(k, AssetCheckKey) and k.asset_key == AssetKey(["core", "media_qc", "report"])
        for k in asked.asset_check_keys
    )
    expected_sha = ProcessingRequest.model_validate(request).sha256
    assert asked.tags[T.REQUEST_ID] == "qc-1"
    assert asked.tags[T.REQUEST_SHA256] == expected_sha
    assert asked.tags[T.WORKFLOW] == "media_qc@1"
    assert asked.tags[T.PARTITION] == "cam/a.mp4"
    assert asked.tags[T.PRIORITY] == "5"
    assert asked.tags[SENSOR_NAME_TAG] == "request_inbox"
    assert asked.run_config["ops"]["core__media_qc"]["config"]["settings"] == {"max_black_s": 2}
    # The run id is not known until the daemon has created the run.
    assert plane.outcome("qc-1.json") is None

    # A tick before the run exists (the daemon failed to create it, say) asks again under the
    # same run key, which the daemon never turns into a second run.
    again = plane.tick()
    assert [r.run_key for r in again.run_requests] == ["qc-1"]

    run = plane.create_run(asked)
    found = first_run_of_request(plane.instance, "qc-1")
    assert found is not None and found.run_id == run.run_id
    decided = plane.tick()
    assert not decided.run_requests
    outcome = plane.decided("qc-1.json")
    assert outcome.status == "accepted"
    assert (outcome.file, outcome.request_id, outcome.run_id) == ("qc-1.json", "qc-1", run.run_id)
    assert outcome.existing is False and outcome.reason is None
    assert json.loads(plane.cursor or "{}")["pending"] == {}

    # Decided once: later ticks leave the outcome as it is.
    path = plane.inbox / "qc-1.outcome.json"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    plane.tick()
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_a_request_dropped_twice_starts_one_run(plane: Plane) -> None:
    plane.drop("a.json", _request("twice"))
    plane.drop("b.json", _request("twice"))
    first = plane.tick()
    assert [r.run_key for r in first.run_requests] == ["twice"]
    run = plane.create_run(first.run_requests[0])

    second = plane.tick()
    assert not second.run_requests
    a, b = plane.decided("a.json"), plane.decided("b.json")
    assert (a.status, a.run_id) == ("accepted", run.run_id)
    assert (b.status, b.run_id) == ("accepted", run.run_id)
    assert [a.existing, b.existing].count(False) == 1, "exactly one file made the run"

    # Dropped again much later, under another name: the same run, no new one.
    plane.drop("c.json", _request("twice"))
    third = plane.tick()
    assert not third.run_requests
    c = plane.decided("c.json")
    assert (c.status, c.run_id, c.existing) == ("accepted", run.run_id, True)


def test_a_used_request_id_with_different_content_is_rejected_naming_the_run(
    plane: Plane,
) -> None:
    # In one tick: the second file waits for the first one's run, then is judged against it.
    plane.drop("one.json", _request("same-id", settings={"width": 320}))
    plane.drop("two.json", _request("same-id", settings={"width": 480}))
    first = plane.tick()
    assert len(first.run_requests) == 1
    run = plane.create_run(first.run_requests[0])
    plane.tick()
    both = [plane.decided("one.json"), plane.decided("two.json")]
    assert sorted(o.status for o in both) == ["accepted", "rejected"]
    rejected = next(o for o in both if o.status == "rejected")
    assert rejected.request_id == "same-id" and rejected.run_id is None
    assert rejected.reason == (
        f"request id 'same-id' was already used for a different request (run {run.run_id}); "
        "use a new request id"
    )

    # In a later tick, against a run that already exists.
    plane.drop("three.json", _request("same-id", priority=9))
    assert not plane.tick().run_requests
    three = plane.decided("three.json")
    assert three.status == "rejected" and run.run_id in (three.reason or "")


def test_bad_files_are_rejected_with_their_reason_and_the_valid_one_still_runs(
    plane: Plane, tmp_path: Path
) -> None:
    plane.drop("good.json", _request("good"))
    plane.drop("broken.json", '{"request_id": "x", ')
    plane.drop("no-sources.json", {"request_id": "no-sources", "workflow": "poster_extraction"})
    plane.drop("unknown.json", _request("unknown", workflow="posterz"))
    plane.drop("settings.json", _request("bad-settings", settings={"width": 1}))
    plane.drop("never.json", _request("never", sources={"primary": "cam/none.mp4"}))
    plane.drop("audio.json", _request("audio", sources={"primary": "cam/voice.wav"}))
    plane.drop("array.json", [_request("in-a-list")])
    plane.drop("latin1.json", b'{"request_id": "caf\xe9"}')
    plane.drop("nan.json", '{"request_id": "n", "timeout_s": NaN}')
    plane.drop("huge.json", json.dumps(_request("huge", context={"x": "y" * MAX_FILE_BYTES})))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(_request("outside")))
    (plane.inbox / "link.json").symlink_to(outside)
    (plane.inbox / "loop.json").symlink_to(plane.inbox / "loop.json")

    result = plane.tick()
    assert [r.run_key for r in result.run_requests] == ["good"]
    reasons = {}
    for name in [
        "broken.json",
        "no-sources.json",
        "unknown.json",
        "settings.json",
        "never.json",
        "audio.json",
        "array.json",
        "latin1.json",
        "nan.json",
        "huge.json",
        "link.json",
        "loop.json",
    ]:
        outcome = plane.decided(name)
        assert outcome.status == "rejected" and outcome.run_id is None, outcome
        assert outcome.file == name
        reasons[name] = (outcome.request_id, outcome.reason)

    assert reasons["broken.json"] == (
        None,
        "not valid JSON: Expecting property name enclosed in double quotes (line 1, column 21)",
    )
    assert reasons["no-sources.json"] == ("no-sources", "invalid request: sources: Field required")
    assert reasons["unknown.json"][0] == "unknown"
    assert (reasons["unknown.json"][1] or "").startswith("unknown workflow 'posterz'; known")
    assert reasons["settings.json"] == (
        "bad-settings",
        "poster_extraction@1: invalid settings: settings.width: 1 is less than the minimum of 16",
    )
    assert reasons["never.json"] == (
        "never",
        "source 'cam/none.mp4' has not been ingested; run `ergot ingest` on it first",
    )
    assert "is audio/wav, but only video/* is accepted" in (reasons["audio.json"][1] or "")
    assert reasons["array.json"] == (
        None,
        "expected a JSON object (a processing request), got an array",
    )
    assert (reasons["latin1.json"][1] or "").startswith("not UTF-8 text: invalid continuation")
    assert reasons["nan.json"] == (None, "not valid JSON: NaN is not allowed in a request")
    assert reasons["huge.json"][1] == (
        f"the file is {(plane.inbox / 'huge.json').stat().st_size} bytes; "
        f"the limit is {MAX_FILE_BYTES}"
    )
    assert reasons["link.json"][1] == "the request file is a symlink to a file outside the inbox"
    assert (reasons["loop.json"][1] or "").startswith("the request file is a symlink that cannot")
    # Nothing was written anywhere but the inbox.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ergot") == ["outside.json"]
    assert not list(plane.inbox.glob(".*")), "no temporary files are left behind"

    plane.create_run(result.run_requests[0])
    plane.tick()
    assert plane.decided("good.json").status == "accepted"


def test_files_still_being_written_hidden_files_and_outcomes_are_left_alone(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERGOT_INBOX_SETTLE_S", "60")
    fresh = plane.drop("fresh.json", _request("fresh"))
    plane.drop(".hidden.json", _request("hidden"))
    plane.drop("notes.txt", "not a request")
    plane.drop("orphan.outcome.json", _request("orphan"))
    (plane.inbox / "folder.json").mkdir()

    result = plane.tick()
    assert not result.run_requests and plane.outcome("fresh.json") is None

    # Written a minute ago: settled now.
    an_hour_ago = fresh.stat().st_mtime - 3600
    for name in ["fresh.json", ".hidden.json", "orphan.outcome.json"]:
        os.utime(plane.inbox / name, (an_hour_ago, an_hour_ago))
    result = plane.tick()
    assert [r.run_key for r in result.run_requests] == ["fresh"]
    assert sorted(p.name for p in plane.inbox.iterdir()) == [
        ".hidden.json",
        "folder.json",
        "fresh.json",
        "notes.txt",
        "orphan.outcome.json",
    ]


def test_an_outcome_once_written_is_never_rewritten(plane: Plane) -> None:
    path = plane.drop("late.json", "not yet json")
    plane.tick()
    first = plane.decided("late.json")
    assert first.status == "rejected"
    before = (plane.inbox / "late.outcome.json").read_bytes()

    # The consumer fixes the file in place: the decision stands; a new file is a new decision.
    path.write_text(json.dumps(_request("late")))
    assert not plane.tick().run_requests
    assert (plane.inbox / "late.outcome.json").read_bytes() == before
    other = first.model_copy(update={"status": "accepted", "reason": None})
    assert write_outcome(plane.inbox, other) is False
    assert (plane.inbox / "late.outcome.json").read_bytes() == before


def test_work_per_tick_is_bounded(plane: Plane) -> None:
    for i in range(MAX_FILES_PER_TICK + 5):
        plane.drop(f"junk-{i:03}.json", "[")
    result = plane.tick()
    outcomes = list(plane.inbox.glob("*.outcome.json"))
    assert len(outcomes) == MAX_FILES_PER_TICK
    assert "5 file(s) left for the next tick" in (result.skip_message or "")
    plane.tick()
    assert len(list(plane.inbox.glob("*.outcome.json"))) == MAX_FILES_PER_TICK + 5


def test_a_missing_inbox_is_a_skip_not_an_error(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERGOT_REQUEST_INBOX", str(plane.inbox / "nowhere"))
    result = plane.tick()
    assert not result.run_requests
    assert "does not exist" in (result.skip_message or "")


@pytest.mark.slow
def test_the_daemon_runs_a_dropped_request_once(
    plane_settings: ErgotSettings, ingest_root: Path, tmp_path: Path
) -> None:
    # The repository's instance config, as `make dev` uses it (queued run coordinator).
    (plane_settings.dagster_home / "dagster.yaml").write_text(
        (PROJECT_ROOT / "dagster.yaml").read_text()
    )
    inbox = plane_settings.home / "inbox"
    inbox.mkdir()
    make_clip(ingest_root / "cam" / "a.mp4", duration=2.0)
    env = subprocess_env(plane_settings)
    env.update(
        {
            "ERGOT_INGEST_INTERVAL_S": "1",
            "ERGOT_INGEST_SETTLE_S": "0",
            "ERGOT_INBOX_INTERVAL_S": "1",
            "ERGOT_INBOX_SETTLE_S": "0",
            "ERGOT_REQUEST_INBOX": str(inbox),
        }
    )
    with (
        dagster_dev(plane_settings.home, env, tmp_path / "dagster-dev.log"),
        DagsterInstance.from_config(str(plane_settings.dagster_home)) as instance,
    ):
        until(
            "the ingest sensor to record the clip",
            lambda: latest_source_record(instance, "cam/a.mp4"),
        )
        (inbox / "first.json").write_text(json.dumps(_request("e2e", settings={"width": 160})))
        (inbox / "again.json").write_text(json.dumps(_request("e2e", settings={"width": 160})))
        (inbox / "bad.json").write_text(json.dumps(_request("e2e-bad", workflow="nope")))

        first = until("the accepted outcome", lambda: _outcome(inbox, "first.json"))
        again = until("the second file's outcome", lambda: _outcome(inbox, "again.json"))
        bad = until("the rejected outcome", lambda: _outcome(inbox, "bad.json"))
        assert first.status == again.status == "accepted"
        assert first.run_id == again.run_id and first.run_id
        assert (first.existing, again.existing) == (False, True)
        assert bad.status == "rejected" and "unknown workflow 'nope'" in (bad.reason or "")

        def finished() -> str | None:
            run = instance.get_run_by_id(first.run_id or "")
            done = ("SUCCESS", "FAILURE", "CANCELED")
            return run.status.value if run and run.status.value in done else None

        assert until("the request's run to finish", finished) == "SUCCESS"
        runs = instance.get_run_records()
        assert [r.dagster_run.tags.get(T.REQUEST_ID) for r in runs] == ["e2e"]
        manifests = Path(plane_settings.storage) / "manifests" / (first.run_id or "")
        assert sorted(p.name for p in manifests.iterdir()) == ["poster.json", "poster_info.json"]
