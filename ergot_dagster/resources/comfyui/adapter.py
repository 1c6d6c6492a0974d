"""The ComfyUI runtime adapter: one stage is one prompt on a ComfyUI server.

ComfyUI is a runtime, never the orchestrator: the plane decides what runs, retries and records;
the server runs the one graph it is given. The stage's `template` is an API-format graph and its
`params` / `inputs` bind values and files into named node inputs (`graph.py`). One stage:

1. upload every bound input file (`POST /upload/image`) and bind the names the server gives them;
2. open `/ws?clientId=<uuid>` *before* posting, so no message about the prompt is missed;
3. `POST /prompt` with that client id; a 400 with `node_errors` is a permanent failure naming each
   node and input, never retried;
4. follow the prompt over the websocket (progress per node and sampler step), checking `/queue`
   and `/history/{id}` when the socket is quiet, and polling them instead if the socket cannot be
   opened or drops;
5. download every file of every mapped output node (`GET /view`) into the workdir.

A run that gives up (cancelled, or past the stage timeout) takes its prompt with it: a queued
prompt is deleted from the queue (`POST /queue {"delete": [id]}`), a running one interrupted
(`POST /interrupt {"prompt_id": id}`). docs/comfyui-runtime.md has the states and the errors.

A stage with `params.for_each: "<node>.<input>"` maps its graph over the files of that input (an
image set): the steps above once per file, in order, one prompt at a time, all within the one
stage deadline; each output gathers its files in the same order.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import Field, ValidationError

from ergot_dagster.artifacts.store import extension_for
from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeFailure,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.media.hashing import sha256_file
from ergot_dagster.resources.comfyui import graph
from ergot_dagster.resources.comfyui.client import (
    Answer,
    ComfyClient,
    DeadlineReached,
    PromptEvents,
    WebsocketLost,
    endpoint_secrets,
    public_endpoint,
    scrub,
)
from ergot_dagster.resources.comfyui.follow import PromptState, PromptTracker
from ergot_dagster.resources.comfyui.protocol import (
    PromptAnswer,
    UploadAnswer,
    describe_execution_error,
    describe_node_errors,
    describe_prompt_error,
    files_in,
    history_entry,
    is_out_of_memory,
    parse_ws,
    queue_counts,
    queue_place,
)
from ergot_dagster.resources.runtime import (
    DeadlinePassed,
    HealthReport,
    JobRuntime,
    ProgressReporter,
    RuntimeJob,
    StageFile,
    StageRequest,
    StageResult,
    register_runtime,
)
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec

# Text that names a file extension in an input's name; anything else takes the media type's.
_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


class _MemberProgress:
    """A mapped stage's progress: member `index` of `count`'s own, as a share of the whole."""

    def __init__(self, reporter: ProgressReporter, key: str, index: int, count: int) -> None:
        self._reporter = reporter
        self._prefix = f"{key} {index}/{count}"
        self._index = index
        self._count = count

    def __call__(self, fraction: float | None, message: str) -> None:
        done = (self._index - 1 + (fraction or 0.0)) / self._count
        self._reporter(done, f"{self._prefix}: {message}")


class _Progress:
    """Calls the stage's progress reporter when what it would say changes."""

    def __init__(self, reporter: ProgressReporter, target: str) -> None:
        self._reporter = reporter
        self._target = target
        self._last: tuple[Any, ...] | None = None

    def __call__(self, tracker: PromptTracker) -> None:
        fraction = tracker.fraction()
        message = tracker.describe(self._target)
        key = (round(fraction, 3) if fraction is not None else None, message)
        if key != self._last:
            self._last = key
            self._reporter(fraction, message)


@register_runtime
class ComfyUIRuntime(JobRuntime):
    """Runs a stage as one prompt on a ComfyUI server (HTTP + websocket; docs/comfyui-runtime.md).

    The stage's `template` is the graph in ComfyUI's API format; `params` and `inputs` keys
    `"<node>.<input>"` bind settings and uploaded files into it; `outputs` keys name the output
    nodes whose files become stage outputs. The target gives the server's URL (`endpoint`) and an
    optional credential (`auth`) for a proxy in front of it. The prompt id is the stage's `job_id`.
    A prompt whose run is cancelled, or which outlives the stage timeout, is deleted from the
    queue or interrupted.
    """

    runtime_type = "comfyui"
    poll_interval_s: float = Field(
        default=1.0, gt=0, description="seconds between two status polls when there is no websocket"
    )
    quiet_check_s: float = Field(
        default=5.0,
        gt=0,
        description="with the websocket open, seconds without news of the prompt before /queue and "
        "/history are asked (a restarted server sends nothing)",
    )
    lost_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="seconds a prompt may be in neither the queue nor the history before it is "
        "declared lost (transient)",
    )
    history_wait_s: float = Field(
        default=10.0,
        gt=0,
        description="seconds to wait for a finished prompt's history entry (it is written just "
        "after the websocket says so)",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="bound on each HTTP call (upload, prompt, poll, download)"
    )
    ws_open_timeout_s: float = Field(
        default=10.0, gt=0, description="bound on opening the websocket; past it, poll instead"
    )
    cancel_timeout_s: float = Field(
        default=10.0, gt=0, description="bound on cancelling a prompt (queue delete / interrupt)"
    )
    health_timeout_s: float = Field(default=5.0, gt=0, description="bound on a health probe")
    poll_error_tolerance: int = Field(
        default=3,
        ge=0,
        description="consecutive failed status polls tolerated before the stage fails as transient",
    )
    max_answer_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, description="cap on a JSON answer (queue, history, ...)"
    )
    max_ws_message_bytes: int = Field(
        default=16 * 1024 * 1024,
        gt=0,
        description="cap on one websocket message; a larger one drops the socket (then: polling)",
    )
    max_output_bytes: int = Field(
        default=8 * 1024 * 1024 * 1024, gt=0, description="cap on one downloaded output file"
    )
    upload_subfolder: str = Field(
        default="ergot",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="subfolder of the server's input directory that uploads go to",
    )

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        graph.validate_stage(stage)

    # -- a stage mapped over an input's files -------------------------------------------------

    def run_stage(self, request: StageRequest, log: logging.Logger) -> StageResult:
        try:
            key = graph.for_each_input(request.stage)
        except ValueError as exc:
            raise PermanentRuntimeError(f"stage {request.stage.id!r}: {exc}") from None
        if key is None:
            return super().run_stage(request, log)
        return self._run_for_each(request, key, log)

    def _run_for_each(self, request: StageRequest, key: str, log: logging.Logger) -> StageResult:
        """The graph once per file of input `key`, in order: one prompt at a time, each submitted,
        followed, fetched (and, if the run gives up, cancelled) as a stage of its own, all within
        the stage's one deadline. Each output gathers the members' files in member order."""
        stage = request.stage
        bound = request.inputs.get(key)
        members = bound if isinstance(bound, list) else [bound] if bound is not None else []
        if not members:
            raise PermanentRuntimeError(
                f"stage {stage.id!r}: input {key!r}, which `for_each` runs the graph over, "
                "holds no files"
            )
        count = len(members)
        deadline = time.monotonic() + request.timeout_s
        request.workdir.mkdir(parents=True, exist_ok=True)
        gathered: dict[str, list[Path]] = {}
        made_by: dict[str, list[int]] = {}
        prompt_ids: list[str] = []
        described: list[dict[str, Any]] = []
        followed_by: list[str] = []
        metadata: dict[str, Any] = {}
        for index, member in enumerate(members, start=1):
            label = f"{key} file {index} of {count} ({member.path.name})"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeTimeoutError(
                    f"{stage.id} on {request.target.name}: the stage's {request.timeout_s:g} s "
                    f"ran out after {index - 1} of {count} files of {key!r}",
                    job_id=prompt_ids[-1] if prompt_ids else None,
                )
            one = request.model_copy(
                update={
                    "inputs": {**request.inputs, key: member},
                    "timeout_s": remaining,
                    "progress": _MemberProgress(request.progress, key, index, count),
                }
            )
            try:
                result = super().run_stage(one, log)
            except RuntimeTimeoutError as exc:
                raise RuntimeTimeoutError(
                    f"{label}: the stage's {request.timeout_s:g} s ran out ({exc})",
                    job_id=exc.job_id,
                ) from exc
            except RuntimeFailure as exc:
                # The same kind (transient or permanent), saying which file it was.
                raise type(exc)(f"{label}: {exc}", job_id=exc.job_id) from exc
            metadata = result.metadata
            if result.job_id:
                prompt_ids.append(result.job_id)
            for how in str(metadata.get("followed_by", "")).split(", then "):
                if how and how not in followed_by:
                    followed_by.append(how)
            files: dict[str, list[str]] = {}
            for output, produced in result.outputs.items():
                paths = produced if isinstance(produced, list) else [produced]
                gathered.setdefault(output, []).extend(paths)
                made_by.setdefault(output, []).append(index)
                files[output] = [p.name for p in paths]
            described.append(
                {
                    "file": member.path.name,
                    "prompt_id": result.job_id,
                    "number": metadata.get("comfyui_number"),
                    "executed_s": metadata.get("executed_s"),
                    "outputs": files,
                }
            )
        for output, indexes in made_by.items():
            if len(indexes) != count:
                # A set whose members no longer line up with the input's files would be wrong
                # without anyone noticing; a graph that saves nothing at all is left to the plane.
                missing = sorted(set(range(1, count + 1)) - set(indexes))
                raise PermanentRuntimeError(
                    f"stage {stage.id!r}: output {output!r} has no file for {key} file(s) "
                    f"{', '.join(map(str, missing))} of {count}, so it cannot be lined up with "
                    "the input's files",
                    job_id=",".join(prompt_ids),
                )
        log.info(
            f"comfyui: {count} prompt(s) for the files of {key!r} on {request.target.name}: "
            f"{sum(len(p) for p in gathered.values())} file(s) for {sorted(gathered)}"
        )
        return StageResult(
            outputs={o: p[0] if len(p) == 1 else p for o, p in gathered.items()},
            target=request.target.name,
            # Every prompt, in member order: the manifest's runtime.job_id names them all.
            job_id=",".join(prompt_ids),
            metadata={
                "comfyui_server": metadata.get("comfyui_server"),
                "comfyui_prompt_ids": prompt_ids,
                "for_each": key,
                "members": count,
                "comfyui_members": described,
                "followed_by": ", ".join(followed_by),
            },
        )

    # -- submit ---------------------------------------------------------------------------------

    def submit(self, request: StageRequest, log: logging.Logger) -> RuntimeJob:
        stage = request.stage
        target = request.target
        try:
            graph.validate_stage(stage)
        except ValueError as exc:
            raise PermanentRuntimeError(f"stage {stage.id!r}: {exc}") from None
        assert stage.template is not None
        template: dict[str, Any] = stage.template
        slots = graph.bindings(stage, template)
        bound_by = {
            slot: f"{key.split(':', 1)[0]} {key.split(':', 1)[1]!r}" for key, slot in slots.items()
        }
        outputs = graph.output_nodes(template, stage.outputs)
        headers = self._auth_headers(target)
        started = time.monotonic()
        client = ComfyClient(
            target,
            headers,
            deadline=started + request.timeout_s,
            request_timeout_s=self.request_timeout_s,
            max_answer_bytes=self.max_answer_bytes,
        )
        # Newer ComfyUI takes the prompt id from the request: knowing it before the answer lets a
        # submission cut short (timeout, interrupt) still be cancelled. Older ones pick their own.
        proposed = str(uuid.uuid4())
        client_id = uuid.uuid4().hex
        events: PromptEvents | None = None
        in_flight = False
        try:
            uploaded = self._upload_inputs(client, request, log)
            try:
                prompt = graph.build_prompt(template, stage, request.params, uploaded)
            except ValueError as exc:
                raise PermanentRuntimeError(f"stage {stage.id!r}: {exc}") from None
            events = self._open_events(client, client_id, log)
            in_flight = True
            answer = self._post_prompt(client, prompt, client_id, proposed)
            # Still in flight until the answer is understood: a proxy's 502 after ComfyUI
            # queued the prompt must not leave it running while the plane retries.
            accepted = self._accepted(client, answer, template, bound_by, headers, log)
            in_flight = False
        except DeadlineReached:
            outcome = self._cancel_prompt(target, headers, proposed, log) if in_flight else ""
            self._close(events, client)
            raise RuntimeTimeoutError(
                f"{stage.id} on {target.name}: the prompt was not submitted within the stage's "
                f"{request.timeout_s:g} s" + (f"; {outcome}" if outcome else "")
            ) from None
        except BaseException:
            if in_flight:
                # Interrupted (or cut off) mid-submission: the server may have queued it anyway.
                self._cancel_prompt(target, headers, proposed, log)
            self._close(events, client)
            raise
        prompt_id = accepted.prompt_id
        tracker = PromptTracker(prompt_id=prompt_id, template=template)
        number = f" as number {accepted.number:g}" if accepted.number is not None else ""
        log.info(
            f"comfyui: prompt {prompt_id} queued on {target.name} ({client.server}){number}, "
            f"followed by {'websocket' if events else 'polling'} (timeout {request.timeout_s:g} s)"
        )
        return RuntimeJob(
            job_id=prompt_id,
            target=target.name,
            deadline=client.deadline,
            state={
                "client": client,
                "events": events,
                "headers": headers,
                "tracker": tracker,
                "outputs": outputs,
                "number": accepted.number,
                "started": started,
                "submitted": time.monotonic(),
                "followed_by": ["websocket" if events else "polling"],
            },
        )

    @staticmethod
    def _auth_headers(target: RuntimeTarget) -> dict[str, str]:
        try:
            return target.auth.headers()
        except LookupError:
            # The variable's name helps the operator; its value is never read into text.
            raise PermanentRuntimeError(
                f"target {target.name}: the credential variable {target.auth.token_env} is not set"
            ) from None

    def _upload_inputs(
        self, client: ComfyClient, request: StageRequest, log: logging.Logger
    ) -> dict[str, str]:
        """Upload each bound input file; stage input key -> the value its node input takes."""
        uploaded: dict[str, str] = {}
        for key in request.stage.inputs:
            bound = request.inputs.get(key)
            if bound is None:
                continue  # an optional workflow input the request did not give
            item = self._single_file(key, bound)
            try:
                digest, size = sha256_file(item.path)
            except OSError as exc:
                raise PermanentRuntimeError(
                    f"input {key!r} ({item.path.name}) cannot be read: {type(exc).__name__}"
                ) from exc
            # Named by content: the same file uploaded twice (a retry, another run) is one file
            # on the server, and two runs never overwrite each other's inputs.
            name = f"{digest[:32]}{self._extension(item)}"
            what = f"the upload of input {key!r} ({size} bytes)"
            answer = client.upload(item.path, name, self.upload_subfolder, what)
            doc = client.json_of(answer, what)
            try:
                upload = UploadAnswer.model_validate(doc)
            except ValidationError:
                raise PermanentRuntimeError(
                    f"{client.name} answered {what} with something that is not an upload answer "
                    f"({client.clean(json.dumps(doc)[:200])})"
                ) from None
            uploaded[key] = upload.reference()
            log.info(f"comfyui: uploaded input {key!r} to {client.name} as {upload.reference()!r}")
        return uploaded

    @staticmethod
    def _single_file(key: str, bound: StageFile | list[StageFile]) -> StageFile:
        if isinstance(bound, list):
            if len(bound) != 1:
                raise PermanentRuntimeError(
                    f"input {key!r} is a set of {len(bound)} files; a ComfyUI node input takes "
                    f"one file (`for_each: {key}` in the stage's params runs the graph once per "
                    "file)"
                )
            return bound[0]
        return bound

    @staticmethod
    def _extension(item: StageFile) -> str:
        suffix = item.path.suffix.lower()
        if 1 < len(suffix) <= 9 and set(suffix[1:]) <= _SUFFIX_CHARS:
            return suffix
        return extension_for(item.media_type) or ".bin"

    def _open_events(
        self, client: ComfyClient, client_id: str, log: logging.Logger
    ) -> PromptEvents | None:
        try:
            return client.open_events(client_id, self.ws_open_timeout_s, self.max_ws_message_bytes)
        except WebsocketLost as exc:
            log.warning(
                f"comfyui: the websocket of {client.name} could not be opened ({exc}); "
                "following the prompt by polling /queue and /history"
            )
            return None

    def _post_prompt(
        self, client: ComfyClient, prompt: dict[str, Any], client_id: str, proposed: str
    ) -> Answer:
        try:
            body = json.dumps(
                {"prompt": prompt, "client_id": client_id, "prompt_id": proposed},
                allow_nan=False,
            ).encode()
        except (TypeError, ValueError) as exc:
            raise PermanentRuntimeError(f"the prompt cannot be sent as JSON: {exc}") from exc
        return client.exchange(
            "POST",
            "/prompt",
            "the prompt",
            content=body,
            headers={"Content-Type": "application/json"},
        )

    def _accepted(
        self,
        client: ComfyClient,
        answer: Answer,
        template: dict[str, Any],
        bound_by: dict[graph.InputSlot, str],
        headers: dict[str, str],
        log: logging.Logger,
    ) -> PromptAnswer:
        """The accepted prompt, or the server's refusal as a permanent error naming nodes."""
        name = client.name
        doc = answer.json()
        if answer.status == 400 and isinstance(doc, dict):
            node_errors = doc.get("node_errors")
            lines = describe_node_errors(
                node_errors if isinstance(node_errors, dict) else {},
                template,
                bound_by,
                client.clean,
            )
            reason = (
                "; ".join(lines) if lines else describe_prompt_error(doc.get("error"), client.clean)
            )
            raise PermanentRuntimeError(f"{name} refused the prompt: {reason}")
        doc = client.json_of(answer, "the prompt")
        try:
            accepted = PromptAnswer.model_validate(doc)
        except ValidationError:
            raise PermanentRuntimeError(
                f"{name} accepted the prompt without a prompt id; is {client.server} a ComfyUI "
                "server?"
            ) from None
        if accepted.node_errors:
            # Accepted, but the outputs that failed validation would be skipped without a word:
            # that is a broken graph, not a result.
            lines = describe_node_errors(accepted.node_errors, template, bound_by, client.clean)
            outcome = self._cancel_prompt(client.target, headers, accepted.prompt_id, log)
            raise PermanentRuntimeError(
                f"{name} refused part of the prompt: {'; '.join(lines)} ({outcome})",
                job_id=accepted.prompt_id,
            )
        return accepted

    # -- wait -----------------------------------------------------------------------------------

    def wait(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> None:
        client: ComfyClient = job.state["client"]
        tracker: PromptTracker = job.state["tracker"]
        report = _Progress(request.progress, client.name)
        try:
            self._follow(client, job, tracker, report, log)
            if tracker.state is PromptState.SUCCEEDED and tracker.history is None:
                self._await_history(client, tracker, log)
        except DeadlineReached:
            raise DeadlinePassed from None
        report(tracker)
        log.info(
            f"comfyui: prompt {tracker.prompt_id} on {client.name} {tracker.state.value}"
            + (
                f" after {tracker.ended_at - job.state['submitted']:.2f} s"
                if tracker.ended_at
                else ""
            )
        )

    def _follow(
        self,
        client: ComfyClient,
        job: RuntimeJob,
        tracker: PromptTracker,
        report: _Progress,
        log: logging.Logger,
    ) -> None:
        """Until the prompt is finished: websocket messages while there is a socket, status polls
        when it is quiet or gone. Raises `DeadlineReached` at the deadline."""
        report(tracker)
        last_news = last_poll = time.monotonic()
        unknown_since: float | None = None
        failures = 0

        def next_poll() -> float:
            # Other prompts' messages are no news of this one: ask when it has been quiet.
            # `executing` with no node ends a prompt, and servers from before
            # `execution_success` (mid 2024) say nothing else: then the history says how.
            at = max(last_news, last_poll) + self.quiet_check_s
            if tracker.done:
                at = min(at, last_poll + min(self.poll_interval_s, 0.5))
            return at

        while not tracker.terminal:
            if client.remaining() <= 0:
                raise DeadlineReached
            events: PromptEvents | None = job.state["events"]
            now = time.monotonic()
            if events is not None:
                try:
                    frame = events.receive(min(client.remaining(), next_poll() - now))
                except WebsocketLost as exc:
                    log.warning(
                        f"comfyui: the websocket of {client.name} dropped ({exc}); following "
                        f"prompt {tracker.prompt_id} by polling"
                    )
                    events.close()
                    job.state["events"] = None
                    job.state["followed_by"].append("polling")
                    continue
                if frame is not None:
                    message = parse_ws(frame)
                    if message is not None and tracker.apply(message):
                        last_news = time.monotonic()
                        unknown_since = None
                        report(tracker)
                if tracker.terminal or time.monotonic() < next_poll():
                    continue
            elif now < last_poll + self.poll_interval_s:
                time.sleep(min(last_poll + self.poll_interval_s - now, max(client.remaining(), 0)))
                continue
            last_poll = time.monotonic()
            try:
                self._poll(client, tracker)
            except TransientRuntimeError as exc:
                failures += 1
                if failures > self.poll_error_tolerance:
                    raise TransientRuntimeError(
                        f"lost contact with prompt {tracker.prompt_id} on {client.name} after "
                        f"{failures} failed polls: {exc}",
                        job_id=tracker.prompt_id,
                    ) from exc
                log.warning(
                    f"comfyui: status poll of prompt {tracker.prompt_id} on {client.name} failed "
                    f"({failures}/{self.poll_error_tolerance} tolerated): {exc}"
                )
                continue
            failures = 0
            if tracker.state is PromptState.UNKNOWN:
                now = time.monotonic()
                unknown_since = unknown_since or now
                if now - unknown_since >= self.lost_grace_s:
                    raise TransientRuntimeError(
                        f"{client.name} lost prompt {tracker.prompt_id}: it is in neither the "
                        "queue nor the history, so the server lost the prompt (restarted?)",
                        job_id=tracker.prompt_id,
                    )
            else:
                unknown_since = None
            report(tracker)

    def _poll(self, client: ComfyClient, tracker: PromptTracker) -> None:
        """Ask `/queue`, then (when it is not there) `/history/{id}`, where the prompt is.

        In this order: a prompt moves from the queue to the history under one lock on the
        server, so one missing from the queue and then from the history really is missing.
        """
        prompt_id = tracker.prompt_id
        what = f"the queue (following prompt {prompt_id})"
        doc = client.json_of(client.exchange("GET", "/queue", what), what, job_id=prompt_id)
        try:
            lane, ahead = queue_place(doc, prompt_id)
        except ValueError as exc:
            raise PermanentRuntimeError(
                f"{client.name} answered {what} with something else: {exc}", job_id=prompt_id
            ) from None
        tracker.apply_queue(lane, ahead)
        if lane is not None:
            return
        entry = self._history(client, prompt_id)
        if entry is not None:
            tracker.apply_history(entry)

    def _history(self, client: ComfyClient, prompt_id: str) -> Any:
        what = f"the history of prompt {prompt_id}"
        path = f"/history/{quote(prompt_id, safe='')}"
        doc = client.json_of(client.exchange("GET", path, what), what, job_id=prompt_id)
        try:
            return history_entry(doc, prompt_id)
        except ValueError as exc:
            raise PermanentRuntimeError(
                f"{client.name} answered {what} with something else: {exc}", job_id=prompt_id
            ) from None

    def _await_history(
        self, client: ComfyClient, tracker: PromptTracker, log: logging.Logger
    ) -> None:
        """The finished prompt's history entry, which ComfyUI writes just after it says so."""
        until = time.monotonic() + self.history_wait_s
        failures = 0
        while True:
            try:
                entry = self._history(client, tracker.prompt_id)
            except TransientRuntimeError:
                failures += 1
                if failures > self.poll_error_tolerance:
                    raise
                entry = None
            if entry is not None:
                tracker.apply_history(entry)
                return
            if time.monotonic() >= until:
                break
            time.sleep(min(0.2, max(0.0, client.remaining())))
            if client.remaining() <= 0:
                raise DeadlineReached
        if tracker.ws_outputs:
            log.warning(
                f"comfyui: prompt {tracker.prompt_id} on {client.name} has no history entry "
                f"{self.history_wait_s:g} s after it finished; using the outputs the websocket "
                "reported"
            )
            return
        raise TransientRuntimeError(
            f"prompt {tracker.prompt_id} on {client.name} finished but its history entry did not "
            f"appear within {self.history_wait_s:g} s",
            job_id=tracker.prompt_id,
        )

    # -- fetch ----------------------------------------------------------------------------------

    def fetch_outputs(
        self, request: StageRequest, job: RuntimeJob, log: logging.Logger
    ) -> StageResult:
        client: ComfyClient = job.state["client"]
        tracker: PromptTracker = job.state["tracker"]
        template = request.stage.template or {}
        prompt_id = tracker.prompt_id
        where = f"{client.name} prompt {prompt_id}"
        if tracker.state is PromptState.INTERRUPTED:
            data = tracker.error or {}
            at = (
                f" at {graph.node_label(template, str(data['node_id']))}"
                if data.get("node_id") in template
                else ""
            )
            # Not by this run (its own cancel comes after the wait): an operator, another client,
            # a server shutting down. The work itself was fine, so another attempt may succeed.
            raise TransientRuntimeError(
                f"{where} was interrupted on the server{at}, not by this run", job_id=prompt_id
            )
        if tracker.state is PromptState.FAILED:
            data = tracker.error or {}
            if not data:
                raise TransientRuntimeError(
                    f"{where} ended in error without saying which node failed", job_id=prompt_id
                )
            cause = describe_execution_error(data, template, client.clean)
            if is_out_of_memory(data):
                raise TransientRuntimeError(f"{where} ran out of memory: {cause}", job_id=prompt_id)
            raise PermanentRuntimeError(f"{where} failed: {cause}", job_id=prompt_id)
        outputs_doc = tracker.history.outputs if tracker.history else tracker.ws_outputs
        try:
            outputs, described = self._download(client, request, job, outputs_doc, log)
        except DeadlineReached:
            raise RuntimeTimeoutError(
                f"the outputs of {where} were not downloaded within the stage timeout",
                job_id=prompt_id,
            ) from None
        metadata: dict[str, Any] = {
            "comfyui_server": client.server,
            "comfyui_prompt_id": prompt_id,
            "comfyui_outputs": described,
            "followed_by": ", then ".join(job.state["followed_by"]),
        }
        if job.state["number"] is not None:
            metadata["comfyui_number"] = job.state["number"]
        if tracker.node_seconds:
            metadata["node_seconds"] = dict(tracker.node_seconds)
        if tracker.cached:
            metadata["cached_nodes"] = sorted(tracker.cached)
        if tracker.started_at is not None:
            metadata["queued_s"] = round(max(0.0, tracker.started_at - job.state["submitted"]), 3)
            if tracker.ended_at is not None:
                metadata["executed_s"] = round(tracker.ended_at - tracker.started_at, 3)
        start_ms = tracker.server_ms.get("execution_start")
        end_ms = tracker.server_ms.get("execution_success")
        if start_ms is not None and end_ms is not None and end_ms >= start_ms:
            metadata["server_execution_s"] = round((end_ms - start_ms) / 1000, 3)
        missing = sorted(set(request.stage.outputs) - set(outputs))
        if missing:
            log.warning(f"comfyui: {where} produced no files for {missing}")
        log.info(
            f"comfyui: {where} succeeded in {time.monotonic() - job.state['started']:.2f} s with "
            f"{sum(len(d['files']) for d in described.values())} file(s) for {sorted(outputs)}"
        )
        return StageResult(outputs=outputs, target=job.target, job_id=prompt_id, metadata=metadata)

    def _download(
        self,
        client: ComfyClient,
        request: StageRequest,
        job: RuntimeJob,
        outputs_doc: dict[str, Any],
        log: logging.Logger,
    ) -> tuple[dict[str, Path | list[Path]], dict[str, Any]]:
        """Every file of every mapped output node, into the workdir under safe local names."""
        template = request.stage.template or {}
        prompt_id = job.job_id
        # Never over an earlier prompt's file (a stage mapped over a set shares its workdir).
        taken = {p.name for p in request.workdir.iterdir()} if request.workdir.is_dir() else set()
        outputs: dict[str, Path | list[Path]] = {}
        described: dict[str, Any] = {}
        for key, node_id in job.state["outputs"].items():
            refs = files_in(outputs_doc.get(node_id))
            described[key] = {
                "node": node_id,
                "class_type": template.get(node_id, {}).get("class_type"),
                "files": [],
            }
            if not refs:
                continue
            fallback = extension_for(request.output_types.get(key, ""))
            paths: list[Path] = []
            for ref in refs:
                local = graph.safe_file_name(ref.filename, fallback, taken)
                final = request.workdir / local
                what = f"the download of {ref.type} file {client.clean(ref.filename)!r}"
                size = client.download(
                    {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type},
                    final,
                    what,
                    self.max_output_bytes,
                    prompt_id,
                )
                paths.append(final)
                described[key]["files"].append(
                    {
                        "filename": client.clean(ref.filename),
                        "subfolder": client.clean(ref.subfolder),
                        "type": ref.type,
                        "size": size,
                        "local": local,
                    }
                )
            outputs[key] = paths[0] if len(paths) == 1 else paths
            log.info(f"comfyui: output {key} of prompt {prompt_id}: {len(paths)} file(s)")
        return outputs, described

    # -- cancel ---------------------------------------------------------------------------------

    def cancel(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> str:
        # A run cancellation (KeyboardInterrupt, Dagster's interrupt), a deadline or a lost
        # server: the prompt must not keep a GPU busy for a run that has given up on it.
        return self._cancel_prompt(request.target, job.state["headers"], job.job_id, log)

    def _cancel_prompt(
        self, target: RuntimeTarget, headers: dict[str, str], prompt_id: str, log: logging.Logger
    ) -> str:
        """Delete the prompt if it is queued, interrupt it if it runs; bounded, never raises.

        A fresh connection, bounded by `cancel_timeout_s` in all: the stage's may have been
        interrupted mid-call. `/interrupt` names the prompt, so a server that has moved on to
        another prompt leaves that one alone (servers older than that field interrupt whatever
        runs, which is why the queue is asked first).
        """
        name = target.name
        opened: list[ComfyClient] = []
        try:
            client = ComfyClient(
                target,
                headers,
                deadline=time.monotonic() + self.cancel_timeout_s,
                request_timeout_s=self.cancel_timeout_s,
                max_answer_bytes=self.max_answer_bytes,
            )
            opened.append(client)

            def place() -> str | None:
                answer = client.exchange("GET", "/queue", "the queue (cancelling)")
                doc = answer.json() if answer.status == 200 else None
                try:
                    return queue_place(doc, prompt_id)[0]
                except ValueError:
                    return "?"  # unreadable: neither delete nor interrupt can be ruled out

            def send(path: str, body: dict[str, Any]) -> None:
                answer = client.exchange("POST", path, f"the cancel ({path})", json=body)
                if answer.status != 200:
                    raise _CancelRefused(f"{path} answered {client.describe(answer)}")

            delete = ("/queue", {"delete": [prompt_id]})
            interrupt = ("/interrupt", {"prompt_id": prompt_id})
            lane = place()
            if lane == "pending":
                send(*delete)
                if place() == "running":  # it started between the two calls
                    send(*interrupt)
                    outcome = f"interrupted prompt {prompt_id} on {name}"
                else:
                    outcome = f"deleted queued prompt {prompt_id} from {name}'s queue"
            elif lane == "running":
                send(*interrupt)
                outcome = f"interrupted prompt {prompt_id} on {name}"
            elif lane is None:
                outcome = f"prompt {prompt_id} was neither queued nor running on {name}"
            else:
                # Where it is cannot be told (the queue did not answer): a delete is harmless,
                # but an interrupt an older server applies to whatever runs could hit another
                # prompt, so it is sent only for a prompt seen running.
                send(*delete)
                outcome = (
                    f"sent a delete for prompt {prompt_id} to {name} (its queue did not say "
                    "where the prompt was)"
                )
        except _CancelRefused as exc:
            log.warning(f"comfyui: cancelling prompt {prompt_id} on {name}: {exc}")
            return f"the cancel of prompt {prompt_id} on {name} was refused ({exc})"
        except Exception as exc:
            log.warning(
                f"comfyui: could not cancel prompt {prompt_id} on {name} ({type(exc).__name__}); "
                "it may still be running there"
            )
            return f"the cancel of prompt {prompt_id} on {name} failed ({type(exc).__name__})"
        finally:
            for client in opened:
                client.close()
        log.info(f"comfyui: {outcome}")
        return outcome

    # -- release --------------------------------------------------------------------------------

    def release(self, job: RuntimeJob) -> None:
        self._close(job.state.get("events"), job.state.get("client"))

    @staticmethod
    def _close(events: PromptEvents | None, client: ComfyClient | None) -> None:
        if events is not None:
            events.close()
        if client is not None:
            client.close()

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
        secrets = endpoint_secrets(target.endpoint, headers)
        client: ComfyClient | None = None

        def latency() -> float:
            return (time.monotonic() - started) * 1000

        try:
            client = ComfyClient(
                target,
                headers,
                deadline=started + self.health_timeout_s,
                request_timeout_s=self.health_timeout_s,
                max_answer_bytes=self.max_answer_bytes,
            )
            stats = client.exchange("GET", "/system_stats", "the health probe")
            if stats.status != 200:
                return HealthReport(
                    healthy=False,
                    detail=f"/system_stats answered {client.describe(stats)}",
                    latency_ms=latency(),
                )
            doc = stats.json()
            if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
                return HealthReport(
                    healthy=False,
                    detail=f"{public_endpoint(target.endpoint)} is not a ComfyUI server (its "
                    "/system_stats has no devices)",
                    latency_ms=latency(),
                )
            queue = client.exchange("GET", "/queue", "the health probe's queue")
            running, pending = queue_counts(client.json_of(queue, "the queue"))
        except DeadlineReached:
            return HealthReport(
                healthy=False,
                detail=f"no answer within {self.health_timeout_s:g} s",
                latency_ms=latency(),
            )
        except RuntimeFailure as exc:
            return HealthReport(healthy=False, detail=str(exc), latency_ms=latency())
        except Exception as exc:
            # Any other failure is an unhealthy target; by type only, as messages may quote URLs.
            return HealthReport(
                healthy=False, detail=f"unreachable ({type(exc).__name__})", latency_ms=latency()
            )
        finally:
            if client is not None:
                client.close()
        system = doc.get("system") if isinstance(doc.get("system"), dict) else {}

        def text(value: Any) -> str | None:
            return scrub(str(value), secrets) if value not in (None, "") else None

        devices = [
            {
                "name": text(device.get("name")),
                "type": text(device.get("type")),
                "vram_total": device.get("vram_total"),
                "vram_free": device.get("vram_free"),
            }
            for device in doc["devices"][:16]
            if isinstance(device, dict)
        ]
        python = text(system.get("python_version"))
        info: dict[str, Any] = {
            "server": public_endpoint(target.endpoint),
            "comfyui_version": text(system.get("comfyui_version")),
            "python_version": python.split()[0] if python else None,
            "pytorch_version": text(system.get("pytorch_version")),
            "devices": devices,
            "device": ", ".join(d["name"] or d["type"] or "?" for d in devices) or None,
            "queue_depth": pending,
            "running": running,
        }
        version = info["comfyui_version"] or "(version unknown)"
        return HealthReport(
            healthy=True,
            detail=f"ComfyUI {version}: {running} running, {pending} queued on "
            f"{info['device'] or 'no device'}",
            latency_ms=latency(),
            info=info,
        )


class _CancelRefused(Exception):
    """The server answered a cancel call with something other than 200."""
