"""Off-node runs on a real second host: a network namespace with its own host name and mounts.

The control node runs `dagster dev` (webserver and daemon) on the machine's PostgreSQL, with the
artifact store and the ingest root in a bucket of a real S3 server (`moto_server`) on loopback.
`scripts/netns-host.sh up` makes the second host, exactly as docs/offnode.md tells an operator:
a network namespace joined by a veth pair, its own UTS and mount namespaces (the control node's
ERGOT_HOME hidden under tmpfs), relays for PostgreSQL and S3, and the project's code location as
a Dagster gRPC code server. The control node's launcher starts `remote` requests there.

Skipped, saying why, only where network namespaces cannot be created (or without PostgreSQL).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance
from dagster._core.launcher import LaunchRunContext
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.test_utils import instance_for_test

from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.artifacts.s3_store import S3ArtifactStore
from ergot_dagster.client import ErgotClient, RequestRejectedError, RunStatus
from ergot_dagster.media.synth import make_clip
from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.run_launcher import ErgotRunLauncher
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.settings import PROJECT_ROOT
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.sources.root import S3SourceRoot
from tests.support import dagster_dev, free_port, fresh_database, stop, until

SCRIPT = PROJECT_ROOT / "scripts" / "netns-host.sh"
LAUNCHER = {"module": "ergot_dagster.orchestration.run_launcher", "class": "ErgotRunLauncher"}


def _netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    probe = f"ergot-probe-{uuid.uuid4().hex[:6]}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# -- the launcher's refusals, without a second host --------------------------------------------


def _remote_run(instance: DagsterInstance) -> DagsterRun:
    run = DagsterRun(
        job_name="__ASSET_JOB",
        run_id=str(uuid.uuid4()),
        status=DagsterRunStatus.STARTING,
        tags={T.EXECUTION_TARGET: "remote", T.SOURCE_REF: "cam/take.mov", T.MAX_RETRIES: "2"},
    )
    instance.add_run(run)
    return run


def _failure_message(instance: DagsterInstance, run_id: str) -> str:
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == DagsterRunStatus.FAILURE
    failed = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
    return failed[-1].message if failed else ""


def test_a_remote_run_without_a_remote_server_fails_at_once_and_never_runs_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ERGOT_STORAGE", "s3://plane/artifacts")
    with instance_for_test(overrides={"run_launcher": LAUNCHER}) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, ErgotRunLauncher) and launcher.remote is None
        run = _remote_run(instance)
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
        message = _failure_message(instance, run.run_id)
        assert "Cannot run off-node: no remote code server is configured" in message
        assert instance.get_run_by_id(run.run_id).tags[T.MAX_RETRIES] == "0"  # type: ignore[union-attr]
        assert not instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)


def test_a_remote_run_with_a_store_on_this_disk_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ERGOT_STORAGE", str(tmp_path / "artifacts"))
    config = {**LAUNCHER, "config": {"remote": {"host": "10.231.0.2", "port": 4266}}}
    with instance_for_test(overrides={"run_launcher": config}) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, ErgotRunLauncher) and launcher.remote is not None
        assert launcher.remote.address == "10.231.0.2:4266"
        run = _remote_run(instance)
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
        message = _failure_message(instance, run.run_id)
        assert f"the artifact store {tmp_path / 'artifacts'} is on this node's disk" in message


# -- the two hosts -----------------------------------------------------------------------------


@dataclass
class TwoHosts:
    client: ErgotClient
    instance: DagsterInstance
    store: S3ArtifactStore
    home: Path  # the control node's ERGOT_HOME
    host: dict[str, Any]  # the second host's state, from `netns-host.sh status`
    host_args: list[str]
    env: dict[str, str]
    local_root: Path  # a directory ingest root, for the refusal
    log: Path

    def request(self, workflow: str, source: str, **fields: Any) -> ProcessingRequest:
        fields.setdefault("request_id", f"offnode-{uuid.uuid4()}")
        return ProcessingRequest(workflow=workflow, sources={"primary": source}, **fields)

    def wait(self, run_id: str, *statuses: str, timeout_s: float = 120) -> RunStatus:
        wanted = statuses or ("SUCCESS", "FAILURE", "CANCELED")

        def reached() -> RunStatus | None:
            status = self.client.status(run_id)
            return status if status.status in wanted else None

        return until(f"run {run_id} to be {'/'.join(wanted)}", reached, timeout_s)

    def script(self, command: str, *args: str) -> str:
        done = subprocess.run(
            [str(SCRIPT), command, *self.host_args, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def in_host(self, *command: str) -> subprocess.CompletedProcess[str]:
        """A command run on the second host (its network, host name and mounts)."""
        return subprocess.run(
            [str(SCRIPT), "exec", *self.host_args, "--", *command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def events(self, run_id: str, kind: str) -> list[dict[str, Any]]:
        found = []
        for entry in self.instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
            data = entry.dagster_event.engine_event_data if entry.dagster_event else None
            if data is not None and data.metadata.get("ergot_event") is not None:
                fields = {k: getattr(v, "value", v) for k, v in data.metadata.items()}
                if fields["ergot_event"] == kind:
                    found.append(fields)
        return found

    def manifests(self, run_id: str) -> dict[str, ArtifactManifest]:
        return {m.name: m for m in self.store.list_run(run_id)}

    def worker_pid(self, run_id: str) -> int:
        def recorded() -> str | None:
            identity = self.client.status(run_id).tags.get(T.WORKER, "")
            return identity if identity.startswith(f"{run_id}@") else None

        identity = until("the run worker's identity", recorded)
        return int(identity.split("@", 1)[1].split(":")[1])

    def will_retry(self, run_id: str) -> None:
        """Wait for Dagster to mark a failed run for retry: the tag follows the failure itself."""
        until(
            f"run {run_id} to be marked for a retry",
            lambda: self.client.status(run_id).tags.get("dagster/will_retry") == "true",
            timeout_s=30,
        )

    def ffmpeg_in_host(self) -> list[int]:
        found = self.in_host("pgrep", "-f", "ffmpeg.*fetched-")
        return [int(pid) for pid in found.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class _Moto:
    def __init__(self, workdir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                *(str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1"),
                *("-p", self.url.rsplit(":", 1)[1]),
            ],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"moto_server exited with status {self.proc.returncode}")
            try:
                return httpx.get(f"{self.url}/moto-api/", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        until("moto_server to answer", ready, timeout_s=30)


def _targets(path: Path) -> None:
    """The repository's targets, plus the second host's own ffmpeg as a remote target."""
    targets = yaml.safe_load((PROJECT_ROOT / "runtime_targets.yaml").read_text())
    ffmpeg = next(t for t in targets["targets"] if t["name"] == "ffmpeg-local")
    targets["targets"].append(
        {**ffmpeg, "name": "ffmpeg-offnode", "locality": {"kind": "remote", "site": "netns"}}
    )
    path.write_text(yaml.safe_dump(targets))


def _instance_yaml(path: Path, host: dict[str, Any]) -> None:
    """deploy/dagster.postgres.yaml with the second host as the launcher's remote code server."""
    config = yaml.safe_load((PROJECT_ROOT / "deploy" / "dagster.postgres.yaml").read_text())
    config["run_launcher"]["config"] = {
        "remote": {
            "host": host["remote_ip"],
            "port": host["port"],
            "unreachable_timeout_seconds": 60,
        }
    }
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"off-node runs need a second host made with network namespaces: {reason}")
    root = tmp_path_factory.mktemp("offnode")
    home, conf, media = root / "home", root / "conf", root / "media"
    for directory in (home / "dagster", conf, media):
        directory.mkdir(parents=True)
    saved_env = dict(os.environ)
    moto = _Moto(root)
    name = f"ergot-{uuid.uuid4().hex[:8]}"
    host_args = ["--name", name, "--state-dir", str(root / "netns")]
    try:
        with fresh_database("ergot_offnode") as pg_url:
            bucket = f"offnode-{uuid.uuid4().hex[:10]}"
            _targets(conf / "runtime_targets.yaml")
            os.environ.update(
                {
                    "ERGOT_HOME": str(home),
                    "DAGSTER_HOME": str(home / "dagster"),
                    "ERGOT_PG_URL": pg_url,
                    "ERGOT_STORAGE": f"s3://{bucket}/artifacts",
                    "ERGOT_INGEST_ROOT": f"s3://{bucket}/ingest",
                    "ERGOT_RUNTIME_TARGETS": str(conf / "runtime_targets.yaml"),
                    "ERGOT_INGEST_INTERVAL_S": "3600",
                    "AWS_ACCESS_KEY_ID": "ergot-test-key",
                    "AWS_SECRET_ACCESS_KEY": "ergot-test-secret",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": moto.url,
                    "AWS_CONFIG_FILE": str(conf / "no-aws-config"),
                    "AWS_SHARED_CREDENTIALS_FILE": str(conf / "no-aws-credentials"),
                    "AWS_EC2_METADATA_DISABLED": "true",
                }
            )
            for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
                os.environ.pop(var, None)
            env = dict(os.environ)
            boto3.client("s3").create_bucket(Bucket=bucket)
            try:
                up = subprocess.run(
                    [str(SCRIPT), "up", *host_args, "--subnet", "auto"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=240,
                )
                assert up.returncode == 0, up.stderr
                host = yaml.safe_load(up.stdout)
                _instance_yaml(home / "dagster" / "dagster.yaml", host)

                # Media in the bucket, as a capture node's sync would leave it.
                s3 = boto3.client("s3")
                make_clip(media / "short.mov", duration=4.0)
                make_clip(media / "long.mov", duration=60.0, size="640x360")
                for clip in ("short.mov", "long.mov"):
                    s3.upload_file(str(media / clip), bucket, f"ingest/cam/{clip}")
                instance = DagsterInstance.from_config(str(home / "dagster"))
                outcomes = ingest_refs(
                    S3SourceRoot(f"s3://{bucket}/ingest"),
                    ["cam/short.mov", "cam/long.mov"],
                    lambda key: latest_source_record(instance, key),
                )
                assert all(o.record for o in outcomes), [o.error for o in outcomes]
                record_sources(instance, [o.record for o in outcomes if o.record])
                # And one source ingested from a directory on this node, which must not go remote.
                local_root = root / "local-ingest"
                make_clip(local_root / "desk" / "local.mov", duration=2.0)
                local = ingest_refs(
                    local_root, ["desk/local.mov"], lambda key: latest_source_record(instance, key)
                )
                record_sources(instance, [o.record for o in local if o.record])

                log = root / "dagster-dev.log"
                with dagster_dev(home, env, log) as url:
                    yield TwoHosts(
                        client=ErgotClient(url),
                        instance=instance,
                        store=S3ArtifactStore(f"s3://{bucket}/artifacts"),
                        home=home,
                        host=host,
                        host_args=host_args,
                        env=env,
                        local_root=local_root,
                        log=log,
                    )
            finally:
                subprocess.run(
                    [str(SCRIPT), "down", *host_args], env=env, capture_output=True, timeout=120
                )
    finally:
        stop(moto.proc)
        os.environ.clear()
        os.environ.update(saved_env)


# -- the tests ---------------------------------------------------------------------------------


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_the_same_request_local_and_remote_makes_the_same_bytes_on_two_hosts(
    hosts: TwoHosts,
) -> None:
    settings = {"width": 320}
    local = hosts.client.submit(
        hosts.request("poster_extraction", "cam/short.mov", settings=settings)
    )
    remote = hosts.client.submit(
        hosts.request(
            "poster_extraction", "cam/short.mov", settings=settings, execution_target="remote"
        )
    )
    assert hosts.wait(local.run_id).status == "SUCCESS"
    done = hosts.wait(remote.run_id)
    assert done.status == "SUCCESS", (done.error, hosts.log.read_text()[-3000:])
    assert done.targets == ["ffmpeg-offnode"]

    here, there = hosts.manifests(local.run_id), hosts.manifests(remote.run_id)
    assert set(here) == set(there) == {"poster", "poster_info"}
    assert {n: m.sha256 for n, m in here.items()} == {n: m.sha256 for n, m in there.items()}
    assert all(m.uri.startswith("s3://") for m in [*here.values(), *there.values()])

    # Where each ran: in the manifests and in the run_placed event.
    for manifest in here.values():
        assert manifest.executed_by is not None
        assert (manifest.executed_by.host, manifest.executed_by.launcher) == (
            socket.gethostname(),
            "local",
        )
        assert manifest.executed_by.code_server is None
    address = f"{hosts.host['remote_ip']}:{hosts.host['port']}"
    for manifest in there.values():
        placed = manifest.executed_by
        assert placed is not None
        assert (placed.host, placed.launcher, placed.code_server) == (
            hosts.host["hostname"],
            "remote",
            address,
        )
    [placed_event] = hosts.events(remote.run_id, "run_placed")
    assert placed_event["host"] == hosts.host["hostname"] != socket.gethostname()
    assert placed_event["code_server"] == address
    assert placed_event["pid"] == there["poster"].executed_by.pid  # type: ignore[union-attr]
    assert (
        hosts.client.status(remote.run_id)
        .tags[T.WORKER]
        .startswith(f"{remote.run_id}@{hosts.host['hostname']}:")
    )
    events = hosts.client.events(remote.run_id).events
    assert next(e.kind for e in events if e.kind) == "run_placed"

    # The control node's disk holds nothing of either run: no scratch, no fetched source, no
    # bytes of the artifacts or of the source, nothing named after the remote run.
    record = latest_source_record(hosts.instance, ref_to_partition_key("cam/short.mov"))
    assert record is not None
    source_sha = record.sha256
    wanted = {m.sha256 for m in there.values()} | {source_sha}
    for path in _files_under(hosts.home):
        assert remote.run_id not in str(path), path
        assert _sha256(path) not in wanted, f"{path} holds the bytes of a run's file"
    scratch = hosts.home / "tmp"
    assert not scratch.exists() or not list(scratch.iterdir())
    assert not (hosts.home / "artifacts").exists()
    # The second host's private home is invisible here: an empty mount point.
    assert list(Path(hosts.host["root"]).iterdir()) == []


def test_a_remote_request_with_an_input_on_this_disk_is_refused_naming_it(
    hosts: TwoHosts,
) -> None:
    with pytest.raises(RequestRejectedError) as refused:
        hosts.client.submit(
            hosts.request("poster_extraction", "desk/local.mov", execution_target="remote")
        )
    message = str(refused.value)
    assert "cannot run remote" in message
    uri = (hosts.local_root / "desk" / "local.mov").as_uri()
    assert f"input 'source' (desk/local.mov) is {uri} on this node's disk" in message


def test_a_remote_run_cancelled_mid_run_ends_canceled_and_its_worker_is_gone(
    hosts: TwoHosts,
) -> None:
    handle = hosts.client.submit(
        hosts.request(
            "review_proxy",
            "cam/long.mov",
            settings={"preset": "slow", "height": 360},
            execution_target="remote",
        )
    )
    hosts.wait(handle.run_id, "STARTED")
    worker = hosts.worker_pid(handle.run_id)
    ffmpeg = until("ffmpeg to run on the second host", hosts.ffmpeg_in_host, timeout_s=60)
    # Mid-run, the source is fetched and the stage works on the second host, not here.
    remote_tmp = hosts.in_host("sh", "-c", 'ls "$0"', f"{hosts.host['root']}/ergot/tmp")
    assert "fetched-" in remote_tmp.stdout and "work-" in remote_tmp.stdout, remote_tmp
    assert not (hosts.home / "tmp").exists() or not list((hosts.home / "tmp").iterdir())

    status = hosts.client.cancel(handle.run_id)
    assert status.status in ("CANCELING", "CANCELED")
    assert hosts.wait(handle.run_id).status == "CANCELED"
    until(
        "the remote worker and its ffmpeg to be gone",
        lambda: not any(_alive(p) for p in [worker, *ffmpeg]),
        timeout_s=30,
    )
    assert hosts.manifests(handle.run_id) == {}
    until(
        "the second host's scratch space to be cleaned",
        lambda: (
            hosts.in_host("sh", "-c", 'ls "$0"', f"{hosts.host['root']}/ergot/tmp").stdout == ""
        ),
    )


def test_a_killed_remote_worker_fails_its_run_and_a_retry_runs_remotely(hosts: TwoHosts) -> None:
    first = hosts.client.submit(
        hosts.request(
            "review_proxy",
            "cam/long.mov",
            settings={"preset": "medium", "height": 360},
            execution_target="remote",
            max_retries=1,
        )
    )
    hosts.wait(first.run_id, "STARTED")
    worker = hosts.worker_pid(first.run_id)
    until("ffmpeg to run on the second host", hosts.ffmpeg_in_host, timeout_s=60)
    killed = hosts.in_host("kill", "-KILL", str(worker))
    assert killed.returncode == 0, killed.stderr

    assert hosts.wait(first.run_id, "FAILURE").status == "FAILURE"
    hosts.will_retry(first.run_id)
    final = hosts.client.wait(first.run_id, timeout_s=180)
    assert final.status == "SUCCESS" and final.parent_run_id == first.run_id
    proxy = hosts.manifests(final.run_id)["proxy"]
    assert proxy.executed_by is not None and proxy.executed_by.host == hosts.host["hostname"]
    assert proxy.executed_by.pid != worker


def test_a_lost_code_server_is_found_by_run_monitoring_and_the_retry_runs_remotely(
    hosts: TwoHosts,
) -> None:
    """The code server dies with its worker (a crashed host, restarted): nothing on the second
    host can report the run any more, so run monitoring asks the restarted server, which does not
    run it, and fails it; run retries start it again there."""
    first = hosts.client.submit(
        hosts.request(
            "review_proxy",
            "cam/long.mov",
            settings={"preset": "medium", "height": 360},
            execution_target="remote",
            max_retries=1,
        )
    )
    hosts.wait(first.run_id, "STARTED")
    worker = hosts.worker_pid(first.run_id)
    until("ffmpeg to run on the second host", hosts.ffmpeg_in_host, timeout_s=60)
    server = int(yaml.safe_load(hosts.script("status"))["server_pid"])
    # The code server leads its process group, with the run workers it started.
    killed = hosts.in_host("kill", "-KILL", "--", f"-{server}")
    assert killed.returncode == 0, killed.stderr
    until("the code server and its worker to be gone", lambda: not _alive(worker))
    hosts.script("restart")

    failed = hosts.wait(first.run_id, "FAILURE", timeout_s=90)
    assert failed.status == "FAILURE"
    messages = [e.message or "" for e in hosts.instance.all_logs(first.run_id)]
    assert any("no longer runs this run" in m for m in messages), messages[-5:]
    hosts.will_retry(first.run_id)
    final = hosts.client.wait(first.run_id, timeout_s=180)
    assert final.status == "SUCCESS" and final.parent_run_id == first.run_id
    proxy = hosts.manifests(final.run_id)["proxy"]
    assert proxy.executed_by is not None and proxy.executed_by.launcher == "remote"
    assert proxy.executed_by.host == hosts.host["hostname"]


def test_a_host_that_cannot_come_up_leaves_nothing_behind(tmp_path: Path) -> None:
    """`up` without the shared PostgreSQL refuses, and undoes the namespace it had made."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"network namespaces cannot be created here: {reason}")
    env = {**os.environ, "ERGOT_STORAGE": "s3://b/a", "ERGOT_INGEST_ROOT": "s3://b/i"}
    env.pop("ERGOT_PG_URL", None)
    name = f"ergot-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [str(SCRIPT), "up", "--name", name, "--subnet", "auto", "--state-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "ERGOT_PG_URL is not set" in done.stderr
    assert (
        name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    assert not (tmp_path / "state.json").exists()
