"""The transcript the transcription runtime writes, and its WebVTT rendering.

One shape whatever the engine: the local faster-whisper worker and OpenAI-style `verbose_json`
answers are both turned into `Transcript` (`schema: ergot.transcript/v1`), documented in
docs/speech-runtimes.md. Times are seconds from the start of the input.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ergot_dagster.errors import PermanentRuntimeError

TRANSCRIPT_SCHEMA = "ergot.transcript/v1"


class TranscriptSegment(BaseModel):
    """A stretch of speech and what was said in it."""

    model_config = ConfigDict(extra="forbid")

    id: int
    start: float = Field(ge=0, description="seconds from the start of the input")
    end: float = Field(ge=0)
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


class Transcript(BaseModel):
    """A whole transcript: the text, its language, its segments, and what made it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(default=TRANSCRIPT_SCHEMA, alias="schema")
    text: str
    language: str | None
    duration: float = Field(ge=0, description="seconds of audio transcribed")
    segments: list[TranscriptSegment]
    engine: str
    model: str
    target: str
    source: str = Field(description="the name of the transcribed file")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def segments_from(raw: Any, duration: float, what: str) -> list[TranscriptSegment]:
    """Segments from a verbose_json-style list; a segment that makes no sense is an error.

    Times are clamped to the audio's duration, since engines round the last end up.
    """
    if not isinstance(raw, list):
        raise PermanentRuntimeError(f"{what} has no list of segments")
    segments: list[TranscriptSegment] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise PermanentRuntimeError(f"{what}: segment {index} is not an object")
        start, end = _number(item.get("start")), _number(item.get("end"))
        text = item.get("text")
        if start is None or end is None or not isinstance(text, str):
            raise PermanentRuntimeError(
                f"{what}: segment {index} lacks a numeric start/end or a text"
            )
        limit = duration if duration > 0 else max(start, end)
        start, end = min(max(0.0, start), limit), min(max(0.0, end), limit)
        if end < start:
            raise PermanentRuntimeError(f"{what}: segment {index} ends before it starts")
        segments.append(
            TranscriptSegment(
                id=len(segments),
                start=round(start, 3),
                end=round(end, 3),
                text=text.strip(),
                avg_logprob=_number(item.get("avg_logprob")),
                no_speech_prob=_number(item.get("no_speech_prob")),
            )
        )
    return segments


def vtt_timestamp(seconds: float) -> str:
    """`HH:MM:SS.mmm`, as WebVTT cue timings are written."""
    millis = round(max(0.0, seconds) * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


def _cue_text(text: str) -> str:
    # Cue text is HTML-like: escape what would start a tag or an entity, and keep "-->" out of it
    # (it would end the cue timing line if a cue ever started with it).
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def to_webvtt(segments: list[TranscriptSegment]) -> str:
    """The segments as a WebVTT file: one numbered cue per segment that says something."""
    lines = ["WEBVTT", ""]
    number = 0
    for segment in segments:
        text = _cue_text(segment.text)
        if not text:
            continue
        number += 1
        # A cue must last: a zero-length one is dropped by some players.
        end = max(segment.end, segment.start + 0.001)
        lines += [
            str(number),
            f"{vtt_timestamp(segment.start)} --> {vtt_timestamp(end)}",
            text,
            "",
        ]
    return "\n".join(lines)
