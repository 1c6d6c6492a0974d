"""The typed client over Dagster's GraphQL API: the consumer contract in Python.

Everything goes through the webserver's `/graphql` endpoint, so a consumer needs nothing but the
plane's URL. Submission plans the run with `requests.planning.plan_run` (the one path every entry
point takes) against a catalog read over GraphQL, so a bad request is refused before any run
exists, with the failing field named. A request id accepted before returns the existing run: the
client looks first, and the run queue makes sure of it when two submissions race.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import httpx

from ergot_dagster.artifacts.library import LibraryEntry
from ergot_dagster.artifacts.lineage import LineageNode, walk
from ergot_dagster.artifacts.manifest import ArtifactManifest
from ergot_dagster.assets.library import LIBRARY_KEY, LIBRARY_OP, LIBRARY_PARTITIONS_NAME
from ergot_dagster.client import queries as Q
from ergot_dagster.client.catalog import GraphQLCatalog, _manifest_with_ref
from ergot_dagster.client.errors import (
    ArtifactIntegrityError,
    ArtifactUnreachableError,
    ClientError,
    InvalidSettingsError,
    LaunchError,
    LibraryConflictError,
    PromotionError,
    RequestConflictError,
    RequestRejectedError,
    RetryRefusedError,
    SourceNotFoundError,
    UnknownArtifactError,
    UnknownLibraryEntryError,
    UnknownRunError,
    UnknownWorkflowError,
)
from ergot_dagster.client.graphql import GraphQLTransport
from ergot_dagster.client.models import (
    TERMINAL_STATUSES,
    EventPage,
    RunEvent,
    RunHandle,
    RunPage,
    RunStatus,
)
from ergot_dagster.client.status import needs_events, run_event, run_status
from ergot_dagster.errors import (
    ErgotError,
    SourceError,
    StoreError,
)
from ergot_dagster.errors import (
    InvalidSettingsError as PlaneSettingsError,
)
from ergot_dagster.errors import (
    UnknownWorkflowError as PlaneUnknownWorkflowError,
)
from ergot_dagster.orchestration import tags as T
from ergot_dagster.refs import (
    ARTIFACT_REF_PREFIX,
    LIBRARY_REF_PREFIX,
    InvalidRefError,
    is_library_ref,
    library_ref,
    parse_artifact_ref,
    parse_library_ref,
)
from ergot_dagster.requests.model import ProcessingRequest
from ergot_dagster.requests.planning import ASSET_JOB, RequestCatalog, RunPlan, plan_run
from ergot_dagster.sources.record import SOURCE_PARTITIONS_NAME

WILL_RETRY = "dagster/will_retry"
# How long a failed run may go without saying whether Dagster will retry it (see wait()).
RETRY_DECISION_GRACE_S = 2.0
LOCATION = "ergot"
REPOSITORY = "__repository__"
DEFAULT_URL = "http://127.0.0.1:3000"
EVENT_PAGE = 1000
CHUNK = 1 << 20


def _rejected(exc: ErgotError) -> RequestRejectedError:
    """The plane's planning error as the client exception a consumer catches."""
    if isinstance(exc, PlaneUnknownWorkflowError):
        return UnknownWorkflowError(str(exc))
    if isinstance(exc, PlaneSettingsError):
        return InvalidSettingsError(str(exc), exc.problems)
    if isinstance(exc, SourceError):
        return SourceNotFoundError(str(exc))
    return RequestRejectedError(str(exc))


def _launch_detail(result: dict[str, Any]) -> str:
    errors = result.get("errors") or []
    return "; ".join(e["message"] for e in errors) or result.get("message") or result["__typename"]


def launch_variables(
    plan: RunPlan, location: str = LOCATION, repository: str = REPOSITORY
) -> dict[str, Any]:
    """The variables of the `Launch` mutation that creates a planned run: asset selection,
    checks, run config and tags (`docs/contract/examples/launch.json` is one)."""
    return {
        "params": {
            "selector": {
                "repositoryLocationName": location,
                "repositoryName": repository,
                "jobName": plan.job_name,
                "assetSelection": [{"path": key} for key in plan.asset_keys],
                "assetCheckSelection": [
                    {"assetKey": {"path": key}, "name": name} for key, name in plan.check_keys
                ],
            },
            "runConfigData": plan.run_config,
            "executionMetadata": {
                "tags": [{"key": k, "value": v} for k, v in plan.tags.items()],
            },
        }
    }


def _verify(path: Path, sha256: str, what: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise ArtifactIntegrityError(
            f"{what}: downloaded bytes have sha256 {digest.hexdigest()}, the manifest says {sha256}"
        )


class ErgotClient:
    """A client of one plane, at `base_url` (the Dagster webserver, e.g. http://host:3000).

    `catalog` is what requests are planned against; by default the plane's own, read over GraphQL.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        catalog: RequestCatalog | None = None,
        timeout_s: float = 30.0,
        headers: dict[str, str] | None = None,
        location: str = LOCATION,
        repository: str = REPOSITORY,
    ) -> None:
        self._gql = GraphQLTransport(base_url, timeout_s=timeout_s, headers=headers)
        self._plane = GraphQLCatalog(self._gql)
        self._catalog: RequestCatalog = catalog or self._plane
        self._location = location
        self._repository = repository
        self._http = httpx.Client(timeout=timeout_s)

    @classmethod
    def from_env(cls) -> ErgotClient:
        """A client of the plane at `ERGOT_DAGSTER_URL` (default http://127.0.0.1:3000)."""
        return cls(os.environ.get("ERGOT_DAGSTER_URL", DEFAULT_URL))

    def close(self) -> None:
        self._gql.close()
        self._http.close()

    def __enter__(self) -> ErgotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ------------------------------------------------------------------------------

    def _run(self, run_id: str) -> dict[str, Any] | None:
        result = self._gql.execute(Q.RUN, {"runId": run_id})["runOrError"]
        if result["__typename"] == "Run":
            return result
        if result["__typename"] == "RunNotFoundError":
            return None
        raise ClientError(result.get("message", "unexpected answer"))

    def _status_of(self, run: dict[str, Any]) -> RunStatus:
        events = self._all_events(run["runId"]) if needs_events(run) else None
        return run_status(run, events)

    def status(self, run_id: str) -> RunStatus:
        """Where run `run_id` stands, with each artifact's outcome; `UnknownRunError` if none."""
        run = self._run(run_id)
        if run is None:
            raise UnknownRunError(f"unknown run {run_id!r}")
        return self._status_of(run)

    def _state(self, run_id: str) -> dict[str, Any]:
        result = self._gql.execute(Q.RUN_STATE, {"runId": run_id})["runOrError"]
        if result["__typename"] == "RunNotFoundError":
            raise UnknownRunError(f"unknown run {run_id!r}")
        if result["__typename"] != "Run":
            raise ClientError(result.get("message", "unexpected answer"))
        return result

    def list_runs(
        self,
        *,
        workflow: str | None = None,
        status: str | list[str] | None = None,
        source_ref: str | None = None,
        request_id: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> RunPage:
        """Runs, newest first, filtered by workflow (`name` or `name@version`), status(es),
        source ref and request id; `cursor` (from the previous page) reads on."""
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be between 1 and 1000")
        tags = []
        if workflow:
            key = T.WORKFLOW if "@" in workflow else T.WORKFLOW_NAME
            tags.append({"key": key, "value": workflow})
        if source_ref:
            tags.append({"key": T.SOURCE_REF, "value": source_ref})
        if request_id:
            tags.append({"key": T.REQUEST_ID, "value": request_id})
        run_filter: dict[str, Any] = {"tags": tags} if tags else {}
        if status:
            statuses = [status] if isinstance(status, str) else list(status)
            run_filter["statuses"] = [s.upper() for s in statuses]
        result = self._gql.execute(
            Q.RUNS, {"filter": run_filter, "cursor": cursor, "limit": limit + 1}
        )["runsOrError"]
        if result["__typename"] != "Runs":
            raise ClientError(result.get("message", "unexpected answer"))
        runs = result["results"]
        page = [self._status_of(run) for run in runs[:limit]]
        has_more = len(runs) > limit
        return RunPage(
            runs=page, cursor=page[-1].run_id if page and has_more else None, has_more=has_more
        )

    def runs_of_request(self, request_id: str) -> list[RunStatus]:
        """Every run of a request: its first run and any retries, oldest first."""
        runs: list[RunStatus] = []
        cursor = None
        while True:
            page = self.list_runs(request_id=request_id, limit=100, cursor=cursor)
            runs += page.runs
            if not page.has_more:
                break
            cursor = page.cursor
        return sorted(runs, key=lambda r: r.created_at or datetime.min.replace(tzinfo=UTC))

    def events(
        self, run_id: str, *, cursor: str | None = None, limit: int = EVENT_PAGE
    ) -> EventPage:
        """The run's events in order, from `cursor` on (the cursor of the previous page)."""
        result = self._gql.execute(
            Q.RUN_EVENTS, {"runId": run_id, "afterCursor": cursor, "limit": limit}
        )["logsForRun"]
        if result["__typename"] == "RunNotFoundError":
            raise UnknownRunError(f"unknown run {run_id!r}")
        if result["__typename"] != "EventConnection":
            raise ClientError(result.get("message", "unexpected answer"))
        return EventPage(
            events=[run_event(e) for e in result["events"] if e.get("runId")],
            cursor=result["cursor"],
            has_more=result["hasMore"],
        )

    def _all_events(self, run_id: str) -> list[RunEvent]:
        events: list[RunEvent] = []
        cursor = None
        while True:
            page = self.events(run_id, cursor=cursor)
            events += page.events
            if not page.has_more or page.cursor == cursor:
                return events
            cursor = page.cursor

    def _retry_of(self, run_id: str, request_id: str | None) -> str | None:
        """The run Dagster started to retry `run_id`, if any yet."""
        if request_id is None:
            return None
        page = self.list_runs(request_id=request_id, limit=100)
        return next((r.run_id for r in page.runs if r.parent_run_id == run_id), None)

    def wait(self, run_id: str, timeout_s: float, poll_s: float = 0.5) -> RunStatus:
        """Poll until the run is done, following automatic run retries; `TimeoutError` after
        `timeout_s`.

        A failed run that Dagster will retry (`dagster/will_retry`) is not the end: the wait moves
        on to the retry, and returns the last run of the chain.
        """
        deadline = time.monotonic() + timeout_s
        undecided_until: float | None = None
        while True:
            state = self._state(run_id)
            if state["status"] in TERMINAL_STATUSES:
                tags = {t["key"]: t["value"] for t in state["tags"]}
                if state["status"] == "FAILURE" and WILL_RETRY not in tags:
                    # Dagster marks the run FAILURE and only then writes whether it will retry
                    # it; on an instance with run retries the tag follows within moments, and on
                    # one without it never comes, so it is waited for only briefly.
                    now = time.monotonic()
                    undecided_until = undecided_until or now + RETRY_DECISION_GRACE_S
                    if now < undecided_until:
                        time.sleep(min(poll_s, 0.1))
                        continue
                if state["status"] != "FAILURE" or tags.get(WILL_RETRY) != "true":
                    return self.status(run_id)
                retry = self._retry_of(run_id, tags.get(T.REQUEST_ID))
                if retry is not None:
                    run_id, undecided_until = retry, None
                    continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {state['status']} after {timeout_s:g} s")
            time.sleep(poll_s)

    def cancel(self, run_id: str, timeout_s: float = 30.0) -> RunStatus:
        """Cancel a queued run (it never starts) or a running one (it ends CANCELED).

        Dagster cannot terminate a run in the moment it is STARTING (its worker has no address
        yet); the cancel is tried again until the run has started, within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            result = self._gql.execute(Q.TERMINATE, {"runId": run_id})["terminateRun"]
            kind = result["__typename"]
            if kind == "RunNotFoundError":
                raise UnknownRunError(f"unknown run {run_id!r}")
            if kind == "TerminateRunSuccess":
                return self.status(run_id)
            state = self._state(run_id)
            if state["status"] in TERMINAL_STATUSES:
                return self.status(run_id)
            if state["status"] != "STARTING" or time.monotonic() >= deadline:
                raise LaunchError(f"could not cancel run {run_id}: {result.get('message', kind)}")
            time.sleep(0.5)

    def retry(self, run_id: str) -> RunHandle:
        """A new run of a failed or canceled run's request, linked to it as its retry.

        The new run carries the same request (tags, settings, partition) and Dagster's
        `dagster/parent_run_id`; artifacts the old run already stored are reused, not remade.
        """
        state = self._state(run_id)
        if state["status"] not in ("FAILURE", "CANCELED"):
            raise RetryRefusedError(
                f"run {run_id} is {state['status']}; only a FAILURE or CANCELED run can be retried"
                + (
                    " (submit a new request to redo a successful one)"
                    if state["status"] == "SUCCESS"
                    else ""
                )
            )
        params = {"parentRunId": run_id, "strategy": "ALL_STEPS"}
        result = self._gql.execute(Q.REEXECUTE, {"params": params})["launchRunReexecution"]
        if result["__typename"] != "LaunchRunSuccess":
            raise LaunchError(f"Dagster did not start the retry: {_launch_detail(result)}")
        new = self._state(result["run"]["runId"])
        tags = {t["key"]: t["value"] for t in new["tags"]}
        return RunHandle(
            run_id=new["runId"], request_id=tags.get(T.REQUEST_ID, ""), status=new["status"]
        )

    # -- submission ------------------------------------------------------------------------

    def plan(self, request: ProcessingRequest) -> RunPlan:
        """Check `request` and plan its run, without launching anything."""
        try:
            return plan_run(request, self._catalog)
        except ErgotError as exc:
            raise _rejected(exc) from exc
        except InvalidRefError as exc:
            raise RequestRejectedError(str(exc)) from exc

    def _first_run(self, request_id: str) -> RunStatus | None:
        originals = [r for r in self.runs_of_request(request_id) if not r.parent_run_id]
        return originals[0] if originals else None

    def _accepted(self, request: ProcessingRequest, run: RunStatus, existing: bool) -> RunHandle:
        if run.tags.get(T.REQUEST_SHA256) != request.sha256:
            raise RequestConflictError(
                f"request id {request.request_id!r} was already used for a different request "
                f"(run {run.run_id}); use a new request id"
            )
        return RunHandle(
            run_id=run.run_id, request_id=request.request_id, status=run.status, existing=existing
        )

    def submit(self, request: ProcessingRequest | dict[str, Any]) -> RunHandle:
        """Queue `request` as one run, or return the run it already has (same request id)."""
        if isinstance(request, dict):
            request = ProcessingRequest.model_validate(request)
        plan = self.plan(request)
        first = self._first_run(request.request_id)
        if first is not None:
            return self._accepted(request, first, existing=True)
        # The queue answers with the request's first run when another submission of the same
        # request id got there first; that run is this request's run.
        return self._accepted(request, self.launch(plan), existing=False)

    def _add_partition(self, partitions_def: str, key: str) -> None:
        """Make sure `key` is in the dynamic partition set `partitions_def` (idempotent)."""
        result = self._gql.execute(
            Q.ADD_PARTITION,
            {
                "selector": {
                    "repositoryLocationName": self._location,
                    "repositoryName": self._repository,
                },
                "partitionsDefName": partitions_def,
                "partitionKey": key,
            },
        )["addDynamicPartition"]
        if result["__typename"] not in (
            "AddDynamicPartitionSuccess",
            "DuplicateDynamicPartitionError",
        ):
            raise LaunchError(
                f"Dagster did not add partition {key!r} to {partitions_def}: "
                f"{result.get('message') or result['__typename']}"
            )

    def launch(self, plan: RunPlan) -> RunStatus:
        """Launch a planned run through the queue, without looking for an earlier one first."""
        if plan.new_partition:
            # A workflow applied to a stored artifact or library entry: its ref is a partition
            # of its own, which must exist before the run does.
            self._add_partition(SOURCE_PARTITIONS_NAME, plan.partition_key)
        variables = launch_variables(plan, self._location, self._repository)
        result = self._gql.execute(Q.LAUNCH, variables)["launchRun"]
        if result["__typename"] == "LaunchRunSuccess":
            return self.status(result["run"]["runId"])
        raise LaunchError(f"Dagster did not launch the run: {_launch_detail(result)}")

    # -- artifacts -------------------------------------------------------------------------

    def manifest(self, ref: str) -> ArtifactManifest:
        """The manifest of artifact `ref`; `UnknownArtifactError` if there is none."""
        try:
            parse_artifact_ref(ref)
        except InvalidRefError as exc:
            raise UnknownArtifactError(str(exc)) from None
        manifest = self._catalog.artifact(ref)
        if manifest is None:
            raise UnknownArtifactError(f"no artifact {ref}")
        return manifest

    def artifacts(self, run_id: str) -> list[ArtifactManifest]:
        """The manifests of every artifact the run stored or reused, in the run's order."""
        run = self._run(run_id)
        if run is None:
            raise UnknownRunError(f"unknown run {run_id!r}")
        status = self._status_of(run)
        manifests = []
        for outcome in status.artifacts:
            if not outcome.ref or outcome.status not in ("materialized", "reused"):
                continue
            # The run just read carries the manifests of the artifacts it stored: the plane's
            # catalog would read the same run again for each one. An artifact of another run
            # (reused), one recorded by the run that retried this one, or a catalog of the
            # consumer's own goes the usual way.
            found = None
            own = outcome.ref.startswith(f"{ARTIFACT_REF_PREFIX}{run_id}/")
            if self._catalog is self._plane and own:
                found = _manifest_with_ref(run.get("assetMaterializations") or [], outcome.ref)
            manifests.append(found or self.manifest(outcome.ref))
        return manifests

    @contextmanager
    def open_artifact(self, ref: str, member: str | None = None) -> Iterator[IO[bytes]]:
        """The bytes of artifact `ref` (or of one `member` of an image set), as a binary stream.

        A `file://` artifact is read where it lies (a consumer on a machine of the plane, or with
        the store mounted); an `http(s)://` one (a presigned object-storage URL) is streamed.
        `download` also checks the bytes against the manifest's sha256.
        """
        uri, _ = self._locate(self.manifest(ref), member)
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            try:
                handle = path.open("rb")
            except OSError as exc:
                raise ArtifactUnreachableError(
                    f"{ref}: {uri} is not readable from this machine ({exc.strerror}); mount the "
                    "artifact store here or use object storage"
                ) from None
            with handle:
                yield handle
            return
        if parsed.scheme in ("http", "https"):
            with tempfile.TemporaryFile() as spool:
                self._fetch(uri, spool, ref)
                spool.seek(0)
                yield spool
            return
        if parsed.scheme == "s3":
            with tempfile.TemporaryFile() as spool:
                self._fetch_s3(parsed.netloc, parsed.path.lstrip("/"), spool, ref)
                spool.seek(0)
                yield spool
            return
        raise ArtifactUnreachableError(f"{ref}: cannot read {parsed.scheme}:// artifacts from here")

    @staticmethod
    def _fetch_s3(bucket: str, key: str, out: IO[bytes], ref: str) -> None:
        """Read an object with this process's own AWS credentials (env vars or config)."""
        from ergot_dagster.artifacts.s3_store import s3_client, stream_object

        try:
            stream_object(s3_client(), bucket, unquote(key), out)
        except Exception as exc:
            # The type only: botocore messages can quote signed URLs.
            raise ArtifactUnreachableError(
                f"{ref} is in object storage and this process cannot read it "
                f"({type(exc).__name__}); give it AWS credentials for the bucket, or have a "
                "machine of the plane presign it (`ergot artifacts RUN_ID --presign`)"
            ) from None

    def _locate(self, manifest: ArtifactManifest, member: str | None) -> tuple[str, str]:
        if member is None:
            return manifest.uri, manifest.sha256
        for item in manifest.members:
            if item.name == member:
                return item.uri, item.sha256
        raise UnknownArtifactError(f"{manifest.ref} has no member {member!r}")

    def _fetch(self, uri: str, out: IO[bytes], ref: str) -> None:
        try:
            with self._http.stream("GET", uri) as response:
                if response.status_code != 200:
                    raise ArtifactUnreachableError(f"{ref}: HTTP {response.status_code}")
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
        except httpx.TransportError as exc:
            raise ArtifactUnreachableError(f"{ref}: {exc}") from None

    def download(self, ref: str, dest: str | Path) -> Path:
        """Copy artifact `ref` to `dest` (a file; for an image set, a directory of its members),
        checking every file against its sha256. Nothing partial is left behind on failure."""
        manifest = self.manifest(ref)
        dest = Path(dest)
        if manifest.kind == "set":
            dest.mkdir(parents=True, exist_ok=True)
            for item in manifest.members:
                self._download_one(ref, item.name, item.sha256, dest / Path(item.name).name)
            return dest
        self._download_one(ref, None, manifest.sha256, dest)
        return dest

    def _download_one(self, ref: str, member: str | None, sha256: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, self.open_artifact(ref, member) as source:
                shutil.copyfileobj(source, out, CHUNK)
            _verify(tmp, sha256, f"{ref}{'/' + member if member else ''}")
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)

    # -- libraries -------------------------------------------------------------------------

    def library_entry(self, ref: str) -> LibraryEntry:
        """The entry `ref` names (`library:voices/narrator-01` or `voices/narrator-01`)."""
        full = ref if is_library_ref(ref) else f"{LIBRARY_REF_PREFIX}{ref}"
        try:
            parse_library_ref(full)
        except InvalidRefError as exc:
            raise UnknownLibraryEntryError(str(exc)) from None
        entry = self._plane.library_entry(full)
        if entry is None:
            raise UnknownLibraryEntryError(f"nothing is promoted as {full}")
        return entry

    def libraries(self, library: str | None = None) -> list[LibraryEntry]:
        """Every promoted entry, or those of `library`, by ref."""
        return self._plane.library_entries(library)

    def promote(
        self,
        artifact_ref: str,
        *,
        library: str,
        name: str,
        note: str = "",
        timeout_s: float = 120.0,
    ) -> LibraryEntry:
        """Promote a stored artifact to `library:<library>/<name>`, for later requests to name.

        The entry is immutable: promoting the same artifact under the same name again returns the
        entry; another artifact under a taken name raises `LibraryConflictError`. The promotion
        is a run of `ergot/library` on the plane, so its event log records it.
        """
        try:
            ref = library_ref(library, name)
        except InvalidRefError as exc:
            raise PromotionError(str(exc)) from None
        manifest = self.manifest(artifact_ref)
        existing = self._plane.library_entry(ref)
        if existing is not None:
            if existing.artifact == manifest.ref and existing.sha256 == manifest.sha256:
                return existing
            raise LibraryConflictError(
                f"{ref} already names {existing.artifact}; library entries are immutable"
            )
        key = f"{library}/{name}"
        self._add_partition(LIBRARY_PARTITIONS_NAME, key)
        variables = {
            "params": {
                "selector": {
                    "repositoryLocationName": self._location,
                    "repositoryName": self._repository,
                    "jobName": ASSET_JOB,
                    "assetSelection": [{"path": LIBRARY_KEY.path}],
                },
                "runConfigData": {
                    "ops": {LIBRARY_OP: {"config": {"artifact": manifest.ref, "note": note}}}
                },
                "executionMetadata": {
                    "tags": [
                        {"key": T.PARTITION, "value": key},
                        {"key": T.PROMOTION, "value": ref},
                    ]
                },
            }
        }
        result = self._gql.execute(Q.LAUNCH, variables)["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise PromotionError(f"Dagster did not launch the promotion: {_launch_detail(result)}")
        status = self.wait(result["run"]["runId"], timeout_s)
        entry = self._plane.library_entry(ref)
        if status.status == "SUCCESS" and entry is not None:
            return entry
        reason = status.error.message if status.error else status.status
        if entry is not None and entry.artifact != manifest.ref:
            # Another promotion of the same name got there first.
            raise LibraryConflictError(f"{ref} already names {entry.artifact}: {reason}")
        raise PromotionError(f"promoting {manifest.ref} as {ref} failed: {reason}")

    def lineage(self, ref: str) -> LineageNode:
        """Artifact `ref`'s parents, walked down to the ingested sources with their sha256.

        A library entry on the way is a node of its own, whose parent is the promoted artifact.
        """
        try:
            return walk(
                ref, self._catalog.artifact, self._catalog.source, self._catalog.library_entry
            )
        except StoreError as exc:
            raise UnknownArtifactError(str(exc)) from None
        except InvalidRefError as exc:
            raise UnknownArtifactError(str(exc)) from None
