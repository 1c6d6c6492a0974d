"""The request inbox: processing requests dropped as JSON files, each one decided once.

A consumer that cannot (or would rather not) talk to the GraphQL API writes a `ProcessingRequest`
as `<name>.json` into the inbox directory (`ERGOT_REQUEST_INBOX`). Each tick this sensor:

1. lists the inbox (not recursively) for `*.json` files that have no `<name>.outcome.json` yet,
   skipping hidden files, outcome files and files modified within the settle time (they may still
   be being written), at most `MAX_FILES_PER_TICK` of them, oldest first;
2. reads and checks each one: size, UTF-8, JSON object, the `ProcessingRequest` model, then
   `plan_run`, the same planning every other entry point uses;
3. looks up the run its request id was first accepted as. The same request again is accepted with
   that run (`existing`); a different request under a used id is rejected, naming the run. A new
   request becomes a `RunRequest` with `run_key` = request id.

Why the accepted outcome comes one tick later: a sensor only asks for runs; the daemon creates them
after the tick, so the run id is not known yet. The file is remembered in the cursor as pending,
and the next tick finds its run by request id and writes the outcome with the run id.

Why a request dropped twice still starts one run: `run_key` makes the daemon create at most one
run per key for this sensor, two files with the same request id in one tick give one `RunRequest`
(the second is decided on the next tick, against the run the first one got), and the run
coordinator keeps one run per request id whoever else submits it (`orchestration.idempotency`).

Every file is decided on its own: one that cannot be read, parsed, validated or planned gets a
rejected outcome with the reason, and the others are handled in the same tick. Outcome files are
written atomically inside the inbox and never rewritten. Problems of the plane itself (an
unreadable targets file, broken workflow definitions) fail the tick instead, so that no consumer's
request is rejected for them; the files wait for a tick that can decide them.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from pydantic import BaseModel, Field, ValidationError

from ergot_dagster.client.models import InboxOutcome
from ergot_dagster.errors import ErgotError
from ergot_dagster.orchestration import tags as T
from ergot_dagster.orchestration.idempotency import first_run_of_request
from ergot_dagster.requests.catalog import LocalCatalog
from ergot_dagster.requests.model import REQUEST_ID, ProcessingRequest, validation_summary
from ergot_dagster.requests.planning import RunPlan, plan_run
from ergot_dagster.resources.artifact_store import ArtifactStoreResource
from ergot_dagster.resources.targets import RuntimeTargetsResource
from ergot_dagster.settings import ErgotSettings
from ergot_dagster.sources.record import source_partitions
from ergot_dagster.workflows.loader import cached_registry
from ergot_dagster.workflows.settings_schema import SettingsError

SENSOR_NAME = "request_inbox"
INTERVAL_S = int(os.environ.get("ERGOT_INBOX_INTERVAL_S", "5"))
REQUEST_SUFFIX = ".json"
OUTCOME_SUFFIX = ".outcome.json"
MAX_FILE_BYTES = 1024 * 1024
MAX_FILES_PER_TICK = 200
MAX_REASON_CHARS = 2000
MAX_PENDING = 10_000


def _settle_s() -> float:
    """Seconds a request file must be unmodified before it is read (it may still be written)."""
    return float(os.environ.get("ERGOT_INBOX_SETTLE_S", "1"))


def outcome_name(request_name: str) -> str:
    """The outcome file's name for request file `request_name` (`x.json` -> `x.outcome.json`)."""
    return request_name.removesuffix(REQUEST_SUFFIX) + OUTCOME_SUFFIX


def is_request_name(name: str) -> bool:
    """Whether a file name in the inbox is one the sensor reads as a request."""
    return (
        name.endswith(REQUEST_SUFFIX)
        and not name.endswith(OUTCOME_SUFFIX)
        and not name.startswith(".")
    )


class PendingFile(BaseModel):
    """A request file whose RunRequest was emitted; its outcome waits for the run to exist."""

    request_id: str
    sha256: str
    signature: list[int] = Field(description="[size, mtime_ns] when it was read")


class InboxCursor(BaseModel):
    """The sensor's memory between ticks: request files waiting for their run (by file name)."""

    pending: dict[str, PendingFile] = Field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str | None) -> InboxCursor:
        if not raw:
            return cls()
        try:
            return cls.model_validate_json(raw)
        except ValueError:
            # Losing the cursor costs little: a pending file is then decided as `existing`.
            return cls()

    def dump(self) -> str:
        while len(self.pending) > MAX_PENDING:
            self.pending.pop(next(iter(self.pending)))
        return json.dumps(self.model_dump(), separators=(",", ":"), ensure_ascii=False)


class Rejected(Exception):
    """A request file that cannot be accepted; `reason` goes into its outcome."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


@dataclass(frozen=True)
class RequestFile:
    """One waiting request file: its name in the inbox and what `lstat` said when listed."""

    name: str
    size: int
    mtime_ns: int

    @property
    def signature(self) -> list[int]:
        return [self.size, self.mtime_ns]


def waiting_files(inbox: Path, settle_s: float, now: float) -> list[RequestFile]:
    """Request files in `inbox` that are settled and have no outcome yet, oldest first."""
    found: list[RequestFile] = []
    with os.scandir(inbox) as entries:
        for entry in entries:
            if not is_request_name(entry.name):
                continue
            if os.path.lexists(inbox / outcome_name(entry.name)):
                continue
            try:
                # The entry itself, not what a symlink points at: a link is judged when read.
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed while listing
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                continue
            if now - info.st_mtime < settle_s:
                continue
            found.append(RequestFile(entry.name, info.st_size, info.st_mtime_ns))
    found.sort(key=lambda f: (f.mtime_ns, f.name))
    return found


def _raw_request_id(data: dict[str, Any]) -> str | None:
    """The request id of a request that failed validation, if that field itself was valid."""
    value = data.get("request_id")
    return value if isinstance(value, str) and re.fullmatch(REQUEST_ID, value) else None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in a request")


def read_request(inbox: Path, name: str) -> ProcessingRequest:
    """Read and validate request file `name` of `inbox`; `Rejected` says what is wrong with it."""
    try:
        resolved = (inbox / name).resolve()
    except (OSError, RuntimeError):  # Python 3.11 reports a symlink loop as RuntimeError
        raise Rejected("the request file is a symlink that cannot be resolved (a loop?)") from None
    if not resolved.is_relative_to(inbox):
        raise Rejected("the request file is a symlink to a file outside the inbox")
    try:
        # O_NONBLOCK: a FIFO named like a request must not hang the tick.
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise Rejected(f"the request file cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Rejected("the request file is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise Rejected(f"the file is {info.st_size} bytes; the limit is {MAX_FILE_BYTES}")
        raw = handle.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise Rejected(f"the file is over {MAX_FILE_BYTES} bytes, the limit")
    try:
        # utf-8-sig: editors on some systems start the file with a byte order mark.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Rejected(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise Rejected(
            f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError as exc:
        raise Rejected(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(data), "a number"
        )
        raise Rejected(f"expected a JSON object (a processing request), got {kind}")
    try:
        return ProcessingRequest.model_validate(data)
    except ValidationError as exc:
        raise Rejected(
            f"invalid request: {validation_summary(exc)}", _raw_request_id(data)
        ) from None


def write_outcome(inbox: Path, outcome: InboxOutcome) -> bool:
    """Write `outcome` beside its request file, atomically; never over an existing outcome.

    Returns False when an outcome was already there (it is kept as it was).
    """
    final = inbox / outcome_name(outcome.file)
    data = outcome.model_dump_json(indent=2).encode() + b"\n"
    # In the inbox itself, so the final link or rename stays on one filesystem and is atomic;
    # hidden, so the sensor and consumers never take it for a request or an outcome.
    fd, tmp_name = tempfile.mkstemp(dir=inbox, prefix=".outcome-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; consumers must be able to read it
        try:
            # A hard link fails if the outcome exists, so a decision is never rewritten.
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: fall back to a rename after a check.
            if os.path.lexists(final):
                return False
            os.replace(tmp, final)
        _fsync_dir(inbox)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the file itself is synced
    finally:
        os.close(fd)


def _bounded(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def run_request_for(plan: RunPlan) -> RunRequest:
    """The RunRequest that creates the run `plan` describes; its run key is the request id."""
    return RunRequest(
        run_key=plan.request_id,
        run_config=plan.run_config,
        tags=plan.tags,
        asset_selection=[AssetKey(key) for key in plan.asset_keys],
        asset_check_keys=[AssetCheckKey(AssetKey(key), name) for key, name in plan.check_keys],
        partition_key=plan.partition_key,
    )


Decision = Literal["accepted", "rejected", "requested", "deferred"]


@dataclass
class _Tick:
    """One evaluation of the sensor: the files it decided and the runs it asks for."""

    context: SensorEvaluationContext
    inbox: Path
    catalog: LocalCatalog
    cursor: InboxCursor
    run_requests: list[RunRequest] = field(default_factory=list)
    new_partitions: list[str] = field(default_factory=list)
    requested_ids: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)

    def handle(self, item: RequestFile) -> None:
        try:
            decision = self._decide(item)
        except Rejected as exc:
            decision = self._reject(item, exc.reason, exc.request_id)
        except Exception as exc:  # one bad file must not stop the others
            # The exception's text stays in the operator's log; the consumer gets its type only,
            # since an unexpected message may carry details that are not theirs to see.
            self.context.log.error(
                f"{item.name}: unexpected {type(exc).__name__} while deciding it: {exc}"
            )
            decision = self._reject(
                item,
                f"internal error ({type(exc).__name__}) while checking the request; the plane's "
                "operators can see the details in the request_inbox sensor log",
                None,
            )
        self.counts[decision] = self.counts.get(decision, 0) + 1

    def _decide(self, item: RequestFile) -> Decision:
        pending = self.cursor.pending.get(item.name)
        if pending is not None and pending.signature != item.signature:
            # Rewritten since its RunRequest: decide the new content from scratch.
            self.cursor.pending.pop(item.name)
            pending = None
        if pending is not None:
            run = first_run_of_request(self.context.instance, pending.request_id)
            if run is not None:
                return self._decide_against(item, pending.request_id, pending.sha256, run, True)
            # No run yet (the tick that asked for it failed, say): ask again below. The run key
            # is the same, so the daemon still creates at most one run.
        request = read_request(self.inbox, item.name)
        try:
            plan = plan_run(request, self.catalog)
        except (ErgotError, SettingsError) as exc:
            raise Rejected(str(exc), request.request_id) from None
        if request.request_id in self.requested_ids:
            # Another file asked for this request id in this tick, and its run does not exist
            # yet; this file is decided next tick against that run.
            return "deferred"
        run = first_run_of_request(self.context.instance, request.request_id)
        if run is not None:
            return self._decide_against(item, request.request_id, request.sha256, run, False)
        self.run_requests.append(run_request_for(plan))
        if plan.new_partition and plan.partition_key not in self.new_partitions:
            self.new_partitions.append(plan.partition_key)
        self.requested_ids.add(request.request_id)
        self.cursor.pending[item.name] = PendingFile(
            request_id=request.request_id, sha256=request.sha256, signature=item.signature
        )
        self.context.log.info(
            f"{item.name}: request {request.request_id} ({plan.workflow} on "
            f"{request.sources.primary!r}) asked for a run; its outcome follows once it exists"
        )
        return "requested"

    def _decide_against(
        self, item: RequestFile, request_id: str, sha256: str, run: DagsterRun, ours: bool
    ) -> Decision:
        """Decide a request whose id already has a run: the same request, or a conflict."""
        if run.tags.get(T.REQUEST_SHA256) != sha256:
            return self._reject(
                item,
                f"request id {request_id!r} was already used for a different request "
                f"(run {run.run_id}); use a new request id",
                request_id,
            )
        # `existing` unless this file's own RunRequest made the run; when another submission of
        # the id won a race at the queue, the queue kept that submission's run instead.
        made_here = (
            ours
            and run.tags.get(SENSOR_NAME_TAG) == SENSOR_NAME
            and run.tags.get(RUN_KEY_TAG) == request_id
        )
        outcome = InboxOutcome(
            file=item.name,
            status="accepted",
            request_id=request_id,
            run_id=run.run_id,
            existing=not made_here,
            decided_at=datetime.now(UTC),
        )
        self._write(outcome)
        self.context.log.info(
            f"{item.name}: accepted request {request_id} as run {run.run_id}"
            + ("" if made_here else " (the request id had a run already)")
        )
        return "accepted"

    def _reject(self, item: RequestFile, reason: str, request_id: str | None) -> Decision:
        outcome = InboxOutcome(
            file=item.name,
            status="rejected",
            request_id=request_id,
            reason=_bounded(reason),
            decided_at=datetime.now(UTC),
        )
        self._write(outcome)
        self.context.log.warning(f"{item.name}: rejected: {outcome.reason}")
        return "rejected"

    def _write(self, outcome: InboxOutcome) -> None:
        self.cursor.pending.pop(outcome.file, None)
        try:
            write_outcome(self.inbox, outcome)
        except OSError as exc:
            # Nothing recorded, so the file is decided again next tick.
            self.context.log.error(f"{outcome.file}: could not write its outcome: {exc}")


def _forget_settled(cursor: InboxCursor, inbox: Path) -> None:
    """Drop pending entries whose file is gone or whose outcome exists."""
    for name in list(cursor.pending):
        if not os.path.lexists(inbox / name) or os.path.lexists(inbox / outcome_name(name)):
            cursor.pending.pop(name)


@sensor(
    name=SENSOR_NAME,
    minimum_interval_seconds=INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    # Any workflow's assets and checks may be requested; each RunRequest narrows the selection
    # to its own workflow, and Dagster runs it as the implicit asset job, like the client does.
    asset_selection=AssetSelection.all() | AssetSelection.all_asset_checks(),
    description="Reads processing requests dropped as JSON files into ERGOT_REQUEST_INBOX, starts "
    "one run per request id and writes each file's outcome beside it.",
)
def request_inbox(
    context: SensorEvaluationContext,
    artifact_store: ArtifactStoreResource,
    runtime_targets: RuntimeTargetsResource,
) -> SensorResult | SkipReason:
    """Decide the request files waiting in the inbox; see the module docstring for the flow."""
    settings = ErgotSettings.from_env()
    configured = settings.request_inbox
    if not configured.is_dir():
        return SkipReason(f"the request inbox {configured} does not exist")
    # Every path the sensor touches is built from this one, so nothing is written outside it.
    inbox = configured.resolve()
    cursor = InboxCursor.parse(context.cursor)
    _forget_settled(cursor, inbox)
    waiting = waiting_files(inbox, _settle_s(), time.time())
    if not waiting:
        return SensorResult(
            cursor=cursor.dump(), skip_reason=SkipReason(f"no request files waiting in {inbox}")
        )
    # Files already asked for come first: their outcome is one lookup away.
    waiting.sort(key=lambda f: f.name not in cursor.pending)
    catalog = LocalCatalog(
        cached_registry(settings.workflow_defs),
        context.instance,
        artifact_store.get_store(),
        runtime_targets.get(),
    )
    tick = _Tick(context=context, inbox=inbox, catalog=catalog, cursor=cursor)
    for item in waiting[:MAX_FILES_PER_TICK]:
        tick.handle(item)
    summary = ", ".join(f"{n} {what}" for what, n in sorted(tick.counts.items()))
    if len(waiting) > MAX_FILES_PER_TICK:
        summary += f"; {len(waiting) - MAX_FILES_PER_TICK} file(s) left for the next tick"
    if not tick.run_requests:
        return SensorResult(cursor=cursor.dump(), skip_reason=SkipReason(summary))
    return SensorResult(
        run_requests=tick.run_requests,
        cursor=cursor.dump(),
        # Requests on a derived artifact or library entry name partitions that must exist
        # before their runs do; Dagster adds them before it creates the runs.
        dynamic_partitions_requests=(
            [source_partitions.build_add_request(tick.new_partitions)]
            if tick.new_partitions
            else None
        ),
    )
