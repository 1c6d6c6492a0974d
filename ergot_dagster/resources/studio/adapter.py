"""The Studio runtime adapter: submit a job to a Studio server, poll it, download its outputs.

A Studio server is a media runtime behind the plane (a GPU box doing TTS, voice-prompt extraction,
...) that queues jobs behind a small JSON/HTTP protocol, described in docs/studio-protocol.md. It is
never the control plane: the plane decides what runs, retries and records; the server only runs the
one job it is given and answers questions about it.

One stage is one job: `POST /v1/jobs` (multipart: a JSON `spec` plus one part per input file),
`GET /v1/jobs/{id}` until the job is terminal, then `GET /v1/jobs/{id}/outputs/{name}` for each
output the server lists. Every call is bounded by `request_timeout_s` and by what remains of the
stage's `timeout_s`; a job still unfinished at the deadline, or a wait interrupted by a run
cancellation, is cancelled on the server with `POST /v1/jobs/{id}/cancel`.

The adapter never retries a failed submit: the error is classified (transient or permanent) and
retrying is left to the plane's step retries (Dagster's RetryRequested), so that every attempt is
on record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import Field

from ergot_dagster.artifacts.store import extension_for
from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeFailure,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.media.hashing import CHUNK
from ergot_dagster.resources.http import MAX_QUOTED_CHARS, DeadlineFile
from ergot_dagster.resources.http import Answer as _Answer
from ergot_dagster.resources.http import scrub as _scrub
from ergot_dagster.resources.http import secrets_of as _secrets
from ergot_dagster.resources.runtime import (
    DeadlinePassed,
    HealthReport,
    JobRuntime,
    RuntimeJob,
    StageFile,
    StageRequest,
    StageResult,
    register_runtime,
)
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec

JOBS_PATH = "/v1/jobs"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# Answers that say "not now" rather than "never": a poll that gets one is a blip.
_BLIP_STATUSES = frozenset({408, 429})
# Output names become file names under the workdir, so nothing that could climb out of it.
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# JSON answers are small; a server (or a proxy in front of it) sending more is not speaking the
# protocol, and reading it all would only cost memory.
_MAX_ANSWER_BYTES = 1 << 20


class _DeadlinePassed(Exception):
    """The stage's overall deadline passed; the caller knows what was running and says so."""


@dataclass
class _Session:
    """One stage's conversation with one Studio server: the client, the deadline, the secrets."""

    target: RuntimeTarget
    client: httpx.Client
    deadline: float
    request_timeout_s: float
    secrets: tuple[str, ...]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def call_timeout(self) -> float:
        """The next HTTP call's timeout: the per-call bound, or less if the stage ends sooner."""
        remaining = self.remaining()
        if remaining <= 0:
            raise _DeadlinePassed
        return min(self.request_timeout_s, remaining)

    def scrub(self, text: str) -> str:
        return _scrub(text, self.secrets)

    @property
    def credential_hint(self) -> str:
        """Where the credential comes from (the variable's name only), for auth failures."""
        env = self.target.auth.token_env
        return (
            f"; the credential is read from {env}"
            if env and self.target.auth.kind != "none"
            else ""
        )


class _DeadlineReader(DeadlineFile):
    """An input file whose upload stops at the stage deadline."""

    expired = _DeadlinePassed


@contextlib.contextmanager
def _translated(session: _Session, what: str, timeout_s: float) -> Iterator[None]:
    """Turn httpx's exceptions into the plane's. Only the exception's type is reported: httpx
    messages can quote the URL, and a URL can carry credentials."""
    try:
        yield
    except httpx.TimeoutException as exc:
        if session.remaining() <= 0:
            raise _DeadlinePassed from exc
        raise RuntimeTimeoutError(
            f"{session.target.name} did not answer {what} within {timeout_s:.3g} s "
            f"({type(exc).__name__})"
        ) from exc
    except httpx.InvalidURL as exc:
        raise PermanentRuntimeError(
            f"target {session.target.name} has an endpoint httpx cannot use ({type(exc).__name__})"
        ) from exc
    except (httpx.RequestError, httpx.StreamError) as exc:
        raise TransientRuntimeError(
            f"{session.target.name} is unreachable during {what} ({type(exc).__name__})"
        ) from exc


def _error_fields(answer: _Answer) -> tuple[str | None, str | None, str | None]:
    """(code, message, field) from a protocol error body `{"error": {...}}`, when there is one."""
    doc = answer.json_object()
    error = doc.get("error") if doc else None
    if not isinstance(error, dict):
        return None, None, None

    def text(key: str) -> str | None:
        value = error.get(key)
        return str(value) if value not in (None, "") else None

    return text("code"), text("message"), text("field")


def _describe(answer: _Answer, secrets: tuple[str, ...]) -> str:
    """`503 busy: the queue is full (field 'text')`, or the start of a non-protocol body."""
    code, message, field = _error_fields(answer)
    detail = str(answer.status)
    if code:
        detail += f" {_scrub(code, secrets)}"
    if message:
        detail += f": {_scrub(message, secrets)}"
    elif code is None and answer.body:
        snippet = _scrub(answer.body[:MAX_QUOTED_CHARS].decode("utf-8", "replace"), secrets)
        if snippet:
            detail += f": {snippet}"
    if field:
        detail += f" (field {_scrub(field, secrets)!r})"
    return detail


def _failure(
    answer: _Answer, session: _Session, what: str, *, job_id: str | None = None
) -> RuntimeFailure:
    """The plane's error for a non-success answer, classified by status code."""
    target = session.target.name
    detail = _describe(answer, session.secrets)
    status = answer.status
    if status == 429:
        retry_after = answer.headers.get("retry-after", "").strip()
        hint = ""
        if retry_after:
            unit = " s" if retry_after.isdigit() else ""
            hint = f"; Retry-After: {session.scrub(retry_after)}{unit}"
        return TransientRuntimeError(
            f"{target} is overloaded and refused {what} ({detail}){hint}", job_id=job_id
        )
    if status >= 500 or status in _BLIP_STATUSES:
        return TransientRuntimeError(f"{target} failed {what} ({detail})", job_id=job_id)
    if status in (401, 403):
        return PermanentRuntimeError(
            f"{target} refused the credentials for {what} ({detail}){session.credential_hint}",
            job_id=job_id,
        )
    if status < 400:
        # Redirects are not part of the protocol, and following one could carry the credential
        # to another host.
        return PermanentRuntimeError(
            f"{target} answered {what} with {detail}, which the Studio protocol does not use",
            job_id=job_id,
        )
    return PermanentRuntimeError(f"{target} rejected {what} ({detail})", job_id=job_id)


def _fraction(value: object) -> float | None:
    """A progress fraction clamped to 0..1, or None when the server does not know."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))


def _files_of(bound: StageFile | list[StageFile]) -> list[StageFile]:
    return bound if isinstance(bound, list) else [bound]


@register_runtime
class StudioRuntime(JobRuntime):
    """Runs a stage as one job on a Studio server (JSON over HTTP; docs/studio-protocol.md).

    The stage's `operation` names the server's operation (`tts`, `voice_prompt`, ...) and its
    params go to the server as they are. The target gives the base URL (`endpoint`) and the
    credential (`auth`, read from an environment variable when used, never logged). The server's
    job id is the stage's `job_id`. A job that outlives the stage timeout, or whose run is
    cancelled, is cancelled on the server.
    """

    runtime_type = "studio"
    poll_interval_s: float = Field(
        default=0.5, gt=0, description="seconds between two status polls of a job"
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="bound on each HTTP call (submit, poll, download)"
    )
    cancel_timeout_s: float = Field(
        default=10.0, gt=0, description="bound on the cancel call sent on timeout or cancellation"
    )
    health_timeout_s: float = Field(default=5.0, gt=0, description="bound on a health probe")
    poll_error_tolerance: int = Field(
        default=3,
        ge=0,
        description="consecutive failed status polls (unreachable, 5xx, 429) tolerated before "
        "the stage fails as transient",
    )

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        # Operations are the server's to define, so only the shape can be checked here.
        if stage.template is not None or not stage.operation:
            raise ValueError("studio stages name the server's operation in `operation`")

    # -- running a stage ------------------------------------------------------------------------

    def submit(self, request: StageRequest, log: logging.Logger) -> RuntimeJob:
        stage = request.stage
        target = request.target
        if not stage.operation:
            raise PermanentRuntimeError(f"stage {stage.id!r} names no studio operation")
        if not target.endpoint:
            raise PermanentRuntimeError(
                f"target {target.name} has no endpoint; a studio target needs its server's URL"
            )
        headers = self._auth_headers(target)
        started = time.monotonic()
        client = self._client(target, headers)
        session = _Session(
            target=target,
            client=client,
            deadline=started + request.timeout_s,
            request_timeout_s=self.request_timeout_s,
            secrets=_secrets(headers),
        )
        try:
            job_id = self._submit(session, request, stage.operation)
        except _DeadlinePassed:
            client.close()
            raise RuntimeTimeoutError(
                f"{stage.operation} on {target.name}: no answer to the submission within "
                f"{request.timeout_s:g} s"
            ) from None
        except BaseException:
            client.close()
            raise
        log.info(
            f"studio: {stage.operation} submitted to {target.name} as job {job_id} "
            f"(timeout {request.timeout_s:g} s)"
        )
        return RuntimeJob(
            job_id=job_id,
            target=target.name,
            deadline=session.deadline,
            state={"session": session, "headers": headers, "started": started},
        )

    def wait(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> None:
        try:
            doc, polls = self._wait(job.state["session"], job.job_id, request, log)
        except _DeadlinePassed:
            raise DeadlinePassed from None
        job.state.update(doc=doc, polls=polls)

    def fetch_outputs(
        self, request: StageRequest, job: RuntimeJob, log: logging.Logger
    ) -> StageResult:
        session: _Session = job.state["session"]
        doc: dict[str, Any] = job.state["doc"]
        stage = request.stage
        operation = stage.operation or ""
        job_id = job.job_id
        self._raise_if_unsuccessful(session, doc, job_id, operation)
        try:
            outputs, listed = self._download_outputs(session, doc, job_id, request, log)
        except _DeadlinePassed:
            raise RuntimeTimeoutError(
                f"{operation} on {job.target}: outputs not downloaded within "
                f"{request.timeout_s:g} s",
                job_id=job_id,
            ) from None
        metadata: dict[str, Any] = {
            "studio_job_id": job_id,
            "operation": operation,
            "client_ref": self._client_ref(request),
            "polls": job.state["polls"],
            # Not "outputs": the plane merges metadata into its stage report, which has that key.
            "studio_outputs": listed,
        }
        server_elapsed = doc.get("elapsed_s")
        if isinstance(server_elapsed, int | float) and not isinstance(server_elapsed, bool):
            metadata["server_elapsed_s"] = round(float(server_elapsed), 3)
        missing = sorted(set(stage.outputs) - set(outputs))
        if missing:
            log.warning(f"studio: job {job_id} on {job.target} did not produce {missing}")
        log.info(
            f"studio: job {job_id} on {job.target} succeeded in "
            f"{time.monotonic() - job.state['started']:.2f} s with {sorted(outputs)}"
        )
        return StageResult(
            outputs=dict(outputs), target=job.target, job_id=job_id, metadata=metadata
        )

    def cancel(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> str:
        # A run cancellation (KeyboardInterrupt, DagsterExecutionInterruptedError), a deadline or
        # a lost server: the job must not keep a GPU busy for a run that has given up on it.
        return self._cancel(request.target, job.state["headers"], job.job_id, log)

    def release(self, job: RuntimeJob) -> None:
        job.state["session"].client.close()

    @staticmethod
    def _client_ref(request: StageRequest) -> str:
        return f"{request.run_id}/{request.stage.id}"

    @staticmethod
    def _auth_headers(target: RuntimeTarget) -> dict[str, str]:
        try:
            return target.auth.headers()
        except LookupError:
            # The variable's name helps the operator; its value (if any) is never read into text.
            raise PermanentRuntimeError(
                f"target {target.name}: the credential variable {target.auth.token_env} is not set"
            ) from None

    def _client(self, target: RuntimeTarget, headers: dict[str, str]) -> httpx.Client:
        try:
            return httpx.Client(
                base_url=target.endpoint or "",
                headers=headers,
                timeout=self.request_timeout_s,
                follow_redirects=False,
            )
        except httpx.InvalidURL as exc:
            raise PermanentRuntimeError(
                f"target {target.name} has an endpoint httpx cannot use ({type(exc).__name__})"
            ) from exc

    def _exchange(
        self, session: _Session, method: str, path: str, what: str, **kwargs: Any
    ) -> _Answer:
        """One HTTP call, its answer read in full but bounded in size and by the stage deadline."""
        timeout = session.call_timeout()
        with (
            _translated(session, what, timeout),
            session.client.stream(method, path, timeout=timeout, **kwargs) as response,
        ):
            body = bytearray()
            for chunk in response.iter_bytes():
                # httpx's timeout is per read: this bounds a server that dribbles bytes.
                if time.monotonic() > session.deadline:
                    raise _DeadlinePassed
                body += chunk
                if len(body) > _MAX_ANSWER_BYTES:
                    break
            return _Answer(response.status_code, response.headers, bytes(body))

    def _submit(self, session: _Session, request: StageRequest, operation: str) -> str:
        """POST the job; its id, or the classified error. Never retried here."""
        what = f"the {operation} job"
        spec = {
            "operation": operation,
            "params": request.params,
            "client_ref": self._client_ref(request),
        }
        try:
            spec_bytes = json.dumps(spec, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise PermanentRuntimeError(
                f"the params of stage {request.stage.id!r} cannot be sent as JSON: {exc}"
            ) from exc
        with contextlib.ExitStack() as stack:
            # Spec first, so that a server can reject a bad spec before reading the uploads.
            parts: list[tuple[str, tuple[str | None, Any, str]]] = [
                ("spec", (None, spec_bytes, "application/json"))
            ]
            for name, bound in request.inputs.items():
                # A set input is sent as the same part name repeated, in order.
                for item in _files_of(bound):
                    try:
                        handle = stack.enter_context(open(item.path, "rb"))
                    except OSError as exc:
                        raise PermanentRuntimeError(
                            f"input {name!r} ({item.path.name}) cannot be read: "
                            f"{type(exc).__name__}"
                        ) from exc
                    reader = _DeadlineReader(handle, session.deadline)
                    parts.append((f"input.{name}", (item.path.name, reader, item.media_type)))
            try:
                answer = self._exchange(session, "POST", JOBS_PATH, what, files=parts)
            except _DeadlinePassed:
                raise RuntimeTimeoutError(
                    f"{session.target.name} did not accept {what} within the stage's "
                    f"{request.timeout_s:g} s (no job id, nothing to cancel)"
                ) from None
        if not 200 <= answer.status < 300:
            raise _failure(answer, session, what)
        doc = answer.json_object()
        job_id = doc.get("job_id") if doc else None
        if not isinstance(job_id, str) or not job_id:
            # The endpoint answered 2xx but not as a Studio server: retrying will not change that.
            raise PermanentRuntimeError(
                f"{session.target.name} accepted {what} without a job id; is the endpoint a "
                "Studio server?"
            )
        return job_id

    def _wait(
        self, session: _Session, job_id: str, request: StageRequest, log: logging.Logger
    ) -> tuple[dict[str, Any], int]:
        """Poll the job until it is terminal: (its last status document, polls made).

        Raises `_DeadlinePassed` at the deadline. Up to `poll_error_tolerance` consecutive blips
        (unreachable, timeouts, 5xx, 429) are tolerated, because a job on a busy server should not
        be abandoned for one slow answer.
        """
        target = session.target.name
        path = f"{JOBS_PATH}/{quote(job_id, safe='')}"
        what = f"the status poll of job {job_id}"
        failures = 0
        polls = 0
        last_report: tuple[Any, ...] | None = None
        last_status: str | None = None
        while True:
            polls += 1
            blip: TransientRuntimeError | None = None
            doc: dict[str, Any] | None = None
            try:
                answer = self._exchange(session, "GET", path, what)
            except TransientRuntimeError as exc:
                blip = exc
            else:
                if answer.status == 404:
                    raise TransientRuntimeError(
                        f"{target} no longer knows job {job_id} (was the server restarted?)",
                        job_id=job_id,
                    )
                if answer.status >= 500 or answer.status in _BLIP_STATUSES:
                    failure = _failure(answer, session, what, job_id=job_id)
                    assert isinstance(failure, TransientRuntimeError)
                    blip = failure
                elif answer.status != 200:
                    raise _failure(answer, session, what, job_id=job_id)
                else:
                    doc = answer.json_object()
                    if doc is None or not isinstance(doc.get("status"), str):
                        blip = TransientRuntimeError(
                            f"{target} answered {what} with something that is not a job status",
                            job_id=job_id,
                        )
            if blip is not None:
                failures += 1
                if failures > self.poll_error_tolerance:
                    raise type(blip)(
                        f"lost contact with job {job_id} on {target} after {failures} failed "
                        f"polls: {blip}",
                        job_id=job_id,
                    ) from blip
                log.warning(
                    f"studio: poll of job {job_id} on {target} failed "
                    f"({failures}/{self.poll_error_tolerance} tolerated): {blip}"
                )
                self._pause(session)
                continue
            assert doc is not None
            failures = 0
            status = doc["status"]
            fraction = _fraction(doc.get("progress"))
            message = session.scrub(str(doc.get("message") or status))
            if status != last_status:
                log.info(f"studio: job {job_id} on {target} is {status}")
                last_status = status
            if (status, fraction, message) != last_report:
                last_report = (status, fraction, message)
                request.progress(fraction, message)
            if status in TERMINAL_STATUSES:
                return doc, polls
            self._pause(session)

    def _pause(self, session: _Session) -> None:
        """Sleep until the next poll, never past the deadline."""
        remaining = session.remaining()
        if remaining <= 0:
            raise _DeadlinePassed
        time.sleep(min(self.poll_interval_s, remaining))

    @staticmethod
    def _raise_if_unsuccessful(
        session: _Session, doc: dict[str, Any], job_id: str, operation: str
    ) -> None:
        target = session.target.name
        status = doc["status"]
        if status == "canceled":
            # Someone else cancelled it (an operator on the server, a restart): the work itself
            # was fine, so another attempt may succeed.
            raise TransientRuntimeError(
                f"{target} job {job_id} ({operation}): job was cancelled on the runtime",
                job_id=job_id,
            )
        if status != "failed":
            return
        error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
        code = session.scrub(str(error.get("code") or "unknown"))
        message = session.scrub(str(error.get("message") or "no message"))
        kind = TransientRuntimeError if error.get("retryable") is True else PermanentRuntimeError
        raise kind(f"{target} job {job_id} ({operation}) failed ({code}): {message}", job_id=job_id)

    def _download_outputs(
        self,
        session: _Session,
        doc: dict[str, Any],
        job_id: str,
        request: StageRequest,
        log: logging.Logger,
    ) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
        """Fetch every output the server lists into the workdir: (paths, what was listed)."""
        target = session.target.name
        listed = doc.get("outputs") or []
        if not isinstance(listed, list):
            raise PermanentRuntimeError(f"{target} listed the outputs of job {job_id} as no list")
        paths: dict[str, Path] = {}
        described: dict[str, dict[str, Any]] = {}
        for entry in listed:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not _OUTPUT_NAME.match(name) or name in paths:
                raise PermanentRuntimeError(
                    f"{target} listed an output of job {job_id} with an unusable or repeated name "
                    f"{session.scrub(repr(name))}"
                )
            media_type = str(
                entry.get("media_type")
                or request.output_types.get(name)
                or "application/octet-stream"
            )
            size = entry.get("size")
            expected = size if isinstance(size, int) and not isinstance(size, bool) else None
            declared = request.output_types.get(name)
            if declared and declared != media_type:
                log.warning(
                    f"studio: job {job_id} output {name} is {media_type}, the stage expects "
                    f"{declared}"
                )
            final = request.workdir / f"{name}{extension_for(media_type)}"
            written = self._fetch(session, job_id, name, final, expected)
            paths[name] = final
            described[name] = {"media_type": media_type, "size": written}
        return paths, described

    def _fetch(
        self, session: _Session, job_id: str, name: str, final: Path, expected: int | None
    ) -> int:
        """Stream one output to `final` through a temporary name; the bytes written."""
        target = session.target.name
        what = f"the download of output {name} of job {job_id}"
        path = f"{JOBS_PATH}/{quote(job_id, safe='')}/outputs/{quote(name, safe='')}"
        # Same directory as the final name, so the rename is atomic and nothing half-written
        # ever carries the final name.
        part = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
        written = 0
        try:
            try:
                timeout = session.call_timeout()
                with (
                    _translated(session, what, timeout),
                    session.client.stream("GET", path, timeout=timeout) as response,
                ):
                    if response.status_code != 200:
                        head = bytearray()
                        for chunk in response.iter_bytes():
                            head += chunk
                            if len(head) > MAX_QUOTED_CHARS * 4:
                                break
                        answer = _Answer(response.status_code, response.headers, bytes(head))
                        if response.status_code == 404:
                            raise TransientRuntimeError(
                                f"{target} listed output {name} of job {job_id} but does not "
                                f"serve it ({_describe(answer, session.secrets)})",
                                job_id=job_id,
                            )
                        raise _failure(answer, session, what, job_id=job_id)
                    with open(part, "wb") as handle:
                        for chunk in response.iter_bytes(CHUNK):
                            if time.monotonic() > session.deadline:
                                raise _DeadlinePassed
                            handle.write(chunk)
                            written += len(chunk)
            except _DeadlinePassed:
                raise RuntimeTimeoutError(
                    f"the outputs of job {job_id} on {target} were not downloaded within the "
                    "stage timeout",
                    job_id=job_id,
                ) from None
            if expected is not None and written != expected:
                raise TransientRuntimeError(
                    f"{target} sent {written} bytes of output {name} of job {job_id}, "
                    f"{expected} were announced",
                    job_id=job_id,
                )
            os.replace(part, final)
        finally:
            part.unlink(missing_ok=True)
        return written

    def _cancel(
        self, target: RuntimeTarget, headers: dict[str, str], job_id: str, log: logging.Logger
    ) -> str:
        """Ask the server to cancel `job_id`, best effort and bounded; a phrase saying how it went.

        A fresh client: the stage's may have been interrupted in the middle of a call, leaving its
        connection in an unknown state.
        """
        name = target.name
        path = f"{JOBS_PATH}/{quote(job_id, safe='')}/cancel"
        # httpx bounds each phase separately; halving keeps connect + read within the budget.
        phase = self.cancel_timeout_s / 2
        try:
            with httpx.Client(
                base_url=target.endpoint or "",
                headers=headers,
                timeout=httpx.Timeout(phase),
                follow_redirects=False,
            ) as client:
                response = client.post(path)
        except Exception as exc:
            log.warning(
                f"studio: could not cancel job {job_id} on {name} ({type(exc).__name__}); "
                "it may still be running there"
            )
            return f"the cancel call for job {job_id} on {name} failed ({type(exc).__name__})"
        if response.status_code in (200, 202):
            log.info(f"studio: cancelled job {job_id} on {name}")
            return f"cancelled job {job_id} on {name}"
        if response.status_code == 409:
            log.info(f"studio: job {job_id} on {name} had already finished when cancelled")
            return f"job {job_id} on {name} had already finished"
        log.warning(
            f"studio: cancelling job {job_id} on {name} was answered {response.status_code}"
        )
        return f"the cancel call for job {job_id} on {name} was answered {response.status_code}"

    # -- health ---------------------------------------------------------------------------------

    def health(self, target: RuntimeTarget) -> HealthReport:
        if not target.endpoint:
            return HealthReport(healthy=False, detail=f"target {target.name} has no endpoint")
        try:
            headers = target.auth.headers()
        except LookupError:
            return HealthReport(
                healthy=False,
                detail=f"the credential variable {target.auth.token_env} is not set",
            )
        started = time.monotonic()
        deadline = started + self.health_timeout_s
        try:
            with (
                httpx.Client(
                    base_url=target.endpoint,
                    headers=headers,
                    timeout=self.health_timeout_s,
                    follow_redirects=False,
                ) as client,
                client.stream("GET", "/health") as response,
            ):
                body = bytearray()
                for chunk in response.iter_bytes():
                    if time.monotonic() > deadline:
                        raise TimeoutError("the health answer took too long")
                    body += chunk
                    if len(body) > _MAX_ANSWER_BYTES:
                        break
                answer = _Answer(response.status_code, response.headers, bytes(body))
        except Exception as exc:
            # Any failure is an unhealthy target; the type alone, as messages may quote the URL.
            return HealthReport(
                healthy=False,
                detail=f"unreachable ({type(exc).__name__})",
                latency_ms=(time.monotonic() - started) * 1000,
            )
        latency_ms = (time.monotonic() - started) * 1000
        secrets = _secrets(headers)
        if answer.status != 200:
            return HealthReport(
                healthy=False,
                detail=f"/health answered {_describe(answer, secrets)}",
                latency_ms=latency_ms,
            )
        doc = answer.json_object()
        if doc is None:
            return HealthReport(
                healthy=False, detail="/health did not answer JSON", latency_ms=latency_ms
            )
        info = {key: doc.get(key) for key in ("queue_depth", "running", "device", "operations")}
        status = str(doc.get("status") or "unknown")
        return HealthReport(
            healthy=status == "ok",
            detail=_scrub(
                f"{status}: {info['queue_depth']} queued, {info['running']} running on "
                f"{info['device']}",
                secrets,
            ),
            latency_ms=latency_ms,
            info=info,
        )
