"""Runtime target health: probed by the sensor, recorded as observations and checks of
`runtime/<target>`, shown by `ergot targets`, and used by routing to skip a target that is down.

One Studio target answers (the loopback Studio server), one does not (a closed port)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dagster import (
    AssetCheckKey,
    AssetRecordsFilter,
    DagsterInstance,
    Definitions,
    build_sensor_context,
)

from ergot_dagster.assets.runtime_targets import build_target_checks, target_specs
from ergot_dagster.errors import DefinitionError
from ergot_dagster.orchestration.run_coordinator import ErgotRunCoordinator
from ergot_dagster.resources.targets import RuntimeTargetsResource, target_resources
from ergot_dagster.sensors.health_sensor import runtime_health
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.targets.config import load_targets
from ergot_dagster.targets.health import (
    CHECK_NAME,
    health_key,
    last_health,
    unhealthy_targets,
)
from ergot_dagster.targets.routing import RoutingError, route, routing_tags
from ergot_dagster.workflows.model import WorkflowDefinition
from tests.conftest import subprocess_env
from tests.servers.studio_server import StudioLoopbackServer
from tests.support import free_port

ERGOT = str(Path(sys.executable).parent / "ergot")
CAPABILITIES = ["tts", "voice.prompt"]


@pytest.fixture
def studio() -> Iterator[StudioLoopbackServer]:
    with StudioLoopbackServer(job_seconds=0.1) as running:
        yield running


@pytest.fixture
def targets_file(
    plane_settings: ErgotSettings,
    studio: StudioLoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    # The dead target comes first and is preferred for `speak`: routing must still pass it by.
    path = plane_settings.home / "runtime_targets.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "targets": [
                    {
                        "name": "studio-dead",
                        "runtime": "studio",
                        "capabilities": CAPABILITIES,
                        "endpoint": f"http://127.0.0.1:{free_port()}",
                        "routing": {"prefer_for": ["speak"]},
                    },
                    {
                        "name": "studio-live",
                        "runtime": "studio",
                        "capabilities": CAPABILITIES,
                        "endpoint": studio.url,
                    },
                ]
            }
        )
    )
    monkeypatch.setenv("ERGOT_RUNTIME_TARGETS", str(path))
    return path


def _speak() -> WorkflowDefinition:
    path = PROJECT_ROOT / "examples" / "studio" / "speak.v1.yaml"
    return WorkflowDefinition.model_validate(yaml.safe_load(path.read_text()))


def _tick(instance: DagsterInstance, targets_file: Path, cursor: str | None = None) -> str:
    context = build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"runtime_targets": RuntimeTargetsResource(path=str(targets_file))},
    )
    result = runtime_health.evaluate_tick(context)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    assert result.cursor is not None
    return result.cursor


def test_the_sensor_records_each_targets_health(
    instance: DagsterInstance, targets_file: Path
) -> None:
    config = load_targets(targets_file)
    _tick(instance, targets_file)
    dead = last_health(instance, config.get("studio-dead"))  # type: ignore[arg-type]
    live = last_health(instance, config.get("studio-live"))  # type: ignore[arg-type]
    assert (dead.status, dead.healthy) == ("down", False)
    assert "unreachable" in dead.detail
    assert (live.status, live.healthy) == ("up", True)
    assert live.latency_ms is not None and live.queue_depth == 0
    assert unhealthy_targets(instance, config) == {"studio-dead"}

    dead_check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(health_key("studio-dead"), CHECK_NAME)]
    )
    [execution] = dead_check.values()
    assert execution.evaluation is not None and execution.evaluation.passed is False


def test_only_changes_and_heartbeats_are_recorded(
    instance: DagsterInstance,
    targets_file: Path,
    studio: StudioLoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def count() -> int:
        return len(
            instance.fetch_observations(
                AssetRecordsFilter(asset_key=health_key("studio-live")), limit=100
            ).records
        )

    cursor = _tick(instance, targets_file)
    cursor = _tick(instance, targets_file, cursor)
    assert count() == 1  # nothing changed: nothing new recorded
    studio.stop()  # the live target goes down
    cursor = _tick(instance, targets_file, cursor)
    assert count() == 2
    assert last_health(instance, load_targets(targets_file).targets[1]).status == "down"
    monkeypatch.setenv("ERGOT_HEALTH_RECORD_EVERY_S", "0")
    _tick(instance, targets_file, cursor)
    assert count() == 3  # the heartbeat is due on every tick now


def test_routing_skips_a_target_found_down_and_says_so_when_all_are(
    instance: DagsterInstance, targets_file: Path, studio: StudioLoopbackServer
) -> None:
    config = load_targets(targets_file)
    speak = _speak()
    # Never probed: both count as healthy, and the preferred one is chosen.
    assert route(speak, config, unhealthy=unhealthy_targets(instance, config))["studio"].name == (
        "studio-dead"
    )
    cursor = _tick(instance, targets_file)
    routed = route(speak, config, unhealthy=unhealthy_targets(instance, config))
    assert routed["studio"].name == "studio-live"
    studio.stop()
    _tick(instance, targets_file, cursor)
    with pytest.raises(RoutingError) as caught:
        route(speak, config, unhealthy=unhealthy_targets(instance, config))
    assert "studio-dead is unhealthy" in str(caught.value)
    assert "studio-live is unhealthy" in str(caught.value)
    # A record older than the limit says nothing any more.
    assert unhealthy_targets(instance, config, max_age=0.0) == set()


def test_targets_are_observable_assets_with_a_runnable_check(
    instance: DagsterInstance, targets_file: Path
) -> None:
    config = load_targets(targets_file)
    assert [s.key for s in target_specs(config)] == [
        health_key("studio-dead"),
        health_key("studio-live"),
    ]
    defs = Definitions(assets=target_specs(config), asset_checks=build_target_checks(config))
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance)
    assert result.success
    outcomes = {e.asset_key.path[-1]: e.passed for e in result.get_asset_check_evaluations()}
    assert outcomes == {"studio-dead": False, "studio-live": True}
    assert last_health(instance, config.targets[0]).status == "down"


def test_ergot_targets_lists_each_target_with_its_health(
    plane_settings: ErgotSettings, targets_file: Path
) -> None:
    env = {**subprocess_env(plane_settings), "ERGOT_RUNTIME_TARGETS": str(targets_file)}
    before = subprocess.run(
        [ERGOT, "targets"], env=env, capture_output=True, text=True, timeout=120
    )
    assert before.returncode == 0, before.stderr
    assert before.stdout.count("never probed") == 2
    probed = subprocess.run(
        [ERGOT, "targets", "--probe", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probed.returncode == 0, probed.stderr
    health = {row["name"]: row["health"]["status"] for row in json.loads(probed.stdout)}
    assert health == {"studio-dead": "down", "studio-live": "up"}
    after = subprocess.run([ERGOT, "targets"], env=env, capture_output=True, text=True, timeout=60)
    lines = after.stdout.splitlines()
    assert "DOWN" in lines[0] and "studio-dead" in lines[0]
    assert "UP" in lines[1] and "studio-live" in lines[1]


def test_a_pool_limits_runs_across_the_targets_that_share_it(
    plane_settings: ErgotSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = plane_settings.home / "pooled_targets.yaml"
    target = {"runtime": "studio", "capabilities": CAPABILITIES, "routing": {"pool": "gpu-box"}}
    path.write_text(
        yaml.safe_dump(
            {
                "pools": {"gpu-box": 1},
                "targets": [
                    {**target, "name": "studio-a", "endpoint": "http://10.0.0.1:8189"},
                    {**target, "name": "studio-b", "endpoint": "http://10.0.0.2:8189"},
                ],
            }
        )
    )
    monkeypatch.setenv("ERGOT_RUNTIME_TARGETS", str(path))
    config = load_targets(path)
    tags = routing_tags(route(_speak(), config))
    assert tags["ergot/pool.gpu-box"] == "studio-a"
    limits = ErgotRunCoordinator().get_run_queue_config().tag_concurrency_limits
    assert {"key": "ergot/pool.gpu-box", "limit": 1} in limits
    assert {"key": "ergot/target.studio-b", "limit": 1} in limits
    path.write_text(path.read_text().replace("pools:\n  gpu-box: 1\n", ""))
    with pytest.raises(DefinitionError, match="names pool 'gpu-box', which `pools` does not"):
        load_targets(path)


def test_credentials_in_an_endpoint_are_never_shown(
    plane_settings: ErgotSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = plane_settings.home / "secret_targets.yaml"
    secret = "s3cretpw-9f2d"
    path.write_text(
        yaml.safe_dump(
            {
                "targets": [
                    {
                        "name": "comfy-proxy",
                        "runtime": "studio",
                        "endpoint": f"http://ops:{secret}@10.0.0.5:8188/base?token={secret}",
                    }
                ]
            }
        )
    )
    config = load_targets(path)
    assert config.targets[0].public_endpoint == "http://10.0.0.5:8188/base"
    [spec] = target_specs(config)
    assert secret not in json.dumps({k: str(v) for k, v in spec.metadata.items()})
    [resource] = target_resources(path, config).values()
    assert secret not in resource.model_dump_json()
    env = {**subprocess_env(plane_settings), "ERGOT_RUNTIME_TARGETS": str(path)}
    listed = subprocess.run(
        [ERGOT, "targets", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert secret not in listed.stdout
