"""The runtime adapters the loaded workflows need, as Dagster resources."""

from __future__ import annotations

from ergot_dagster.resources.comfyui.adapter import ComfyUIRuntime
from ergot_dagster.resources.face_embedding.adapter import FaceEmbeddingRuntime
from ergot_dagster.resources.ffmpeg.adapter import FFmpegRuntime
from ergot_dagster.resources.reconstruction.adapter import ReconstructionRuntime
from ergot_dagster.resources.runtime import (
    RuntimeAdapter,
    adapter_class,
    registered_runtimes,
    resource_key,
)
from ergot_dagster.resources.studio.adapter import StudioRuntime
from ergot_dagster.resources.transcription.adapter import TranscriptionRuntime
from ergot_dagster.resources.tts.adapter import TTSRuntime
from ergot_dagster.resources.voice_prompt.adapter import VoicePromptRuntime
from ergot_dagster.workflows.registry import WorkflowRegistry

# Importing an adapter module registers it; list them here so the registry is complete.
BUILTIN_ADAPTERS: tuple[type[RuntimeAdapter], ...] = (
    FFmpegRuntime,
    StudioRuntime,
    FaceEmbeddingRuntime,
    TTSRuntime,
    TranscriptionRuntime,
    VoicePromptRuntime,
    ComfyUIRuntime,
    ReconstructionRuntime,
)


def runtime_resources(registry: WorkflowRegistry) -> dict[str, RuntimeAdapter]:
    """One resource per runtime type used by any loaded workflow (with default configuration)."""
    needed = {s.runtime or d.runtime for d in registry.all() for s in d.plan}
    missing = sorted(needed - set(registered_runtimes()))
    if missing:
        users = sorted(
            d.spec
            for d in registry.all()
            if {s.runtime or d.runtime for s in d.plan} & set(missing)
        )
        raise ValueError(
            f"no runtime adapter for {', '.join(missing)} (used by {', '.join(users)})"
        )
    return {resource_key(runtime): adapter_class(runtime)() for runtime in sorted(needed)}
