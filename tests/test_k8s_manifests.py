"""The Kubernetes profile, proven without a cluster: the Jobs the run launcher creates.

A request is planned by `plan_run` with the real definitions and targets, launched through
Dagster's GraphQL `launchRun` (the client's own mutation) into the instance of
deploy/k8s/dagster.yaml on a real PostgreSQL, and dequeued by Dagster's queue daemon, which
calls the profile's run launcher. The launcher (Dagster's K8sRunLauncher with our subclass)
builds the Job with dagster-k8s's own job builders and creates it with the kubernetes client
against a loopback API server (tests/servers/k8s_api_server.py), which keeps the JSON it was
sent. The tests read that JSON as a cluster operator would read `kubectl get job -o json`.

Only two keys of deploy/k8s/dagster.yaml change for the test: the launcher loads a kubeconfig
file (the loopback) instead of the in-cluster service account, and PostgreSQL's port is the
test server's when it is not 5432.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus
from dagster._config import validate_config
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)
from dagster_graphql.test.utils import execute_dagster_graphql
from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY
from pydantic import ValidationError

from ergot_dagster.artifacts.store import open_store
from ergot_dagster.client import queries as Q
from ergot_dagster.client.client import launch_variables
from ergot_dagster.media.synth import make_audio, make_clip
from ergot_dagster.orchestration.k8s import K8S_CONFIG_TAG, SchedulingConflict, scheduling_config
from ergot_dagster.orchestration.k8s_launcher import ErgotK8sRunLauncher
from ergot_dagster.requests.catalog import LocalCatalog
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.requests.planning import RunPlan, plan_run
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import latest_source_record, record_sources
from ergot_dagster.targets.config import load_targets
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.loader import load_registry
from tests.servers.k8s_api_server import KubernetesApiLoopback
from tests.support import ADMIN_URL, fresh_database

DEPLOY = PROJECT_ROOT / "deploy" / "k8s"
COMFYUI_DEFS = PROJECT_ROOT / "examples" / "comfyui" / "workflow_defs"
COMFYUI_TARGETS = PROJECT_ROOT / "examples" / "comfyui" / "runtime_targets.yaml"
IMAGE = "registry.internal/ergot/ergot-dagster:0.1.0-test"
NAMESPACE = "ergot"


@dataclass
class Cluster:
    """One plane on the profile's instance, with the loopback API and the secrets it was given."""

    instance: DagsterInstance
    api: KubernetesApiLoopback
    secrets: list[str]
    ingest_root: Path
    storage: str

    def use(self, monkeypatch: pytest.MonkeyPatch, defs: Path, targets: Path) -> None:
        monkeypatch.setenv("ERGOT_WORKFLOW_DEFS", str(defs))
        monkeypatch.setenv("ERGOT_RUNTIME_TARGETS", str(targets))
        # The code location is imported in this process: import it anew for these definitions.
        monkeypatch.delitem(sys.modules, "ergot_dagster.definitions", raising=False)

    def ingest(self, ref: str) -> None:
        make_clip(self.ingest_root / ref, duration=1.0, size="320x180")
        outcomes = ingest_refs(
            self.ingest_root, [ref], lambda key: latest_source_record(self.instance, key)
        )
        record_sources(self.instance, [o.record for o in outcomes if o.record])

    def plan(self, defs: Path, targets: Path, **request: Any) -> RunPlan:
        catalog = LocalCatalog(
            load_registry(defs), self.instance, open_store(self.storage), load_targets(targets)
        )
        return plan_run(ProcessingRequest.model_validate(request), catalog)

    def launch(self, plan: RunPlan) -> str:
        """Launch through GraphQL as the client does, then let the queue daemon dequeue it."""
        origin = InProcessCodeLocationOrigin(
            LoadableTargetOrigin(
                executable_path=sys.executable,
                module_name="ergot_dagster.definitions",
                attribute="defs",
            ),
            # What the Helm chart's code server reports (its DAGSTER_CURRENT_IMAGE).
            container_image=IMAGE,
            location_name="ergot",
        )
        variables = launch_variables(plan)
        with WorkspaceProcessContext(self.instance, InProcessWorkspaceLoadTarget(origin)) as ctx:
            result = execute_dagster_graphql(ctx.create_request_context(), Q.LAUNCH, variables)
            assert result.errors is None, result.errors
            launched = result.data["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            run_id = launched["run"]["runId"]
            list(QueuedRunCoordinatorDaemon(interval_seconds=1).run_iteration(ctx))
        return run_id


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    admin = urlsplit(ADMIN_URL)
    pg_password = admin.password or f"pg-{uuid.uuid4().hex}"
    aws_secret = f"aws-{uuid.uuid4().hex}"
    with fresh_database("ergot_k8s") as url, KubernetesApiLoopback() as api:
        home = tmp_path / "ergot"
        dagster_home = home / "dagster"
        dagster_home.mkdir(parents=True)
        (home / "ingest").mkdir()
        config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
        launcher = config["run_launcher"]["config"]
        launcher["load_incluster_config"] = False
        launcher["kubeconfig_file"] = str(api.kubeconfig(tmp_path / "kubeconfig", NAMESPACE))
        config["storage"]["postgres"]["postgres_db"]["port"] = admin.port or 5432
        (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
        env = {
            "ERGOT_HOME": str(home),
            "DAGSTER_HOME": str(dagster_home),
            "ERGOT_STORAGE": str(home / "artifacts"),
            "ERGOT_INGEST_ROOT": str(home / "ingest"),
            # What the Secrets and ConfigMaps give the webserver and daemon pods.
            "DAGSTER_PG_HOST": admin.hostname or "127.0.0.1",
            "DAGSTER_PG_DB": urlsplit(url).path.lstrip("/"),
            "DAGSTER_PG_USER": admin.username or "postgres",
            "DAGSTER_PG_PASSWORD": pg_password,
            "ERGOT_COMPUTE_LOGS_BUCKET": "ergot-compute-logs",
            "AWS_ACCESS_KEY_ID": "AKIALOOPBACKTEST",
            "AWS_SECRET_ACCESS_KEY": aws_secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            yield Cluster(
                instance=instance,
                api=api,
                secrets=[pg_password, aws_secret],
                ingest_root=home / "ingest",
                storage=str(home / "artifacts"),
            )


def _container(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["dagster"]
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _assert_common(cluster: Cluster, job: dict[str, Any], run_id: str) -> None:
    """What every run's Job has, whichever its targets: the profile's launcher settings."""
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == f"dagster-run-{run_id}"
    # Created in the profile's namespace (the path says it; the stored Job carries it).
    assert ("POST", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs") in cluster.api.requests
    assert (NAMESPACE, job["metadata"]["name"]) in cluster.api.jobs
    assert job["metadata"]["labels"]["dagster/run-id"] == run_id
    assert job["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ergot-plane"
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "ergot-run"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["dagster/run-id"] == run_id and labels["dagster/code-location"] == "ergot"
    container = _container(job)
    assert container["image"] == IMAGE
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    # The run worker command: `dagster api execute_run <serialized args>`, as arguments to the
    # image's entrypoint.
    assert "command" not in container
    args = container["args"]
    assert args[:3] == ["dagster", "api", "execute_run"] and len(args) == 4
    execute = json.loads(args[3])
    assert execute["__class__"] == "ExecuteRunArgs"
    assert execute["pipeline_run_id"] == run_id
    assert "ergot_dagster.definitions" in args[3]
    env = _env(container)
    assert env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"
    assert env["DAGSTER_RUN_JOB_NAME"] == "__ASSET_JOB"
    assert env["DAGSTER_PG_PASSWORD"] == {
        "secretKeyRef": {"key": "postgresql-password", "name": "ergot-postgresql"}
    }
    assert env["ERGOT_RUNTIME_TARGETS"] and env["ERGOT_WORKFLOW_DEFS"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": "ergot-plane-env"}},
        {"secretRef": {"name": "ergot-object-storage"}},
        {"secretRef": {"name": "ergot-runtime-tokens"}},
    ]
    # Secrets travel as references: no value the plane was given is in the Job.
    text = json.dumps(job)
    for secret in cluster.secrets:
        assert secret not in text
    # The instance reaches the run worker in its arguments: PostgreSQL's settings as the names
    # of variables (ergot-plane-env and the password Secret set them in the pod), never values.
    storage = yaml.safe_load(execute["instance_ref"]["run_storage_data"]["config_yaml"])
    assert storage["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert storage["postgres_db"]["hostname"] == {"env": "DAGSTER_PG_HOST"}


@pytest.mark.postgres
def test_gpu_comfyui_request_becomes_a_job_on_a_gpu_node(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.use(monkeypatch, COMFYUI_DEFS, COMFYUI_TARGETS)
    cluster.ingest("cam/take 01.mov")
    plan = cluster.plan(
        COMFYUI_DEFS,
        COMFYUI_TARGETS,
        request_id="k8s-gpu-1",
        workflow="image_from_prompt",
        sources={"primary": "cam/take 01.mov"},
        settings={"prompt": "a lighthouse at dawn"},
    )
    # The tag comes from routing: the ComfyUI target's hints, nothing from this test.
    hints = json.loads(plan.tags[K8S_CONFIG_TAG])
    assert hints["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    run_id = cluster.launch(plan)
    run = cluster.instance.get_run_by_id(run_id)
    assert run is not None and run.status == DagsterRunStatus.STARTING, run and run.status
    assert run.tags["ergot/target.comfyui-loop"] == "comfyui"
    assert run.tags["dagster/image"] == IMAGE
    assert ("POST", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs") in cluster.api.requests
    [job] = cluster.api.created
    _assert_common(cluster, job, run_id)

    container = _container(job)
    # The launcher's default request is kept where the target says nothing (none here), and the
    # target's resources win: a GPU, as a limit (Kubernetes never overcommits devices).
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    assert _env(container)["ERGOT_RUNTIME_TARGETS"] == str(COMFYUI_TARGETS)

    # Run monitoring asks the launcher about the worker: it reads the Job from the API.
    health = cluster.instance.run_launcher.check_run_worker_health(run)
    assert health.status.value == "RUNNING"
    assert (
        "GET",
        f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job['metadata']['name']}/status",
    ) in (cluster.api.requests)


@pytest.mark.postgres
def test_cpu_ffmpeg_request_becomes_a_job_without_a_gpu(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    defs, targets = PROJECT_ROOT / "workflow_defs", DEPLOY / "runtime_targets.yaml"
    cluster.use(monkeypatch, defs, targets)
    cluster.ingest("cam/take 02.mov")
    plan = cluster.plan(
        defs,
        targets,
        request_id="k8s-cpu-1",
        workflow="poster_extraction",
        sources={"primary": "cam/take 02.mov"},
        priority=5,
        timeout_s=600,
    )
    run_id = cluster.launch(plan)
    run = cluster.instance.get_run_by_id(run_id)
    assert run is not None and run.status == DagsterRunStatus.STARTING
    assert run.tags["ergot/target.ffmpeg-cpu"] == "ffmpeg"
    [job] = cluster.api.created
    _assert_common(cluster, job, run_id)

    container = _container(job)
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    assert not any("gpu" in name for part in container["resources"].values() for name in part)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
    assert "tolerations" not in pod or not pod["tolerations"]
    assert _env(container)["ERGOT_RUNTIME_TARGETS"] == str(targets)

    # Cancelling the run deletes its Job.
    assert cluster.instance.run_launcher.terminate(run_id)
    assert cluster.api.deleted == [job["metadata"]["name"]]


@pytest.mark.postgres
def test_a_run_launched_without_planning_is_scheduled_from_its_routing(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run from the UI or a sensor has no planned tag; the launcher writes it from routing."""
    cluster.use(monkeypatch, COMFYUI_DEFS, COMFYUI_TARGETS)
    cluster.ingest("cam/take 03.mov")
    plan = cluster.plan(
        COMFYUI_DEFS,
        COMFYUI_TARGETS,
        request_id="k8s-ui-1",
        workflow="image_from_prompt",
        sources={"primary": "cam/take 03.mov"},
    )
    unplanned = plan.model_copy(
        update={"tags": {k: v for k, v in plan.tags.items() if k != K8S_CONFIG_TAG}}
    )
    run_id = cluster.launch(unplanned)
    run = cluster.instance.get_run_by_id(run_id)
    assert run is not None and run.tags[K8S_CONFIG_TAG] == plan.tags[K8S_CONFIG_TAG]
    [job] = cluster.api.created
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.postgres
def test_a_tag_asking_for_more_than_placement_is_refused(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only resources, node selector, tolerations, service account and labels may come from a
    run's tag: a host path volume asked for by a GraphQL caller never reaches the cluster."""
    defs, targets = PROJECT_ROOT / "workflow_defs", DEPLOY / "runtime_targets.yaml"
    cluster.use(monkeypatch, defs, targets)
    cluster.ingest("cam/take 04.mov")
    plan = cluster.plan(
        defs,
        targets,
        request_id="k8s-bad-1",
        workflow="poster_extraction",
        sources={"primary": "cam/take 04.mov"},
    )
    hostile = {"pod_spec_config": {"volumes": [{"name": "h", "host_path": {"path": "/"}}]}}
    tags = {**plan.tags, K8S_CONFIG_TAG: json.dumps(hostile)}
    run_id = cluster.launch(plan.model_copy(update={"tags": tags}))
    assert cluster.api.created == []
    run = cluster.instance.get_run_by_id(run_id)
    assert run is not None and run.status == DagsterRunStatus.FAILURE
    errors = [
        event.dagster_event.engine_event_data.error.to_string()
        for event in cluster.instance.all_logs(run_id)
        if event.dagster_event
        and event.dagster_event.event_type_value == "ENGINE_EVENT"
        and event.dagster_event.engine_event_data.error
    ]
    assert any("violated the allowed list: pod_spec_config.volumes" in error for error in errors), (
        errors
    )


# -- scheduling hints and their merge, without a cluster -----------------------------------


def _target(name: str, runtime: str, kubernetes: dict[str, Any]) -> RuntimeTarget:
    return RuntimeTarget.model_validate(
        {"name": name, "runtime": runtime, "routing": {"kubernetes": kubernetes}}
    )


def test_our_tag_is_dagster_k8s_own() -> None:
    assert K8S_CONFIG_TAG == USER_DEFINED_K8S_CONFIG_KEY


def test_targets_of_one_run_are_merged() -> None:
    cpu = _target(
        "ffmpeg-cpu",
        "ffmpeg",
        {
            "node_selector": {"kubernetes.io/arch": "amd64"},
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2"}},
            "labels": {"team": "media"},
        },
    )
    gpu = _target(
        "comfyui-gpu",
        "comfyui",
        {
            "node_selector": {"kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "resources": {
                "requests": {"cpu": "500m", "memory": "8Gi"},
                "limits": {"nvidia.com/gpu": 1},
            },
        },
    )
    assert scheduling_config([cpu, gpu]) == {
        "container_config": {
            "resources": {
                "requests": {"cpu": "1", "memory": "8Gi"},
                "limits": {"cpu": "2", "nvidia.com/gpu": "1"},
            }
        },
        "pod_spec_config": {
            "node_selector": {"kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        },
        "pod_template_spec_metadata": {"labels": {"team": "media"}},
    }
    # A target without hints, or with an empty block, adds nothing: the launcher's defaults.
    assert scheduling_config([_target("plain", "ffmpeg", {})]) is None
    assert scheduling_config([RuntimeTarget(name="bare", runtime="ffmpeg")]) is None


def test_conflicting_targets_are_refused_naming_both() -> None:
    a = _target("cpu-pool", "ffmpeg", {"node_selector": {"ergot.io/pool": "cpu"}})
    b = _target("gpu-pool", "comfyui", {"node_selector": {"ergot.io/pool": "gpu"}})
    with pytest.raises(SchedulingConflict, match=r"targets cpu-pool and gpu-pool .* ergot.io/pool"):
        scheduling_config([a, b])
    c = _target("small", "ffmpeg", {"resources": {"limits": {"memory": "1Gi"}}})
    d = _target("big", "tts", {"resources": {"requests": {"memory": "4Gi"}}})
    with pytest.raises(SchedulingConflict, match="memory request 4Gi is more than the limit 1Gi"):
        scheduling_config([c, d])


def test_planning_refuses_a_run_whose_targets_cannot_share_a_pod(
    plane_settings: ErgotSettings,
    instance: DagsterInstance,
    ingest_root: Path,
    tmp_path: Path,
) -> None:
    """voice_prompt_extraction runs a transcription and a voice prompt stage in one run: targets
    that want different node pools for them make a plan no pod can hold."""
    targets = tmp_path / "targets.yaml"
    targets.write_text(
        yaml.safe_dump(
            {
                "targets": [
                    {
                        "name": "whisper-gpu",
                        "runtime": "transcription",
                        "capabilities": ["speech.transcribe"],
                        "routing": {"kubernetes": {"node_selector": {"ergot.io/pool": "gpu"}}},
                    },
                    {
                        "name": "vad-cpu",
                        "runtime": "voice_prompt",
                        "capabilities": ["voice.prompt"],
                        "routing": {"kubernetes": {"node_selector": {"ergot.io/pool": "cpu"}}},
                    },
                ]
            }
        )
    )
    make_audio(ingest_root / "mic" / "voice.wav", duration=1.0)
    outcomes = ingest_refs(
        ingest_root, ["mic/voice.wav"], lambda key: latest_source_record(instance, key)
    )
    record_sources(instance, [o.record for o in outcomes if o.record])
    catalog = LocalCatalog(
        load_registry(PROJECT_ROOT / "workflow_defs"),
        instance,
        open_store(plane_settings.storage),
        load_targets(targets),
    )
    request = ProcessingRequest.model_validate(
        {
            "request_id": "mixed-1",
            "workflow": "voice_prompt_extraction",
            "sources": {"primary": "mic/voice.wav"},
        }
    )
    with pytest.raises(SchedulingConflict) as caught:
        plan_run(request, catalog)
    assert str(caught.value) == (
        "targets vad-cpu and whisper-gpu cannot share a Kubernetes pod: node label ergot.io/pool "
        "is 'cpu' for vad-cpu and 'gpu' for whisper-gpu"
    )


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"resources": {"requests": {"nvidia.com/gpu": "1"}}}, "nvidia.com/gpu goes in `limits`"),
        (
            {"resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "2"}}},
            "must be equal",
        ),
        ({"resources": {"limits": {"nvidia.com/gpu": "0.5"}}}, "whole units"),
        ({"resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}}, "more than the limit"),
        ({"resources": {"requests": {"memory": "lots"}}}, "not a Kubernetes quantity"),
        ({"node_selector": {"gpu type": "a100"}}, "not a valid Kubernetes label key"),
        ({"node_selector": {"gpu": "a" * 64}}, "not a valid Kubernetes label value"),
        ({"tolerations": [{"operator": "Exists", "value": "x"}]}, "takes no `value`"),
        ({"tolerations": [{"key": "k", "toleration_seconds": 5}]}, "only to effect NoExecute"),
        ({"service_account_name": "Bad_Name"}, "service account name"),
        ({"node_selectors": {}}, "node_selectors"),
    ],
)
def test_bad_hints_are_refused_naming_the_field(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _target("gpu-1", "comfyui", block)
    assert message in str(caught.value)
    assert "routing.kubernetes" in str(caught.value)


def test_the_profile_files_are_consistent() -> None:
    """The instance file names the launcher subclass and the tag allowlist; the targets load."""
    config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == (
        "ergot_dagster.orchestration.k8s_launcher",
        "ErgotK8sRunLauncher",
    )
    allowed = launcher["config"]["only_allow_user_defined_k8s_config_fields"]
    assert allowed["container_config"] == {"resources": True}
    targets = load_targets(DEPLOY / "runtime_targets.yaml")
    # Every target of the cluster file can share a run with every other.
    assert scheduling_config(targets.targets) is not None


# -- the run image --------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions (keyword, arguments), continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "a continuation line ends the Dockerfile"
    out = []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _ignored(pattern_file: Path) -> list[str]:
    return [
        line.strip()
        for line in pattern_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_the_run_image_is_built_as_the_profile_expects() -> None:
    steps = _instructions(PROJECT_ROOT / "Dockerfile")
    keywords = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim-bookworm")
    assert keywords.count("FROM") == 1

    runs = " ".join(args for k, args in steps if k == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends [^&]*\bffmpeg\b", runs)
    assert re.search(r"apt-get install [^&]*\bespeak-ng\b", runs)
    # The package itself, without the dev extras.
    assert "pip install . " in runs + " " and "[dev]" not in runs

    env: dict[str, str] = {}
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(dict(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", args)))
    assert (
        env["DAGSTER_HOME"]
        == yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["run_launcher"]["config"][
            "dagster_home"
        ]
    )
    # No secret baked in: no credential-like variable or build argument, no env file copied.
    for keyword, args in steps:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY)\b", args), args
        if keyword in ("COPY", "ADD"):
            assert ".env" not in args and "secret" not in args.lower(), args
    assert "ADD" not in keywords

    # The definitions and targets the ERGOT_* variables name are copied to those paths.
    copies = {args.split()[-1]: args.split()[0] for k, args in steps if k == "COPY"}
    assert copies[env["ERGOT_WORKFLOW_DEFS"]] == "workflow_defs"
    assert copies[env["ERGOT_RUNTIME_TARGETS"]] == "deploy/k8s/runtime_targets.yaml"
    ignored = _ignored(PROJECT_ROOT / ".dockerignore")
    for source in copies.values():
        assert (PROJECT_ROOT / source).exists(), source
        assert source.split("/")[0] not in ignored, f"{source} is excluded by .dockerignore"
    for local_state in (".git", ".venv", ".ergot", ".env"):
        assert local_state in ignored

    # A non-root user by number (the kubelet can only check runAsNonRoot for a numeric user).
    user = [args for k, args in steps if k == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")

    # The launcher gives a run's Job only `args`: the entrypoint must pass them on, unchanged.
    entrypoint = json.loads(next(args for k, args in steps if k == "ENTRYPOINT"))
    assert entrypoint == ["/usr/bin/tini", "--"]
    assert "tini" in runs
    command = json.loads(next(args for k, args in steps if k == "CMD"))
    assert command[:3] == ["dagster", "api", "grpc"]
    assert command[command.index("--module-name") + 1] == "ergot_dagster.definitions"


def test_the_helm_values_say_what_the_instance_file_says() -> None:
    """The chart's values configure the same queue and launcher as deploy/k8s/dagster.yaml, in
    the chart's names, and the launcher's config is one Dagster accepts."""
    values = yaml.safe_load((PROJECT_ROOT / "deploy" / "helm" / "values.yaml").read_text())
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())

    custom = values["runLauncher"]["config"]["customRunLauncher"]
    launcher = instance["run_launcher"]
    assert values["runLauncher"]["type"] == "CustomRunLauncher"
    assert (custom["module"], custom["class"]) == (launcher["module"], launcher["class"])
    differs = {"instance_config_map": ("dagster-instance", "ergot-instance")}
    for key in set(custom["config"]) | set(launcher["config"]):
        if key in differs:
            assert (custom["config"][key], launcher["config"][key]) == differs[key]
        else:
            assert custom["config"].get(key) == launcher["config"].get(key), key
    result = validate_config(ErgotK8sRunLauncher.config_type(), custom["config"])
    assert result.success, result.errors

    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "CustomRunCoordinator"
    assert coordinator["config"]["customRunCoordinator"] == instance["run_coordinator"]

    # The password Secret is the one the launcher hands to runs; the chart does not make one.
    assert values["global"]["postgresqlSecretName"] == custom["config"]["postgres_password_secret"]
    assert values["generatePostgresqlPasswordSecret"] is False
    # One image everywhere: the code server reports it, runs use it, the daemon and webserver
    # import the plane's classes from it.
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["name"] == "ergot"
    assert values["dagsterWebserver"]["image"] == values["dagsterDaemon"]["image"]
    assert values["dagsterDaemon"]["image"] == deployment["image"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": False}
    assert deployment["dagsterApiGrpcArgs"][1] == "ergot_dagster.definitions"
    # Nothing that looks like a credential is written in the values.
    text = (PROJECT_ROOT / "deploy" / "helm" / "values.yaml").read_text()
    assert not re.search(r"(?i)(password|secret_access_key|token)\s*:\s*\S", text)
