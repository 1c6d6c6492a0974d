"""Off-node runs: the remote code server a `remote` run executes on, and what such a run needs.

A request with `execution_target: remote` runs on another host: `ErgotRunLauncher` starts it on a
Dagster code server there (the same code location, `dagster api grpc`), through Dagster's own gRPC
client, as Dagster's default launcher does for a local code server. The remote host shares the
instance (PostgreSQL) and object storage with this node and nothing else, so a remote run must
read every input from object storage and write its artifacts there. This module holds the remote
server's settings, the checks that a run can execute off-node (at planning and again at launch),
and the question run monitoring asks the remote server about a run's worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRun
from dagster._grpc.client import DagsterGrpcClient
from dagster._grpc.types import CanCancelExecutionRequest, CanCancelExecutionResult
from dagster._serdes import deserialize_value
from pydantic import BaseModel, ConfigDict, Field

from ergot_dagster.errors import RequestError
from ergot_dagster.orchestration import tags as T
from ergot_dagster.refs import InvalidRefError, partition_key_to_ref, ref_kind, ref_to_partition_key
from ergot_dagster.sources.record import latest_source_record

if TYPE_CHECKING:
    from ergot_dagster.requests.planning import RequestCatalog
    from ergot_dagster.workflows.model import WorkflowDefinition

REMOTE = "remote"
# A health question must not hold up run monitoring's loop for long.
HEALTH_TIMEOUT_S = 10
HELP = "see docs/offnode.md"


class RemoteCodeServer(BaseModel):
    """Where remote runs execute: a Dagster code server of this code location on another host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    use_ssl: bool = False
    unreachable_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="a running remote run whose server has not answered for this long is failed",
    )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self) -> DagsterGrpcClient:
        return DagsterGrpcClient(host=self.host, port=self.port, use_ssl=self.use_ssl)

    def runs_execution(self, run_id: str) -> bool:
        """Whether the server still runs `run_id`'s execution; raises when it cannot be asked."""
        answer = self.client().can_cancel_execution(
            CanCancelExecutionRequest(run_id=run_id), timeout=HEALTH_TIMEOUT_S
        )
        return deserialize_value(answer, CanCancelExecutionResult).can_cancel


def is_remote(run: DagsterRun) -> bool:
    return run.tags.get(T.EXECUTION_TARGET) == REMOTE


def _off_node(uri: str) -> bool:
    return uri.startswith("s3://")


def store_problem(storage: str) -> str | None:
    """Why the artifact store at `storage` cannot serve a remote run, if it cannot."""
    if _off_node(storage):
        return None
    return f"the artifact store {storage} is on this node's disk (set ERGOT_STORAGE to s3://...)"


def check_remote_inputs(
    definition: WorkflowDefinition,
    primary_ref: str,
    inputs: dict[str, str | list[str]],
    catalog: RequestCatalog,
) -> None:
    """Refuse a remote request any of whose inputs is on this node's disk, naming them."""
    named: list[tuple[str, str]] = [(definition.primary_input, primary_ref)]
    for name, value in inputs.items():
        named += [(name, ref) for ref in (value if isinstance(value, list) else [value])]
    local = []
    for name, ref in named:
        uri = _catalog_uri(ref, catalog)
        if uri is not None and not _off_node(uri):
            local.append(f"input {name!r} ({ref}) is {uri}")
    if local:
        raise RequestError(
            f"{definition.spec} cannot run remote: a remote run reads its inputs from object "
            f"storage only, and {'; '.join(local)} on this node's disk (ingest sources under an "
            f"s3:// ERGOT_INGEST_ROOT; {HELP})"
        )


def _catalog_uri(ref: str, catalog: RequestCatalog) -> str | None:
    kind = ref_kind(ref)
    if kind == "source":
        record = catalog.source(ref)
        return record.uri if record else None
    if kind == "library":
        entry = catalog.library_entry(ref)
        if entry is None:
            return None
        ref = entry.artifact
    manifest = catalog.artifact(ref)
    return manifest.uri if manifest else None


def _run_source_refs(run: DagsterRun) -> Iterable[str]:
    """The source refs a run reads: its primary source and the request's other inputs."""
    primary = run.tags.get(T.SOURCE_REF)
    if primary is None and run.tags.get(T.PARTITION):
        try:
            primary = partition_key_to_ref(run.tags[T.PARTITION])
        except InvalidRefError:
            primary = None  # the step refuses a malformed partition itself, clearly
    refs = [primary] if primary else []
    try:
        given = json.loads(run.tags.get(T.REQUEST, "{}")).get("sources", {}).get("inputs", {})
    except (ValueError, AttributeError):
        given = {}
    for value in given.values() if isinstance(given, dict) else []:
        refs += [r for r in (value if isinstance(value, list) else [value]) if isinstance(r, str)]
    return [r for r in refs if ref_kind(r) == "source"]


def launch_problems(instance: DagsterInstance, run: DagsterRun, storage: str) -> list[str]:
    """Why `run` cannot execute off-node, checked on this node just before it is launched.

    Artifact and library inputs live in the artifact store, so the store's location covers them;
    each source's latest record says where it was ingested from.
    """
    problems = [p for p in [store_problem(storage)] if p]
    for ref in _run_source_refs(run):
        try:
            record = latest_source_record(instance, ref_to_partition_key(ref))
        except InvalidRefError:
            continue  # a malformed ref is planning's business, and fails the step clearly
        if record is not None and not _off_node(record.uri):
            problems.append(f"source {ref!r} was ingested from {record.uri}, on this node's disk")
    return problems
