"""What `make dev` starts, for real: the Dagster webserver and daemon on 127.0.0.1.

The ingest sensor, ticked by the daemon, ingests a file dropped into the ingest root; a run
launched through the GraphQL API goes through the queued run coordinator and the daemon, and its
artifacts land in the store. Polls with deadlines; no sleeping on luck.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ergot_dagster.media.synth import make_clip
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from tests.conftest import subprocess_env
from tests.support import dagster_dev, until

pytestmark = pytest.mark.slow

DAGSTER = str(Path(sys.executable).parent / "dagster")


class Server:
    def __init__(self, url: str) -> None:
        self.url = url

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=30
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body
        return body["data"]


@pytest.fixture
def server(plane_settings: ErgotSettings, tmp_path: Path) -> Iterator[Server]:
    # The repository's instance config, as `make dev` uses it (queued run coordinator).
    (plane_settings.dagster_home / "dagster.yaml").write_text(
        (PROJECT_ROOT / "dagster.yaml").read_text()
    )
    env = subprocess_env(plane_settings)
    env.update({"ERGOT_INGEST_INTERVAL_S": "1", "ERGOT_INGEST_SETTLE_S": "0"})
    with dagster_dev(plane_settings.home, env, tmp_path / "dagster-dev.log") as url:
        yield Server(url)


SOURCE_PARTITION = """
query($key: String!) {
  assetNodeOrError(assetKey: {path: ["ergot", "source"]}) {
    ... on AssetNode {
      assetMaterializations(partitions: [$key]) { partition metadataEntries {
        label ... on TextMetadataEntry { text } } }
    }
  }
}"""

LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
  }
}"""

RUN_STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"


def test_sensor_ingests_and_daemon_runs_a_launched_request(
    server: Server, plane_settings: ErgotSettings, ingest_root: Path
) -> None:
    clip = make_clip(ingest_root / "drop" / "take 7.mp4", duration=3.0, black_lead_s=1.0)

    def ingested() -> Any:
        node = server.graphql(SOURCE_PARTITION, key="drop/take 7.mp4")["assetNodeOrError"]
        return node.get("assetMaterializations")

    materializations = until("the ingest sensor to record the new file", ingested)
    sha = {e["label"]: e.get("text") for e in materializations[0]["metadataEntries"]}["sha256"]
    assert sha == hashlib.sha256(clip.read_bytes()).hexdigest()

    params = {
        "selector": {
            "repositoryLocationName": "ergot",
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [
                {"path": ["core", "poster_extraction", "poster"]},
                {"path": ["core", "poster_extraction", "poster_info"]},
            ],
        },
        "runConfigData": {
            "ops": {"core__poster_extraction": {"config": {"settings": {"width": 256}}}}
        },
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "drop/take 7.mp4"}]},
    }
    launched = server.graphql(LAUNCH, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    def finished() -> str | None:
        status = server.graphql(RUN_STATUS, id=run_id)["runOrError"]["status"]
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

    assert until("the queued run to finish", finished) == "SUCCESS"
    manifests = Path(plane_settings.storage) / "manifests" / run_id
    assert sorted(p.name for p in manifests.iterdir()) == ["poster.json", "poster_info.json"]


def test_ergot_submit_queues_a_request_once(
    server: Server, plane_settings: ErgotSettings, ingest_root: Path
) -> None:
    make_clip(ingest_root / "q.mp4", duration=2.0)
    env = {**subprocess_env(plane_settings), "ERGOT_DAGSTER_URL": server.url}
    ergot = str(Path(sys.executable).parent / "ergot")
    assert (
        subprocess.run(
            [ergot, "ingest", str(ingest_root / "q.mp4")], env=env, capture_output=True, timeout=120
        ).returncode
        == 0
    )
    submit = [
        ergot,
        "submit",
        "media_qc",
        "q.mp4",
        "--request-id",
        "req-42",
        "--priority",
        "3",
        "--json",
    ]
    waited = subprocess.run(
        [*submit, "--wait", "120"], env=env, capture_output=True, text=True, timeout=180
    )
    assert waited.returncode == 0, waited.stderr
    status = json.loads(waited.stdout)
    assert status["status"] == "SUCCESS" and status["request_id"] == "req-42"
    assert status["tags"]["dagster/priority"] == "3"
    again = json.loads(
        subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120).stdout
    )
    assert again == {
        "run_id": status["run_id"],
        "request_id": "req-42",
        "status": "SUCCESS",
        "existing": True,
    }
