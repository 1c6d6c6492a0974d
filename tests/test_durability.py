"""Durable orchestration, end to end, as an operator would try it.

One plane for the whole module: the instance on the machine's real PostgreSQL (the repository's
`deploy/dagster.postgres.yaml`, unchanged), `dagster dev` (webserver + daemon with the queued run
coordinator, run monitoring and run retries), a loopback Studio server in its own process for the
remote runtime, and real ffmpeg. Requests go in through the typed client. Every wait polls with a
deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dagster import AssetKey, AssetRecordsFilter, DagsterEventType, DagsterInstance, RunsFilter

from ergot_dagster.artifacts.lineage import store_manifests, walk
from ergot_dagster.artifacts.store import LocalArtifactStore
from ergot_dagster.client import ErgotClient, RequestRejectedError, RunStatus
from ergot_dagster.client.catalog import GraphQLCatalog
from ergot_dagster.client.graphql import GraphQLTransport
from ergot_dagster.media.synth import make_clip
from ergot_dagster.orchestration import tags as T
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.requests.catalog import LocalCatalog
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.settings import PROJECT_ROOT
from ergot_dagster.sources.ingest import ingest_refs, scan_root
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.targets.config import load_targets
from ergot_dagster.targets.health import last_health
from ergot_dagster.workflows.loader import load_registry, publish
from tests.support import dagster_dev, free_port, fresh_database, stop, until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


STUDIO_CAPABILITIES = ["tts", "voice.prompt"]

# The Studio example workflows (examples/studio), beside the repository's own definitions.
EXAMPLES = PROJECT_ROOT / "examples" / "studio"
SPEAK: dict[str, Any] = yaml.safe_load((EXAMPLES / "speak.v1.yaml").read_text())
VOICE_PROMPT: dict[str, Any] = yaml.safe_load((EXAMPLES / "voice_prompt.v1.yaml").read_text())
SPEAK_SHORT = {
    **SPEAK,
    "name": "speak_short",
    "description": "speak, with a 3 s bound on the Studio stage.",
    "plan": [{**SPEAK["plan"][0], "timeout_s": 3}],
}

TEST_WORKFLOWS = [SPEAK, SPEAK_SHORT, VOICE_PROMPT]


class Studio:
    """The loopback Studio server's test controls."""

    def __init__(self, url: str) -> None:
        self.url = url

    def configure(self, **settings: Any) -> None:
        httpx.post(f"{self.url}/_loopback/config", json=settings, timeout=10).raise_for_status()

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_loopback/state", timeout=10).json()

    def accepted(self) -> list[str]:
        return list(self.state()["accepted"])

    def new_job(self, before: list[str]) -> str:
        """The first Studio job accepted after `before` was read."""
        fresh = until("a new Studio job", lambda: self.accepted()[len(before) :])
        return fresh[0]


@dataclass
class Plane:
    client: ErgotClient
    instance: DagsterInstance
    store: LocalArtifactStore
    studio: Studio
    log: Path
    url: str = ""

    def request(self, workflow: str, source: str, **fields: Any) -> ProcessingRequest:
        fields.setdefault("request_id", f"t-{uuid.uuid4()}")
        return ProcessingRequest(workflow=workflow, sources={"primary": source}, **fields)

    def wait(self, run_id: str, *statuses: str) -> RunStatus:
        wanted = statuses or ("SUCCESS", "FAILURE", "CANCELED")

        def reached() -> RunStatus | None:
            status = self.client.status(run_id)
            return status if status.status in wanted else None

        return until(f"run {run_id} to be {'/'.join(wanted)}", reached)

    def events(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        """The run's ergot events (engine events with `ergot_event` metadata), in order."""
        found = []
        for entry in self.instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
            data = entry.dagster_event.engine_event_data if entry.dagster_event else None
            if data is None or "ergot_event" not in data.metadata:
                continue
            fields = {k: getattr(v, "value", v) for k, v in data.metadata.items()}
            if kind is None or fields["ergot_event"] == kind:
                found.append(fields)
        return found

    def retries_of_step(self, run_id: str) -> list[Any]:
        return [
            e for e in self.instance.all_logs(run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)
        ]

    def step_failure(self, run_id: str) -> Any:
        failures = self.instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
        assert failures, f"run {run_id} has no step failure"
        return failures[-1].dagster_event.step_failure_data

    def manifests(self, run_id: str) -> dict[str, Any]:
        return {m.name: m for m in self.store.list_run(run_id)}

    def materialized(self, asset: list[str], partition: str) -> list[str]:
        records = self.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=50
        ).records
        return [r.run_id for r in records]


def _write_definitions(defs: Path) -> None:
    shutil.copytree(PROJECT_ROOT / "workflow_defs", defs)
    for definition in TEST_WORKFLOWS:
        path = defs / definition["family"] / f"{definition['name']}.v1.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(definition, sort_keys=False))
    publish(defs)


def _write_targets(path: Path, studio_url: str) -> None:
    targets = yaml.safe_load((PROJECT_ROOT / "runtime_targets.yaml").read_text())
    targets["targets"][0]["concurrency"] = 1
    # A Studio target that is down, first in the file and preferred: routing must pass it by
    # once the health sensor has found it down.
    targets["targets"].append(
        {
            "name": "studio-dead",
            "runtime": "studio",
            "capabilities": STUDIO_CAPABILITIES,
            "endpoint": f"http://127.0.0.1:{free_port()}",
            "concurrency": 1,
            "routing": {"prefer_for": ["speak", "speak_short", "voice_prompt"]},
        }
    )
    targets["targets"].append(
        {
            "name": "studio-loop",
            "runtime": "studio",
            "capabilities": STUDIO_CAPABILITIES,
            "endpoint": studio_url,
            "concurrency": 1,
        }
    )
    path.write_text(yaml.safe_dump(targets))


@contextlib.contextmanager
def _studio_server() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.studio_server", "--port", "0"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    root = tmp_path_factory.mktemp("durable")
    saved_env = dict(os.environ)
    with fresh_database("ergot_durability") as pg_url, _studio_server() as studio_url:
        defs, targets_file = root / "workflow_defs", root / "runtime_targets.yaml"
        _write_definitions(defs)
        _write_targets(targets_file, studio_url)
        home = root / "ergot"
        dagster_home = home / "dagster"
        dagster_home.mkdir(parents=True)
        shutil.copyfile(
            PROJECT_ROOT / "deploy" / "dagster.postgres.yaml", dagster_home / "dagster.yaml"
        )
        os.environ.update(
            {
                "ERGOT_HOME": str(home),
                "DAGSTER_HOME": str(dagster_home),
                "ERGOT_PG_URL": pg_url,
                "ERGOT_STORAGE": str(home / "artifacts"),
                "ERGOT_INGEST_ROOT": str(home / "ingest"),
                "ERGOT_WORKFLOW_DEFS": str(defs),
                "ERGOT_RUNTIME_TARGETS": str(targets_file),
                "ERGOT_STEP_RETRIES": "2",
                "ERGOT_STEP_RETRY_DELAY_S": "0.2",
                "ERGOT_INGEST_INTERVAL_S": "3600",
                "ERGOT_HEALTH_INTERVAL_S": "1",
            }
        )
        try:
            ingest = home / "ingest"
            make_clip(ingest / "cam" / "talk.mov", duration=4.0)
            make_clip(ingest / "cam" / "long.mov", duration=60.0, size="640x360")
            instance = DagsterInstance.from_config(str(dagster_home))
            outcomes = ingest_refs(
                ingest, list(scan_root(ingest)), lambda key: latest_source_record(instance, key)
            )
            record_sources(instance, [o.record for o in outcomes if o.record])
            log = root / "dagster-dev.log"
            with dagster_dev(home, dict(os.environ), log) as url:
                dead = load_targets(targets_file).get("studio-dead")
                assert dead is not None
                until(
                    "the health sensor to find studio-dead down",
                    lambda: last_health(instance, dead).status == "down",
                )
                store = LocalArtifactStore(home / "artifacts")
                catalog = LocalCatalog(
                    load_registry(defs), instance, store, load_targets(targets_file)
                )
                yield Plane(
                    ErgotClient(url, catalog=catalog),
                    instance,
                    store,
                    Studio(studio_url),
                    log,
                    url=url,
                )
        finally:
            os.environ.clear()
            os.environ.update(saved_env)


@pytest.fixture(autouse=True)
def fresh_studio(plane: Plane) -> None:
    plane.studio.configure(reset=True, job_seconds=0.2)


def _intervals(runs: list[RunStatus]) -> list[tuple[float, float]]:
    return sorted((r.started_at.timestamp(), r.ended_at.timestamp()) for r in runs)  # type: ignore[union-attr]


def test_burst_of_priorities_and_duplicates_on_a_target_of_concurrency_one(plane: Plane) -> None:
    plane.studio.configure(hang=True)
    before = plane.studio.accepted()
    blocker = plane.client.submit(plane.request("speak", "cam/talk.mov"))
    plane.wait(blocker.run_id, "STARTED")
    plane.studio.new_job(before)

    prefix = f"burst-{uuid.uuid4().hex[:6]}"
    priorities = [0, 5, 0, 10, 5, -1]
    requests = [
        plane.request(
            "speak",
            "cam/talk.mov",
            request_id=f"{prefix}-{i}",
            priority=p,
            settings={"text": f"line {i}"},
        )
        for i, p in enumerate(priorities)
    ]
    # Two of them are sent twice, all at once: a request id is accepted once.
    sent = [*requests, requests[1], requests[3]]
    with ThreadPoolExecutor(len(sent)) as pool:
        handles = list(pool.map(plane.client.submit, sent))
    by_request: dict[str, set[str]] = {}
    for handle in handles:
        by_request.setdefault(handle.request_id, set()).add(handle.run_id)
    assert all(len(runs) == 1 for runs in by_request.values()), by_request
    run_ids = [next(iter(by_request[r.request_id])) for r in requests]
    for request in requests:
        assert len(plane.client.runs_of_request(request.request_id)) == 1

    # While the target's one slot is taken, the others wait visibly queued, not failed.
    assert {plane.client.status(r).status for r in run_ids} == {"QUEUED"}
    assert plane.client.status(blocker.run_id).status == "STARTED"

    plane.studio.configure(hang=False)
    finished = [plane.wait(r) for r in [blocker.run_id, *run_ids]]
    assert {s.status for s in finished} == {"SUCCESS"}

    # Higher priority first; equal priorities in the order they were queued (the queue's order
    # is the run storage id, which concurrent inserts may not match in their timestamps).
    storage_ids = {
        r.dagster_run.run_id: r.storage_id
        for r in plane.instance.get_run_records(RunsFilter(run_ids=run_ids))
    }
    started = sorted(finished[1:], key=lambda s: s.started_at)  # type: ignore[arg-type, return-value]
    expected = sorted(finished[1:], key=lambda s: (-s.priority, storage_ids[s.run_id]))
    assert [s.run_id for s in started] == [s.run_id for s in expected]
    # The target's limit of one run held throughout.
    spans = _intervals(finished)
    assert all(a_end <= b_start + 0.05 for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    for status in finished:
        assert status.tags["ergot/target.studio-loop"] == "studio"


def test_cancel_queued_and_running(plane: Plane) -> None:
    plane.studio.configure(hang=True)
    before = plane.studio.accepted()
    running = plane.client.submit(plane.request("speak", "cam/talk.mov"))
    plane.wait(running.run_id, "STARTED")
    job_id = plane.studio.new_job(before)
    accepted = plane.studio.accepted()
    queued = plane.client.submit(plane.request("speak", "cam/talk.mov"))
    assert plane.client.status(queued.run_id).status == "QUEUED"

    assert plane.client.cancel(queued.run_id).status in ("CANCELING", "CANCELED")
    plane.wait(queued.run_id, "CANCELED")
    never = [DagsterEventType.RUN_START, DagsterEventType.STEP_START]
    assert not plane.instance.all_logs(queued.run_id, of_type=set(never)), (
        "a run cancelled while queued never starts"
    )

    plane.client.cancel(running.run_id)
    assert plane.wait(running.run_id, "CANCELED").status == "CANCELED"
    assert job_id in plane.studio.state()["cancels"], "the remote job got its cancel call"
    assert plane.manifests(running.run_id) == {} and plane.manifests(queued.run_id) == {}
    assert plane.studio.accepted() == accepted, "the queued run never reached the runtime"
    until("scratch space to be cleaned", lambda: not list((plane.store.root / "tmp").iterdir()))


def _ffmpeg_reading(path: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"ffmpeg.*{path}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_cancel_kills_the_running_ffmpeg(plane: Plane) -> None:
    handle = plane.client.submit(
        plane.request("review_proxy", "cam/long.mov", settings={"preset": "slow", "height": 360})
    )
    plane.wait(handle.run_id, "STARTED")
    until("the ffmpeg stage to start", lambda: plane.events(handle.run_id, "stage_started"))
    pids = until("ffmpeg to be running", lambda: _ffmpeg_reading("cam/long.mov"))
    plane.client.cancel(handle.run_id)
    assert plane.wait(handle.run_id, "CANCELED").status == "CANCELED"
    until(
        "ffmpeg to be gone",
        lambda: (
            not any(
                os.path.exists(f"/proc/{p}")
                and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                for p in pids
            )
        ),
        timeout_s=30,
    )
    assert plane.manifests(handle.run_id) == {}
    until("scratch space to be cleaned", lambda: not list((plane.store.root / "tmp").iterdir()))


def test_killed_worker_is_retried_reusing_artifacts(plane: Plane) -> None:
    plane.studio.configure(hang=True)
    first = plane.client.submit(plane.request("voice_prompt", "cam/talk.mov", max_retries=1))
    until(
        "the Studio stage to start",
        lambda: [e for e in plane.events(first.run_id, "stage_started") if e["stage"] == "prompt"],
    )
    assert set(plane.manifests(first.run_id)) == {"audio"}
    worker = plane.client.status(first.run_id).tags[T.WORKER]
    pid = int(worker.split("@", 1)[1].split(":")[1])
    os.kill(pid, signal.SIGKILL)

    assert plane.wait(first.run_id, "FAILURE").status == "FAILURE"
    plane.studio.configure(hang=False)
    # Waiting on the request's run follows it to its retry.
    followed = plane.client.wait(first.run_id, timeout_s=120)
    assert followed.status == "SUCCESS" and followed.parent_run_id == first.run_id
    retry = until(
        "the retry run",
        lambda: [r for r in plane.client.runs_of_request(first.request_id) if r.parent_run_id],
    )[0]
    assert retry.parent_run_id == first.run_id and retry.root_run_id == first.run_id
    assert plane.wait(retry.run_id).status == "SUCCESS"

    assert set(plane.manifests(retry.run_id)) == {"clip", "transcript"}, "audio was not made twice"
    assert [e["stage"] for e in plane.events(retry.run_id, "stage_reused")] == ["extract"]
    partition = "cam/talk.mov"
    assert (
        plane.materialized(["studio_examples", "voice_prompt", "audio"], partition).count(
            first.run_id
        )
        == 1
    )
    assert retry.run_id not in plane.materialized(
        ["studio_examples", "voice_prompt", "audio"], partition
    )
    assert (
        plane.materialized(["studio_examples", "voice_prompt", "clip"], partition)[0]
        == retry.run_id
    )
    clip = plane.manifests(retry.run_id)["clip"]
    tree = walk(
        clip.ref,
        store_manifests(plane.store),
        lambda ref: latest_source_record(plane.instance, ref_to_partition_key(ref)),
    )
    assert tree.parents[0].ref == f"artifact:{first.run_id}/audio"
    assert tree.parents[0].parents[0].ref == "cam/talk.mov"


def test_transient_failures_are_retried_permanent_ones_are_not(plane: Plane) -> None:
    plane.studio.configure(submit_errors=[{"status": 503, "times": 2}])
    flaky = plane.client.submit(plane.request("speak", "cam/talk.mov"))
    assert plane.wait(flaky.run_id).status == "SUCCESS"
    assert len(plane.retries_of_step(flaky.run_id)) == 2
    failures = plane.events(flaky.run_id, "stage_failed")
    assert len(failures) == 2 and all(f["retryable"] is True for f in failures)
    assert all("503" in f["error"] for f in failures)

    plane.studio.configure(
        submit_errors=[
            {
                "status": 400,
                "code": "unspeakable",
                "message": "text has no speakable words",
                "field": "text",
                "times": 1,
            }
        ]
    )
    refused = plane.client.submit(plane.request("speak", "cam/talk.mov"))
    assert plane.wait(refused.run_id).status == "FAILURE"
    assert plane.retries_of_step(refused.run_id) == []
    failure = plane.step_failure(refused.run_id)
    description = failure.user_failure_data.description
    assert "400" in description and "text" in description
    assert failure.user_failure_data.metadata["retryable"].value is False


def test_a_runtime_that_hangs_fails_the_step_with_a_timeout(plane: Plane) -> None:
    cancels_before = len(plane.studio.state()["cancels"])
    plane.studio.configure(hang=True)
    handle = plane.client.submit(plane.request("speak_short", "cam/talk.mov"))
    assert plane.wait(handle.run_id).status == "FAILURE"
    description = plane.step_failure(handle.run_id).user_failure_data.description
    assert "did not finish within 3 s" in description and "cancelled job" in description
    attempts = 1 + len(plane.retries_of_step(handle.run_id))
    assert attempts == 3, "a timeout is transient: retried by the step retry policy"
    cancels = len(plane.studio.state()["cancels"]) - cancels_before
    assert cancels == attempts, "every hung job was cancelled"


def test_request_timeout_bounds_the_whole_run(plane: Plane) -> None:
    cancels_before = len(plane.studio.state()["cancels"])
    plane.studio.configure(hang=True)
    handle = plane.client.submit(plane.request("speak", "cam/talk.mov", timeout_s=3))
    status = plane.wait(handle.run_id)
    assert status.status in ("FAILURE", "CANCELED")
    assert status.tags[T.MAX_RUNTIME] == "3"
    messages = [e.message for e in plane.instance.all_logs(handle.run_id) if e.message]
    assert any("maximum runtime of 3 seconds" in m for m in messages)
    until(
        "the hung job to be cancelled",
        lambda: len(plane.studio.state()["cancels"]) > cancels_before,
    )
    assert len(plane.client.runs_of_request(handle.request_id)) == 1, "max_retries 0: no retry"


def test_partial_success_keeps_what_was_made_and_says_what_failed(plane: Plane) -> None:
    plane.studio.configure(
        fail_jobs={
            "code": "no_speech",
            "message": "no speech found",
            "retryable": False,
            "times": 1,
        }
    )
    handle = plane.client.submit(plane.request("voice_prompt", "cam/talk.mov"))
    assert plane.wait(handle.run_id).status == "FAILURE"
    assert set(plane.manifests(handle.run_id)) == {"audio"}
    failure = plane.step_failure(handle.run_id).user_failure_data
    failed = failure.metadata["failed_artifacts"].value
    assert set(failed) == {"clip", "transcript"}
    assert "no speech found" in failed["clip"]["message"]
    assert failed["clip"]["retryable"] is False
    partition = "cam/talk.mov"
    assert handle.run_id in plane.materialized(
        ["studio_examples", "voice_prompt", "audio"], partition
    )
    for name in ("clip", "transcript"):
        assert handle.run_id not in plane.materialized(
            ["studio_examples", "voice_prompt", name], partition
        )
    audio = plane.manifests(handle.run_id)["audio"]
    assert (
        audio.sha256 == hashlib.sha256(plane.store.local_path(audio.uri).read_bytes()).hexdigest()
    )


def test_events_tell_the_story_of_a_run(plane: Plane) -> None:
    handle = plane.client.submit(
        plane.request("speak", "cam/talk.mov", context={"histrio": {"scene": 4}})
    )
    status = plane.wait(handle.run_id)
    assert status.status == "SUCCESS"
    assert json.loads(status.tags[T.REQUEST])["context"] == {"histrio": {"scene": 4}}
    kinds = [e["ergot_event"] for e in plane.events(handle.run_id)]
    assert (
        kinds[:2] == ["run_placed", "stage_started"]
        and "stage_finished" in kinds
        and kinds[-1] == "artifact_stored"
    )
    assert "stage_progress" in kinds
    started = plane.events(handle.run_id, "stage_started")[0]
    assert (started["runtime"], started["target"]) == ("studio", "studio-loop")
    finished = plane.events(handle.run_id, "stage_finished")[0]
    assert finished["job_id"] == plane.studio.state()["accepted"][-1]
    assert finished["elapsed_s"] > 0


def test_unroutable_request_is_refused_before_any_run(plane: Plane) -> None:
    with pytest.raises(RequestRejectedError, match="no runtime target can run studio"):
        plane.client.submit(plane.request("speak", "cam/talk.mov", execution_target="remote"))


def test_a_refused_run_is_not_retried(plane: Plane) -> None:
    first = plane.client.submit(plane.request("speak", "cam/talk.mov", max_retries=2))
    plane.wait(first.run_id)
    # Another body under the same request id, sent past the client's own check, as a racing
    # submitter would: the queue refuses it, and run retries must not start it anyway.
    other = plane.request(
        "speak",
        "cam/talk.mov",
        request_id=first.request_id,
        max_retries=2,
        settings={"text": "something else"},
    )
    refused = plane.client.launch(plane.client.plan(other))
    assert refused.run_id != first.run_id
    assert plane.wait(refused.run_id).status == "FAILURE"
    messages = [e.message or "" for e in plane.instance.all_logs(refused.run_id)]
    assert any("was already used for a different request" in m for m in messages)
    until(
        "the retry daemon to decide",
        lambda: plane.client.status(refused.run_id).tags.get("dagster/will_retry"),
    )
    assert plane.client.status(refused.run_id).tags["dagster/will_retry"] == "false"
    assert [r.run_id for r in plane.client.runs_of_request(first.request_id)] == [
        first.run_id,
        refused.run_id,
    ]


def test_runs_go_to_the_healthy_target_and_ergot_targets_says_which_is_down(plane: Plane) -> None:
    handle = plane.client.submit(plane.request("speak", "cam/talk.mov"))
    status = plane.wait(handle.run_id)
    assert status.status == "SUCCESS"
    assert "studio-loop" in status.targets and "studio-dead" not in status.targets
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "ergot"), "targets", "--json"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    health = {row["name"]: row["health"]["status"] for row in json.loads(listed.stdout)}
    # A consumer that knows only the URL sees the same: the dead target is skipped in planning.
    catalog = GraphQLCatalog(GraphQLTransport(plane.url))
    # (comfyui-local, the root file's ComfyUI at 127.0.0.1:8188, is down here too: nothing runs
    # there in the tests.)
    assert catalog.unhealthy_targets() - {"comfyui-local"} == {"studio-dead"}
    declared = catalog.targets()
    assert declared is not None and declared.get("studio-dead") is not None
    assert {name: health[name] for name in ("ffmpeg-local", "studio-dead", "studio-loop")} == {
        "ffmpeg-local": "up",
        "studio-dead": "down",
        "studio-loop": "up",
    }
