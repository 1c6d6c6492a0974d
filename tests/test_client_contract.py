"""The consumer contract, tried as Histrio would: against the real webserver and daemon.

One plane for the module (`dagster dev` on a free loopback port, the repository's instance template
with the queued run coordinator), real generated media ingested into it, and consumers that know
nothing but its URL: the typed client, a separate Python process importing only the client, and
curl following `docs/contract/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ergot_dagster.client import (
    ErgotClient,
    InvalidSettingsError,
    ProcessingRequest,
    RequestConflictError,
    RequestRejectedError,
    RetryRefusedError,
    ServerUnreachableError,
    SourceNotFoundError,
    UnknownArtifactError,
    UnknownRunError,
    UnknownWorkflowError,
)
from ergot_dagster.client.client import launch_variables
from ergot_dagster.media.synth import make_clip
from ergot_dagster.settings import PROJECT_ROOT
from tests.support import dagster_dev, free_port

pytestmark = pytest.mark.slow

ERGOT = str(Path(sys.executable).parent / "ergot")
CLIP = "cam01/take_001.mov"
CHANGING = "cam01/take_002.mov"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Plane:
    def __init__(self, url: str, home: Path, env: dict[str, str]) -> None:
        self.url = url
        self.home = home
        self.env = env
        self.ingest = home / "ingest"
        self.client = ErgotClient(url)

    def ergot(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ERGOT, *args], env=self.env, capture_output=True, text=True, timeout=300
        )

    def request(self, workflow: str, source: str = CLIP, **fields: object) -> ProcessingRequest:
        return ProcessingRequest.model_validate(
            {
                "request_id": fields.pop("request_id", f"test-{uuid.uuid4()}"),
                "workflow": workflow,
                "sources": {"primary": source},
                **fields,
            }
        )


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    home = tmp_path_factory.mktemp("contract") / "ergot"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    env = dict(os.environ)
    env.update(
        {
            "ERGOT_HOME": str(home),
            "DAGSTER_HOME": str(dagster_home),
            "ERGOT_STORAGE": str(home / "artifacts"),
            "ERGOT_INGEST_ROOT": str(home / "ingest"),
            "ERGOT_REQUEST_INBOX": str(home / "inbox"),
            "ERGOT_WORKFLOW_DEFS": str(PROJECT_ROOT / "workflow_defs"),
            "ERGOT_RUNTIME_TARGETS": str(PROJECT_ROOT / "runtime_targets.yaml"),
            "ERGOT_INBOX_INTERVAL_S": "1",
            # Files change on disk in these tests; only `ergot ingest` records them.
            "ERGOT_INGEST_INTERVAL_S": "3600",
            "ERGOT_INBOX_SETTLE_S": "0",
            "ERGOT_STEP_RETRY_DELAY_S": "0.2",
        }
    )
    (home / "inbox").mkdir(parents=True)
    make_clip(home / "ingest" / CLIP, duration=3.0)
    make_clip(home / "ingest" / CHANGING, duration=2.0, tone_hz=660.0)
    with dagster_dev(home, env, home.parent / "dagster-dev.log") as url:
        plane = Plane(url, home, env)
        result = plane.ergot("ingest", "cam01")
        assert result.returncode == 0, result.stderr
        yield plane
        plane.client.close()


def test_a_consumer_process_submits_polls_and_verifies_artifacts(plane: Plane) -> None:
    # Histrio's side: a separate process that imports the client and nothing else of the plane.
    script = f"""
import hashlib, json, sys, tempfile
from pathlib import Path
from ergot_dagster.client import ErgotClient
with ErgotClient({plane.url!r}) as plane:
    handle = plane.submit({{"request_id": "histrio-ep1-poster", "workflow": "poster_extraction",
                            "sources": {{"primary": {CLIP!r}}}, "context": {{"episode": 1}}}})
    status = plane.wait(handle.run_id, timeout_s=180)
    out = Path(tempfile.mkdtemp())
    files = {{}}
    for manifest in plane.artifacts(handle.run_id):
        path = plane.download(manifest.ref, out / manifest.name)
        files[manifest.name] = [manifest.media_type, manifest.sha256,
                                hashlib.sha256(path.read_bytes()).hexdigest()]
    loaded = sorted(m for m in sys.modules if m.startswith("ergot_dagster"))
    print(json.dumps({{"status": status.model_dump(mode="json"), "files": files,
                      "loaded": loaded}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=plane.env
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    status = answer["status"]
    assert status["status"] == "SUCCESS"
    assert status["request"]["context"] == {"episode": 1}
    assert status["workflow"] == "poster_extraction@1"
    assert {a["name"]: a["status"] for a in status["artifacts"]} == {
        "poster": "materialized",
        "poster_info": "materialized",
    }
    media = {name: kind for name, (kind, _, _) in answer["files"].items()}
    assert media == {"poster": "image/jpeg", "poster_info": "application/json"}
    for _, manifest_sha, downloaded_sha in answer["files"].values():
        assert manifest_sha == downloaded_sha
    by_name = {a["name"]: a for a in status["artifacts"]}
    assert by_name["poster"]["sha256"] == answer["files"]["poster"][1]
    # The consumer never loaded the code location or the workflow factory's Dagster assets.
    assert "ergot_dagster.definitions" not in answer["loaded"]


def test_a_request_id_is_accepted_once(plane: Plane) -> None:
    request = plane.request("media_qc", request_id="histrio-dup-1")
    first = plane.client.submit(request)
    again = plane.client.submit(request)
    assert again.run_id == first.run_id and again.existing and not first.existing
    different = request.model_copy(update={"priority": 5})
    with pytest.raises(RequestConflictError, match="already used for a different request"):
        plane.client.submit(different)
    assert [r.run_id for r in plane.client.runs_of_request("histrio-dup-1")] == [first.run_id]
    assert plane.client.wait(first.run_id, 180).status == "SUCCESS"


def test_bad_requests_raise_errors_that_say_what_is_wrong(plane: Plane) -> None:
    with pytest.raises(UnknownWorkflowError, match="unknown workflow 'no_such_flow'"):
        plane.client.submit(plane.request("no_such_flow"))
    with pytest.raises(UnknownWorkflowError, match="no version '9'"):
        plane.client.submit(plane.request("poster_extraction@9"))
    with pytest.raises(InvalidSettingsError) as caught:
        plane.client.submit(plane.request("media_qc", settings={"target_lufs": "loud"}))
    assert any(p.startswith("settings.target_lufs") for p in caught.value.problems)
    with pytest.raises(SourceNotFoundError, match="has not been ingested"):
        plane.client.submit(plane.request("media_qc", source="cam09/missing.mov"))
    with pytest.raises(UnknownRunError):
        plane.client.status("0f0f0f0f-0000-0000-0000-000000000000")
    with pytest.raises(UnknownArtifactError):
        plane.client.manifest("artifact:0f0f0f0f-0000-0000-0000-000000000000/poster")
    nowhere = ErgotClient(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(ServerUnreachableError, match="did not answer"):
        nowhere.status("anything")
    # Nothing above created a run.
    assert plane.client.list_runs(workflow="no_such_flow").runs == []


def test_events_tell_the_runs_story_in_pages(plane: Plane) -> None:
    handle = plane.client.submit(plane.request("review_proxy"))
    status = plane.client.wait(handle.run_id, 180)
    assert status.status == "SUCCESS"
    everything = plane.client.events(handle.run_id)
    kinds = [e.kind for e in everything.events if e.kind]
    assert kinds[:2] == ["run_placed", "stage_started"] and "stage_finished" in kinds
    stored = {
        e.data["artifact"]: e.data["ref"] for e in everything.events if e.kind == "artifact_stored"
    }
    assert stored == {a.name: a.ref for a in status.artifacts if a.status == "materialized"}
    paged, cursor = [], None
    while True:
        page = plane.client.events(handle.run_id, cursor=cursor, limit=3)
        paged += page.events
        cursor = page.cursor
        if not page.has_more:
            break
    assert [(e.type, e.message) for e in paged] == [(e.type, e.message) for e in everything.events]


def test_a_failed_run_says_why_and_a_retry_is_linked_to_it(plane: Plane) -> None:
    # The file changes on disk after ingest: the run refuses to process other bytes than the
    # ones the request was checked against.
    make_clip(plane.ingest / CHANGING, duration=2.5, tone_hz=880.0)
    failed = plane.client.wait(plane.client.submit(plane.request("media_qc", CHANGING)).run_id, 180)
    assert failed.status == "FAILURE"
    assert failed.error is not None and "changed since it was ingested" in failed.error.message
    assert failed.error.retryable is False
    assert [(a.name, a.status) for a in failed.artifacts] == [("report", "failed")]
    assert "changed since it was ingested" in (failed.artifacts[0].error or "")
    with pytest.raises(RetryRefusedError, match="only a FAILURE or CANCELED run"):
        plane.client.retry(plane.client.list_runs(status="SUCCESS", limit=1).runs[0].run_id)

    # The operator re-ingests the file, then retries the request.
    assert plane.ergot("ingest", CHANGING).returncode == 0
    retry = plane.client.retry(failed.run_id)
    assert retry.request_id == failed.request_id and retry.run_id != failed.run_id
    done = plane.client.wait(retry.run_id, 180)
    assert done.status == "SUCCESS"
    assert done.parent_run_id == failed.run_id
    assert [r.run_id for r in plane.client.runs_of_request(failed.request_id or "")] == [
        failed.run_id,
        retry.run_id,
    ]


def test_runs_are_listed_by_filter_a_page_at_a_time(plane: Plane) -> None:
    tag = uuid.uuid4().hex[:8]
    handles = [
        plane.client.submit(
            plane.request(
                "poster_extraction", request_id=f"list-{tag}-{i}", settings={"width": 160 + 16 * i}
            )
        )
        for i in range(3)
    ]
    for handle in handles:
        plane.client.wait(handle.run_id, 180)
    posters = plane.client.list_runs(workflow="poster_extraction", limit=100).runs
    assert {h.run_id for h in handles} <= {r.run_id for r in posters}
    assert all(r.workflow and r.workflow.startswith("poster_extraction@") for r in posters)
    assert plane.client.list_runs(workflow="poster_extraction@1", limit=100).runs == posters
    one = plane.client.list_runs(request_id=f"list-{tag}-1").runs
    assert [r.run_id for r in one] == [handles[1].run_id]
    by_source = plane.client.list_runs(source_ref=CLIP, status="SUCCESS", limit=100).runs
    assert {h.run_id for h in handles} <= {r.run_id for r in by_source}
    assert all(r.source_ref == CLIP and r.status == "SUCCESS" for r in by_source)

    seen, cursor = [], None
    while True:
        page = plane.client.list_runs(workflow="poster_extraction", limit=2, cursor=cursor)
        seen += [r.run_id for r in page.runs]
        if not page.has_more:
            break
        cursor = page.cursor
    assert seen == [r.run_id for r in posters]  # newest first, no run twice, none missed


def test_lineage_walks_back_to_the_ingested_file(plane: Plane) -> None:
    status = plane.client.wait(plane.client.submit(plane.request("poster_extraction")).run_id, 180)
    poster = next(a for a in status.artifacts if a.name == "poster")
    assert poster.ref
    tree = plane.client.lineage(poster.ref)
    assert tree.ref == poster.ref and tree.sha256 == poster.sha256
    [source] = tree.parents
    assert source.kind == "source" and source.ref == CLIP
    assert source.sha256 == _sha(plane.ingest / CLIP) and source.status == "current"


EXAMPLES = PROJECT_ROOT / "docs" / "contract" / "examples"
CURL_EXAMPLE_REQUEST = {
    "request_id": "curl-example-1",
    "workflow": "media_qc",
    "sources": {"primary": CLIP},
    "settings": {"max_silence_s": 5},
    "priority": 3,
    "context": {"from": "curl"},
}


def test_the_documented_launch_variables_are_what_the_client_sends(plane: Plane) -> None:
    variables = launch_variables(
        plane.client.plan(ProcessingRequest.model_validate(CURL_EXAMPLE_REQUEST))
    )
    example = EXAMPLES / "launch.json"
    if os.environ.get("ERGOT_WRITE_EXAMPLES") == "1":
        example.write_text(json.dumps(variables, indent=2, ensure_ascii=False) + "\n")
    assert json.loads(example.read_text()) == variables


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
def test_curl_and_jq_following_docs_contract(plane: Plane) -> None:
    def session() -> list[str]:
        result = subprocess.run(
            [str(EXAMPLES / "curl-session.sh")],
            env={**plane.env, "ERGOT_DAGSTER_URL": plane.url, "TIMEOUT_S": "180"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    lines = session()
    run_id = lines[0].removeprefix("run ")
    assert "status SUCCESS" in lines
    [artifact] = [line.split() for line in lines if line.startswith("artifact ")]
    assert artifact[1:3] == ["core/media_qc/report", f"artifact:{run_id}/report"]
    assert artifact[3] == plane.client.manifest(artifact[2]).sha256
    assert any(line.startswith("event stage_started") for line in lines)
    assert f"request run {run_id} SUCCESS" in lines
    # The same launch again is the same request: it gets the same run, not a second one.
    again = session()
    assert again[0] == lines[0]
    assert [line for line in again if line.startswith("request run")] == [
        f"request run {run_id} SUCCESS"
    ]
    status = plane.client.status(run_id)
    assert status.request is not None and status.request.context == {"from": "curl"}


def test_a_request_no_target_can_serve_fails_at_once_with_the_reason(plane: Plane) -> None:
    # The client knows the targets (from the runtime/<target> assets): refused before any run.
    with pytest.raises(RequestRejectedError, match="'gpu-box-9' is neither local, remote nor"):
        plane.client.submit(plane.request("media_qc", execution_target="gpu-box-9"))
    with pytest.raises(RequestRejectedError, match=r"\(asked: remote.*ffmpeg-local is local"):
        plane.client.submit(plane.request("media_qc", execution_target="remote"))
    # A raw GraphQL launch naming it anyway: the queue fails the run at once, saying why.
    plan = plane.client.plan(plane.request("media_qc"))
    plan.tags["ergot/execution_target"] = "gpu-box-9"
    handle = plane.client.launch(plan)
    status = plane.client.wait(handle.run_id, 60)
    assert status.status == "FAILURE"
    assert status.error is not None and "gpu-box-9" in status.error.message
    assert [a.status for a in status.artifacts] == ["failed"]
    # Refused runs are not retried: the same reason would refuse them again.
    assert status.tags["dagster/max_retries"] == "0"
