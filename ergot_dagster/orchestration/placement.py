"""Where a run executed: the host, process and launcher of the step, for its events and manifests.

The launcher says how it started the run in the run's tags (`ergot/launcher`, and
`ergot/code_server` for a run started on a remote code server); the step adds what only it can
know, its own host name and pid. Under Kubernetes the host is the pod, named by `HOSTNAME`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from dagster._core.storage.tags import GRPC_INFO_TAG

from ergot_dagster.artifacts.manifest import ExecutedBy

LAUNCHER_TAG = "ergot/launcher"  # local | remote: how ErgotRunLauncher started the run
CODE_SERVER_TAG = "ergot/code_server"  # host:port of the remote code server, for remote runs


def _launcher(tags: Mapping[str, str], pod: str | None) -> str:
    if pod:
        return "kubernetes"
    launcher = tags.get(LAUNCHER_TAG)
    if launcher in ("local", "remote"):
        return launcher
    # Started over gRPC by a launcher that does not tag (Dagster's own): a worker of this node.
    return "local" if GRPC_INFO_TAG in tags else "in_process"


def executed_by(tags: Mapping[str, str]) -> ExecutedBy:
    """This process as the executor of the run carrying `tags`."""
    pod = os.environ.get("HOSTNAME") if os.environ.get("KUBERNETES_SERVICE_HOST") else None
    launcher = _launcher(tags, pod)
    return ExecutedBy(
        host=pod or socket.gethostname(),
        pid=os.getpid(),
        launcher=launcher,  # type: ignore[arg-type]
        code_server=tags.get(CODE_SERVER_TAG) if launcher == "remote" else None,
        pod=pod,
    )


def describe(placement: ExecutedBy) -> str:
    """One line for the run's log: `run placed on remote-1 (pid 412), by remote code server ...`."""
    how = {
        "local": "by this node's run launcher",
        "remote": f"by remote code server {placement.code_server}",
        "kubernetes": f"in Kubernetes pod {placement.pod}",
        "in_process": "in process, without a launcher",
    }[placement.launcher]
    return f"run placed on {placement.host} (pid {placement.pid}), {how}"
