"""Requests and routing without a server: the model, planning, routing and idempotency rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from pydantic import ValidationError

from ergot_dagster.artifacts.store import open_store
from ergot_dagster.errors import RequestError, SourceError
from ergot_dagster.media.synth import make_audio, make_clip
from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.retry import StepRetry
from ergot_dagster.orchestration.worker import current_worker, worker_alive
from ergot_dagster.requests.catalog import LocalCatalog
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.requests.planning import plan_run
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.targets.config import load_targets
from ergot_dagster.targets.routing import RoutingError, route, routing_tags, targets_from_tags
from ergot_dagster.workflows.loader import load_registry

REGISTRY = load_registry(PROJECT_ROOT / "workflow_defs")


def _targets(tmp_path: Path, extra: list[dict] | None = None) -> Path:
    data = yaml.safe_load((PROJECT_ROOT / "runtime_targets.yaml").read_text())
    data["targets"] += extra or []
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _request(**fields: object) -> ProcessingRequest:
    base: dict[str, object] = {
        "request_id": "r-1",
        "workflow": "poster_extraction",
        "sources": {"primary": "cam/a.mp4"},
    }
    return ProcessingRequest.model_validate({**base, **fields})


@pytest.fixture
def catalog(
    plane_settings: ErgotSettings, instance: DagsterInstance, ingest_root: Path
) -> LocalCatalog:
    make_clip(ingest_root / "cam" / "a.mp4", duration=1.0)
    make_audio(ingest_root / "cam" / "voice.wav", duration=1.0)
    outcomes = ingest_refs(
        ingest_root, ["cam/a.mp4", "cam/voice.wav"], lambda key: latest_source_record(instance, key)
    )
    record_sources(instance, [o.record for o in outcomes if o.record])
    return LocalCatalog(
        REGISTRY,
        instance,
        open_store(plane_settings.storage),
        load_targets(plane_settings.runtime_targets),
    )


def test_request_model_refuses_bad_fields() -> None:
    for bad, field in [
        ({"request_id": "has space"}, "request_id"),
        ({"workflow": "Poster"}, "workflow"),
        ({"sources": {"primary": "../x.mp4"}}, "sources.primary"),
        ({"sources": {"primary": "a.mp4", "inputs": {"v": "artifact:../x"}}}, "sources.inputs"),
        ({"priority": 5000}, "priority"),
        ({"context": {"blob": "x" * 20_000}}, "context"),
        ({"colour": "red"}, "colour"),
    ]:
        with pytest.raises(ValidationError) as caught:
            _request(**bad)
        assert field in str(caught.value)


def test_plan_carries_everything_the_run_needs(catalog: LocalCatalog) -> None:
    request = _request(
        settings={"width": 320},
        priority=7,
        max_retries=2,
        timeout_s=90,
        context={"histrio": {"shot": 12}},
    )
    plan = plan_run(request, catalog)
    assert plan.asset_keys == [
        ["core", "poster_extraction", "poster"],
        ["core", "poster_extraction", "poster_info"],
    ]
    assert plan.partition_key == "cam/a.mp4"
    assert plan.run_config["ops"]["core__poster_extraction"]["config"]["settings"] == {"width": 320}
    tags = plan.tags
    assert (tags[T.PRIORITY], tags[T.MAX_RETRIES], tags[T.MAX_RUNTIME]) == ("7", "2", "90")
    assert tags[T.RETRY_ON_STEP_FAILURE] == "false"
    assert tags[T.REQUEST_ID] == "r-1" and tags[T.REQUEST_SHA256] == request.sha256
    assert json.loads(tags[T.REQUEST])["context"] == {"histrio": {"shot": 12}}
    # Equal requests are equal to the byte; any difference changes the hash.
    assert (
        _request(
            settings={"width": 320},
            priority=7,
            max_retries=2,
            timeout_s=90,
            context={"histrio": {"shot": 12}},
        ).sha256
        == request.sha256
    )
    assert _request().sha256 != request.sha256


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"workflow": "posters"}, RequestError, "unknown workflow 'posters'"),
        ({"settings": {"width": 1}}, RequestError, "settings.width: 1 is less than"),
        ({"sources": {"primary": "cam/none.mp4"}}, SourceError, "has not been ingested"),
        (
            {"sources": {"primary": "cam/voice.wav"}},
            SourceError,
            "is audio/wav, but only video/* is accepted",
        ),
        (
            {"sources": {"primary": "cam/a.mp4", "inputs": {"voice": "cam/voice.wav"}}},
            RequestError,
            "no input(s) named voice",
        ),
        ({"execution_target": "remote"}, RoutingError, "no runtime target can run ffmpeg"),
        ({"execution_target": "gpu-box-9"}, RoutingError, "neither local, remote nor a known"),
    ],
)
def test_plan_refuses_what_cannot_run(
    catalog: LocalCatalog, fields: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        plan_run(_request(**fields), catalog)


def test_routing_by_runtime_capability_locality_and_name(tmp_path: Path) -> None:
    config = load_targets(
        _targets(
            tmp_path,
            [
                {
                    "name": "ffmpeg-remote",
                    "runtime": "ffmpeg",
                    "capabilities": ["video.decode", "image.encode"],
                    "locality": {"kind": "remote", "site": "rack-2"},
                    "endpoint": "http://10.0.0.2:80",
                },
            ],
        )
    )
    poster = REGISTRY.get("poster_extraction")
    assert route(poster, config)["ffmpeg"].name == "ffmpeg-local"
    assert route(poster, config, "remote")["ffmpeg"].name == "ffmpeg-remote"
    assert route(poster, config, "ffmpeg-remote")["ffmpeg"].name == "ffmpeg-remote"
    with pytest.raises(RoutingError, match=r"ffmpeg-remote lacks audio\.decode, audio\.loudness"):
        route(REGISTRY.get("media_qc"), config, "remote")
    with pytest.raises(RoutingError, match="ffmpeg-local is unhealthy"):
        route(poster, config, "local", unhealthy=["ffmpeg-local"])
    routed = route(poster, config)
    tags = routing_tags(routed)
    assert tags == {"ergot/target.ffmpeg-local": "ffmpeg", "ergot/targets": "ffmpeg-local"}
    assert targets_from_tags(tags, config) == routed


def test_target_overrides_from_the_environment(tmp_path: Path) -> None:
    config = load_targets(_targets(tmp_path), {"ERGOT_TARGET_FFMPEG_LOCAL_CONCURRENCY": "5"})
    assert config.get("ffmpeg-local").concurrency == 5  # type: ignore[union-attr]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"targets": [{"name": "x", "runtime": "ffmpeg", "concurrency": 0}]})
    )
    with pytest.raises(Exception, match=r"bad.yaml: field `targets.0.concurrency`"):
        load_targets(bad)


def test_worker_identity_and_liveness() -> None:
    me = current_worker("run-a")
    assert worker_alive(me, "run-a") is True
    assert worker_alive(me, "run-b") is None, "a copied tag of another run is not judged"
    host = me.split("@", 1)[1].split(":")[0]
    assert worker_alive(f"run-a@{host}:999999999:1", "run-a") is False
    assert worker_alive("run-a@another-host:1:1", "run-a") is None


def test_step_retry_backoff_doubles_with_jitter() -> None:
    retry = StepRetry(max_retries=3, delay_s=2)
    assert retry.should_retry(2) and not retry.should_retry(3)
    for attempt, base in [(0, 2), (1, 4), (2, 8)]:
        assert base * 0.75 <= retry.delay_for(attempt) <= base * 1.25


def test_a_named_target_serves_its_runtime_and_the_rest_route_locally(tmp_path: Path) -> None:
    from ergot_dagster.workflows.model import WorkflowDefinition
    from tests.test_durability import VOICE_PROMPT

    config = load_targets(
        _targets(
            tmp_path,
            [
                {
                    "name": "studio-gpu",
                    "runtime": "studio",
                    "capabilities": ["voice.prompt"],
                    "locality": {"kind": "remote", "site": "gpu-rack"},
                    "endpoint": "http://10.0.0.9:80",
                },
            ],
        )
    )
    plan = WorkflowDefinition.model_validate(VOICE_PROMPT)
    routed = route(plan, config, "studio-gpu")
    assert {r: t.name for r, t in routed.items()} == {
        "ffmpeg": "ffmpeg-local",
        "studio": "studio-gpu",
    }
    local_only = plan.model_copy(
        update={"execution": plan.execution.model_copy(update={"remote": False})}
    )
    with pytest.raises(RoutingError, match="does not support remote execution"):
        route(local_only, config, "remote")
