"""The face embedding runtime adapter: faces, crops and embeddings of a portrait or a video.

One stage (`operation: embed_faces`) takes one input, `media` (an image, or a video whose frames
are sampled with ffmpeg), and gives `faces` (application/json), `embeddings` (an N x D float32
`.npy`, one unit row per face) and, when there is a face, `crops` (an image set).

The target decides who finds the faces:

- a target with an `endpoint` is an HTTP embedding service (docs/face-embedding-protocol.md): one
  `POST /v1/faces:embed` per picture, with the target's credential;
- a target without one runs the local engine named in its `options` (`engine: dlib`, `model`,
  `upsample`, `min_score`, `jitters`) in a worker process of its own process group, killed at
  once when the run is cancelled or the stage deadline passes.

Both answer in the protocol's shape and go through the same output writer, so the files do not
depend on where the faces were found. No answer is retried here: errors are classified
(transient or permanent) and the plane's step retries decide.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import Field, ValidationError

from ergot_dagster.errors import PermanentRuntimeError, RuntimeFailure, TransientRuntimeError
from ergot_dagster.media.process import stderr_tail
from ergot_dagster.resources.face_embedding.model import (
    OPERATION,
    EmbedAnswer,
    LocalOptions,
    parse_params,
    problems,
)
from ergot_dagster.resources.face_embedding.wire import (
    HEALTH_PATH,
    EmbedSession,
    SessionDeadline,
    auth_headers,
    remote_options,
    scrub,
    secrets_of,
)
from ergot_dagster.resources.ffmpeg.recipe import ffmpeg_available
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

# numpy and Pillow (frames, outputs, worker, engine) are imported where a face job needs them: a
# run of another workflow loads this module with the code location and should not pay for them.
if TYPE_CHECKING:
    from ergot_dagster.resources.face_embedding.frames import PreparedInput

WORKER_MODULE = "ergot_dagster.resources.face_embedding.worker"
INPUT_NAME = "media"


def _local_options(target: RuntimeTarget) -> LocalOptions:
    try:
        return LocalOptions.model_validate(target.options)
    except ValidationError as exc:
        raise PermanentRuntimeError(
            f"target {target.name}: invalid options for the local face engine: {problems(exc)}"
        ) from None


def _the_input(request: StageRequest) -> StageFile:
    bound = request.inputs.get(INPUT_NAME)
    if bound is None:
        given = ", ".join(sorted(request.inputs)) or "none"
        raise PermanentRuntimeError(
            f"stage {request.stage.id!r}: {OPERATION} takes one input named {INPUT_NAME!r} "
            f"(given: {given})"
        )
    if isinstance(bound, list):
        if len(bound) != 1:
            raise PermanentRuntimeError(
                f"stage {request.stage.id!r}: input {INPUT_NAME!r} must be one image or video, "
                f"not a set of {len(bound)}"
            )
        return bound[0]
    return bound


def _report_frame(request: StageRequest, done: int, total: int, faces: int) -> None:
    request.progress(done / total, f"picture {done} of {total}: {faces} face(s)")


@register_runtime
class FaceEmbeddingRuntime(JobRuntime):
    """Finds faces in a portrait or a video and gives each its box, landmarks, embedding and crop.

    A target with an `endpoint` is an embedding service (docs/face-embedding-protocol.md; its
    credential from `auth`, never logged); one without runs the local dlib engine in a worker
    process, whose pid is the job id and which is killed with its process group when the run is
    cancelled or the stage outlives its timeout.
    """

    runtime_type = "face_embedding"
    python: str = Field(
        default="", description="interpreter that runs the local worker; empty: this process's"
    )
    ffmpeg_path: str = Field(default="ffmpeg", description="ffmpeg that samples video frames")
    poll_interval_s: float = Field(
        default=0.1, gt=0, description="seconds between two looks at the local worker"
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="bound on each call to an embedding service"
    )
    health_timeout_s: float = Field(default=5.0, gt=0, description="bound on a health probe")

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        if stage.template is not None or stage.operation != OPERATION:
            raise ValueError(
                f"face_embedding stages name operation {OPERATION!r} (not {stage.operation!r})"
            )
        unknown = set(stage.inputs) - {INPUT_NAME}
        if unknown:
            raise ValueError(
                f"face_embedding stages take one input, {INPUT_NAME!r}; not {sorted(unknown)}"
            )

    # -- submit -----------------------------------------------------------------------------------

    def submit(self, request: StageRequest, log: logging.Logger) -> RuntimeJob:
        target = request.target
        started = time.monotonic()
        deadline = started + request.timeout_s
        params = parse_params(request.params)
        media = _the_input(request)
        # Checked before any work, so a misconfigured target fails without sampling a video.
        headers: dict[str, str] = {}
        if target.endpoint:
            options: Any = remote_options(target)
            headers = auth_headers(target)
        else:
            options = _local_options(target)
        binary = ffmpeg_available(self.ffmpeg_path)
        if binary is None and not media.media_type.startswith("image/"):
            raise PermanentRuntimeError(f"ffmpeg binary {self.ffmpeg_path!r} is not installed")
        from ergot_dagster.resources.face_embedding.frames import prepare

        prepared = prepare(
            media,
            params,
            request.workdir,
            deadline=deadline,
            log=log,
            ffmpeg_path=binary or self.ffmpeg_path,
        )
        state: dict[str, Any] = {"params": params, "prepared": prepared, "started": started}
        if target.endpoint:
            session = EmbedSession(
                target, headers, deadline=deadline, request_timeout_s=self.request_timeout_s
            )
            state.update(mode="remote", session=session, options=options)
            job_id = f"faces-{uuid.uuid4().hex[:16]}"
            log.info(
                f"face_embedding: {len(prepared.frames)} picture(s) of {prepared.name} for "
                f"{target.name} (request ids {job_id}-N)"
            )
        else:
            state.update(mode="local", options=options)
            job_id = self._start_worker(request, prepared, options, params.max_faces, state)
            log.info(
                f"face_embedding: local dlib worker {job_id} on {len(prepared.frames)} "
                f"picture(s) of {prepared.name}"
            )
        return RuntimeJob(job_id=job_id, target=target.name, deadline=deadline, state=state)

    def _start_worker(
        self,
        request: StageRequest,
        prepared: PreparedInput,
        options: LocalOptions,
        max_faces: int,
        state: dict[str, Any],
    ) -> str:
        from ergot_dagster.resources.face_embedding.worker import WorkerFrame, WorkerJob

        workdir = request.workdir
        params = state["params"]
        job = WorkerJob(
            frames=[
                # The smallest face in the analysed copy's pixels; never below one pixel.
                WorkerFrame(path=f.detect, min_face_px=max(1.0, params.min_face_px * f.scale))
                for f in prepared.frames
            ],
            options=options,
            max_faces=max_faces,
            output=workdir / "worker_answers.json",
        )
        job_file = workdir / "worker_job.json"
        job_file.write_text(job.model_dump_json(), encoding="utf-8")
        progress_file = workdir / "worker_progress.jsonl"
        errors_file = workdir / "worker_stderr.txt"
        stdout: IO[bytes] = open(progress_file, "wb")  # noqa: SIM115  (closed in release)
        stderr: IO[bytes] = open(errors_file, "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [self.python or sys.executable, "-m", WORKER_MODULE, str(job_file)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=workdir,
                # Its own process group: a cancel kills the worker and anything it started.
                start_new_session=True,
            )
        except OSError as exc:
            stdout.close()
            stderr.close()
            raise PermanentRuntimeError(
                f"the face worker cannot be started with {self.python or sys.executable}: "
                f"{type(exc).__name__}"
            ) from exc
        state.update(
            proc=proc,
            handles=(stdout, stderr),
            progress_file=progress_file,
            errors_file=errors_file,
            answers_file=job.output,
            progress_offset=0,
        )
        return f"pid:{proc.pid}"

    # -- wait -------------------------------------------------------------------------------------

    def wait(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> None:
        if job.state["mode"] == "local":
            self._wait_local(request, job)
        else:
            self._wait_remote(request, job, log)

    def _wait_local(self, request: StageRequest, job: RuntimeJob) -> None:
        proc: subprocess.Popen[bytes] = job.state["proc"]
        while True:
            finished = proc.poll() is not None
            self._relay_progress(request, job)
            if finished:
                return
            remaining = job.remaining()
            if remaining <= 0:
                raise DeadlinePassed
            time.sleep(min(self.poll_interval_s, remaining))

    @staticmethod
    def _relay_progress(request: StageRequest, job: RuntimeJob) -> None:
        """Pass on the complete progress lines the worker wrote since the last look."""
        with open(job.state["progress_file"], "rb") as handle:
            handle.seek(job.state["progress_offset"])
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        job.state["progress_offset"] += len(complete)
        for line in complete.splitlines():
            try:
                report = json.loads(line)
                _report_frame(
                    request, int(report["done"]), int(report["total"]), int(report["faces"])
                )
            except (ValueError, KeyError, TypeError, ZeroDivisionError):
                continue  # not a progress line (a library printing to stdout)

    def _wait_remote(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> None:
        session: EmbedSession = job.state["session"]
        prepared: PreparedInput = job.state["prepared"]
        params = job.state["params"]
        expect = job.state["options"]
        answers: list[EmbedAnswer] = []
        total = len(prepared.frames)
        for frame in prepared.frames:
            options: dict[str, Any] = {
                "min_face_px": round(max(1.0, params.min_face_px * frame.scale), 2),
                "max_faces": params.max_faces,
                "landmarks": True,
            }
            if expect.model is not None:
                options["model"] = expect.model
            if expect.min_score is not None:
                options["min_score"] = expect.min_score
            what = f"the faces of picture {frame.index + 1} of {total}"
            try:
                answer = session.embed(
                    frame.detect.read_bytes(),
                    frame.detect.name,
                    options,
                    request_id=f"{job.job_id}-{frame.index + 1}",
                    what=what,
                    expect=expect,
                )
            except SessionDeadline:
                raise DeadlinePassed from None
            answers.append(answer)
            _report_frame(request, len(answers), total, len(answer.faces))
        job.state["answers"] = answers
        log.info(f"face_embedding: {job.target} answered for {total} picture(s)")

    # -- outputs ----------------------------------------------------------------------------------

    def fetch_outputs(
        self, request: StageRequest, job: RuntimeJob, log: logging.Logger
    ) -> StageResult:
        from ergot_dagster.resources.face_embedding.outputs import write_outputs

        prepared: PreparedInput = job.state["prepared"]
        if job.state["mode"] == "local":
            answers, engine_info = self._local_answers(job)
            engine: dict[str, Any] = {"kind": "local", "target": job.target, **engine_info}
            who = f"the local engine of {job.target}"
        else:
            answers = job.state["answers"]
            engine = {"kind": "remote", "target": job.target, "service_model": answers[0].model}
            who = job.target
        written = write_outputs(
            prepared,
            answers,
            job.state["params"],
            engine=engine,
            who=who,
            workdir=request.workdir,
            crops_type=request.output_types.get("crops"),
        )
        document = written.document
        elapsed = time.monotonic() - job.state["started"]
        log.info(
            f"face_embedding: {document.count} face(s) in {len(document.frames)} picture(s) of "
            f"{prepared.name} on {job.target} in {elapsed:.2f} s"
        )
        return StageResult(
            outputs=written.outputs,
            target=job.target,
            job_id=job.job_id,
            metadata={
                "faces": document.count,
                "pictures": len(document.frames),
                "source_kind": prepared.kind,
                "model": document.model,
                "dims": document.dims,
                "engine": engine,
            },
        )

    def _local_answers(self, job: RuntimeJob) -> tuple[list[EmbedAnswer], dict[str, Any]]:
        from ergot_dagster.resources.face_embedding.worker import ERROR_PREFIX

        proc: subprocess.Popen[bytes] = job.state["proc"]
        pid = proc.pid
        job_id = job.job_id
        if proc.returncode != 0:
            stderr = Path(job.state["errors_file"]).read_text("utf-8", errors="replace")
            reported = [
                line[len(ERROR_PREFIX) :]
                for line in stderr.splitlines()
                if line.startswith(ERROR_PREFIX)
            ]
            if reported:
                try:
                    doc = json.loads(reported[-1])
                    message, permanent = str(doc["message"]), doc.get("permanent") is not False
                except (ValueError, KeyError, TypeError):
                    message, permanent = reported[-1], True
                kind = PermanentRuntimeError if permanent else TransientRuntimeError
                raise kind(f"the face worker (pid {pid}) failed: {message}", job_id=job_id)
            if proc.returncode < 0:
                # Killed by a signal it did not send itself (the OOM killer, an operator).
                raise TransientRuntimeError(
                    f"the face worker (pid {pid}) was killed by signal {-proc.returncode}",
                    job_id=job_id,
                )
            raise PermanentRuntimeError(
                f"the face worker (pid {pid}) exited with status {proc.returncode}: "
                f"{stderr_tail(stderr) or '(no output)'}",
                job_id=job_id,
            )
        try:
            doc = json.loads(Path(job.state["answers_file"]).read_bytes())
            answers = [EmbedAnswer.model_validate(frame) for frame in doc["frames"]]
            engine_info = dict(doc.get("engine") or {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PermanentRuntimeError(
                f"the face worker (pid {pid}) left no readable answer: {type(exc).__name__}",
                job_id=job_id,
            ) from exc
        options: LocalOptions = job.state["options"]
        engine_info.update(upsample=options.upsample, min_score=options.min_score)
        return answers, engine_info

    # -- cancel and release -----------------------------------------------------------------------

    def cancel(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> str:
        if job.state["mode"] == "remote":
            # The protocol is one synchronous call per picture: closing the connection is all
            # there is to cancel, and no further picture is sent.
            with contextlib.suppress(Exception):
                job.state["session"].close()
            log.info(f"face_embedding: stopped sending pictures to {job.target}")
            return f"stopped sending pictures to {job.target}"
        proc: subprocess.Popen[bytes] = job.state["proc"]
        if proc.poll() is not None:
            return f"the face worker (pid {proc.pid}) had already exited"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning(f"face_embedding: worker pid {proc.pid} did not die within 10 s")
            return f"the face worker (pid {proc.pid}) was sent SIGKILL but has not exited yet"
        log.info(f"face_embedding: killed the face worker (pid {proc.pid})")
        return f"killed the face worker (pid {proc.pid})"

    def release(self, job: RuntimeJob) -> None:
        if job.state["mode"] == "remote":
            job.state["session"].close()
            return
        for handle in job.state["handles"]:
            handle.close()

    # -- health -----------------------------------------------------------------------------------

    def health(self, target: RuntimeTarget) -> HealthReport:
        if target.endpoint:
            return self._remote_health(target)
        return self._local_health(target)

    def _local_health(self, target: RuntimeTarget) -> HealthReport:
        """The engine's parts are installed: options valid, dlib, the model files, ffmpeg.

        No model is loaded (that takes seconds and a health probe does no work).
        """
        from ergot_dagster.resources.face_embedding import engine as local_engine

        started = time.monotonic()
        try:
            options = _local_options(target)
        except PermanentRuntimeError as exc:
            return HealthReport(healthy=False, detail=str(exc))
        problems_found = []
        if importlib.util.find_spec("dlib") is None:
            problems_found.append("dlib is not installed (pip install dlib-bin)")
        try:
            files = local_engine.model_files(options.model)
        except FileNotFoundError as exc:
            problems_found.append(str(exc))
            files = {}
        binary = ffmpeg_available(self.ffmpeg_path)
        if binary is None:
            problems_found.append(f"{self.ffmpeg_path} not found, so videos cannot be sampled")
        info = {
            "engine": options.engine,
            "model": local_engine.EMBEDDING_MODEL,
            "dims": local_engine.DIMS,
            "landmarks": local_engine.LANDMARK_MODELS[options.model],
            "device": "cpu",
            "model_files": {name: path.name for name, path in files.items()},
        }
        latency_ms = (time.monotonic() - started) * 1000
        if problems_found:
            return HealthReport(
                healthy=False, detail="; ".join(problems_found), latency_ms=latency_ms, info=info
            )
        return HealthReport(
            healthy=True,
            detail=f"dlib {local_engine.EMBEDDING_MODEL} ({local_engine.DIMS}-d) on cpu",
            latency_ms=latency_ms,
            info=info,
        )

    def _remote_health(self, target: RuntimeTarget) -> HealthReport:
        try:
            expect = remote_options(target)
            headers = auth_headers(target)
        except PermanentRuntimeError as exc:
            return HealthReport(healthy=False, detail=str(exc))
        secrets = secrets_of(headers)
        started = time.monotonic()
        try:
            session = EmbedSession(
                target,
                headers,
                deadline=started + self.health_timeout_s,
                request_timeout_s=self.health_timeout_s,
            )
        except PermanentRuntimeError as exc:
            return HealthReport(healthy=False, detail=str(exc))
        try:
            answer = session.exchange("GET", HEALTH_PATH, "the health probe")
        except Exception as exc:
            # Any failure is an unhealthy target. The plane's own errors name the cause without
            # the URL; anything else is named by its type alone, as messages may quote the URL.
            if isinstance(exc, RuntimeFailure):
                detail = str(exc)
            elif isinstance(exc, SessionDeadline):
                detail = f"no answer within {self.health_timeout_s:g} s"
            else:
                detail = f"unreachable ({type(exc).__name__})"
            return HealthReport(
                healthy=False, detail=detail, latency_ms=(time.monotonic() - started) * 1000
            )
        finally:
            session.close()
        latency_ms = (time.monotonic() - started) * 1000
        if answer.status != 200:
            return HealthReport(
                healthy=False,
                detail=f"{HEALTH_PATH} answered {answer.describe(secrets)}",
                latency_ms=latency_ms,
            )
        doc = answer.json_object()
        if doc is None:
            return HealthReport(
                healthy=False, detail=f"{HEALTH_PATH} did not answer JSON", latency_ms=latency_ms
            )
        keys = ("status", "model", "dims", "device", "queue_depth", "running")
        info = {key: doc.get(key) for key in keys}
        status = scrub(str(doc.get("status") or "unknown"), secrets)
        model = scrub(str(doc.get("model") or "unknown model"), secrets)
        detail = f"{status}: {model} ({info['dims']}-d) on {scrub(str(info['device']), secrets)}"
        healthy = status == "ok"
        if expect.model is not None and doc.get("model") != expect.model:
            healthy, detail = False, f"serves {model}, but the target expects {expect.model}"
        elif expect.dims is not None and doc.get("dims") != expect.dims:
            healthy = False
            detail = f"serves {info['dims']}-d embeddings, but the target expects {expect.dims}-d"
        return HealthReport(healthy=healthy, detail=detail, latency_ms=latency_ms, info=info)
