"""A loopback Kubernetes API server: the few REST paths a run launcher uses, on 127.0.0.1.

No cluster can run here, so the K8s run launcher talks to this one through an ordinary
kubeconfig file (`kubeconfig()` writes it), with the official kubernetes client. It answers as
the API server does (API group batch/v1 and core v1, JSON, `Status` objects for errors):

- `POST /apis/batch/v1/namespaces/{ns}/jobs` creates a Job: 201 with the Job as stored (uid,
  resourceVersion, creationTimestamp, namespace, an empty status); 409 `AlreadyExists` for a
  name already used in the namespace; 400 `BadRequest` when the body's namespace differs from
  the path's; 422 `Invalid` for what the API server's validation refuses and a launcher could
  get wrong (names, labels, containers, restartPolicy, extended resources only in requests).
- `GET .../jobs/{name}` and `GET .../jobs/{name}/status` read it back (404 `NotFound`).
- `DELETE .../jobs/{name}` deletes it (200 with a `Success` status).
- `GET /api/v1/namespaces/{ns}/pods` lists pods: none, since nothing schedules them.

Every request must carry `Authorization: Bearer <token>` (401 `Unauthorized` otherwise), as a
service account or user token would. What was asked is kept for the test: `created` (the Job
bodies as posted, in order), `requests` (method and path), `jobs` (what is stored).

    with KubernetesApiLoopback(token="t0ken") as api:
        path = api.kubeconfig(tmp_path / "kubeconfig", namespace="ergot")
        ...
        api.created[0]["spec"]["template"]["spec"]["containers"][0]["image"]
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
JOBS = re.compile(
    r"^/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs(/(?P<name>[^/]+)(?P<status>/status)?)?$"
)
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def _invalid_job(job: dict[str, Any]) -> list[str]:
    """What the API server's Job validation would refuse, among what a launcher controls."""
    problems: list[str] = []
    name = (job.get("metadata") or {}).get("name") or ""
    if len(name) > 63 or not DNS_1123_LABEL.match(name):
        problems.append(f"metadata.name: Invalid value: {name!r}")
    spec = job.get("spec") or {}
    template = spec.get("template") or {}
    for where, meta in (
        ("metadata", job.get("metadata")),
        ("spec.template.metadata", template.get("metadata")),
    ):
        for key, value in ((meta or {}).get("labels") or {}).items():
            if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
                problems.append(f"{where}.labels: Invalid value: {value!r} for {key}")
    pod = template.get("spec") or {}
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(
            f"spec.template.spec.restartPolicy: Unsupported value: {pod.get('restartPolicy')!r}"
        )
    containers = pod.get("containers") or []
    if not containers:
        problems.append("spec.template.spec.containers: Required value")
    for i, container in enumerate(containers):
        if not container.get("name") or not container.get("image"):
            problems.append(f"spec.template.spec.containers[{i}]: name and image are required")
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        for resource, quantity in (resources.get("requests") or {}).items():
            extended = "/" in resource and not resource.split("/")[0].endswith("kubernetes.io")
            if extended and limits.get(resource) != quantity:
                problems.append(
                    f"spec.template.spec.containers[{i}].resources.requests[{resource}]: "
                    "Invalid value: must be equal to the limit"
                )
    return problems


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        api = self.server.api
        api.requests.append((self.command, self.path.split("?", 1)[0]))
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            self._answer(401, _status(401, "Unauthorized", "Unauthorized"))
            return False
        return True

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_POST(self) -> None:
        if not self._authorized():
            return
        match = JOBS.match(self.path.split("?", 1)[0])
        if not match or match["name"]:
            self._answer(
                404, _status(404, "NotFound", "the server could not find the requested resource")
            )
            return
        namespace = match["ns"]
        job = self._body()
        api = self.server.api
        metadata = job.setdefault("metadata", {})
        if metadata.get("namespace") not in (None, namespace):
            self._answer(
                400,
                _status(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request",
                ),
            )
            return
        api.created.append(json.loads(json.dumps(job)))
        problems = _invalid_job(job)
        name = metadata.get("name", "")
        details = {"name": name, "group": "batch", "kind": "jobs"}
        if problems:
            message = f'Job.batch "{name}" is invalid: ' + "; ".join(problems)
            self._answer(422, _status(422, "Invalid", message, details))
            return
        with api.lock:
            if (namespace, name) in api.jobs:
                self._answer(
                    409,
                    _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists', details),
                )
                return
            metadata.update(
                {
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": str(len(api.created)),
                    "creationTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            )
            job.setdefault("status", {})
            api.jobs[(namespace, name)] = job
        self._answer(201, job)

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0]
        pods = PODS.match(path)
        if pods:
            self._answer(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []})
            return
        match = JOBS.match(path)
        job = (
            self.server.api.jobs.get((match["ns"], match["name"]))
            if match and match["name"]
            else None
        )
        if job is None:
            name = match["name"] if match else ""
            self._answer(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
            return
        self._answer(200, job)

    def do_DELETE(self) -> None:
        if not self._authorized():
            return
        match = JOBS.match(self.path.split("?", 1)[0])
        api = self.server.api
        with api.lock:
            job = (
                api.jobs.pop((match["ns"], match["name"]), None)
                if match and match["name"]
                else None
            )
        name = match["name"] if match else ""
        if job is None:
            self._answer(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
            return
        api.deleted.append(name)
        self._answer(200, _status(200, "", "", {"name": name, "group": "batch", "kind": "jobs"}))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: KubernetesApiLoopback) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.api = api


class KubernetesApiLoopback:
    """The loopback API server, started on a free port for the `with` block."""

    def __init__(self, token: str = "loopback-token") -> None:
        self.token = token
        self.lock = threading.Lock()
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig whose current context is this server, with its bearer token."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "loopback", "cluster": {"server": self.url}}],
            "users": [{"name": "launcher", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "loopback",
                    "context": {"cluster": "loopback", "user": "launcher", "namespace": namespace},
                }
            ],
            "current-context": "loopback",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self) -> KubernetesApiLoopback:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
