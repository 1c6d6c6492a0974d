"""The FFmpeg runtime adapter."""

from __future__ import annotations

import logging
import time

from pydantic import Field

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.media.process import run_process
from ergot_dagster.resources.ffmpeg import recipes  # noqa: F401  (registers the recipes)
from ergot_dagster.resources.ffmpeg.recipe import (
    RecipeContext,
    ffmpeg_available,
    get_recipe,
    recipe_names,
)
from ergot_dagster.resources.runtime import (
    HealthReport,
    RuntimeAdapter,
    StageRequest,
    StageResult,
    register_runtime,
)
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec


@register_runtime
class FFmpegRuntime(RuntimeAdapter):
    """Runs FFmpeg recipes (poster, qc, proxy, frame sampling, ...) with ffmpeg on this node.

    The stage's `operation` names the recipe. Each ffmpeg process is bounded by the stage timeout
    and killed with its process group on timeout or run cancellation; its pid is the job id.
    """

    runtime_type = "ffmpeg"
    ffmpeg_path: str = Field(default="ffmpeg", description="ffmpeg binary (name on PATH or path)")
    threads: int = Field(default=0, ge=0, description="-threads for ffmpeg; 0 lets ffmpeg choose")

    def run_stage(self, request: StageRequest, log: logging.Logger) -> StageResult:
        operation = request.stage.operation
        if operation is None:
            raise PermanentRuntimeError(f"stage {request.stage.id!r} names no ffmpeg recipe")
        binary = ffmpeg_available(self.ffmpeg_path)
        if binary is None:
            raise PermanentRuntimeError(f"ffmpeg binary {self.ffmpeg_path!r} is not installed")
        recipe = get_recipe(operation)
        request.workdir.mkdir(parents=True, exist_ok=True)
        context = RecipeContext(
            inputs=request.inputs,
            params=request.params,
            workdir=request.workdir,
            deadline=time.monotonic() + request.timeout_s,
            log=log,
            ffmpeg_path=binary,
            threads=self.threads,
            progress=request.progress,
        )
        output = recipe(context)
        return StageResult(
            outputs=output.outputs,
            target=request.target.name,
            job_id=f"pid:{context.pids[-1]}" if context.pids else None,
            metadata={"ffmpeg_pids": context.pids, **output.metadata},
        )

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        if stage.template is not None:
            raise ValueError("ffmpeg stages name a recipe in `operation`, not a `template`")
        if stage.operation not in recipe_names():
            raise ValueError(
                f"ffmpeg has no recipe {stage.operation!r} (known: {', '.join(recipe_names())})"
            )

    def health(self, target: RuntimeTarget) -> HealthReport:
        binary = ffmpeg_available(self.ffmpeg_path)
        if binary is None:
            return HealthReport(healthy=False, detail=f"{self.ffmpeg_path} not found on PATH")
        started = time.monotonic()
        result = run_process(
            [binary, "-hide_banner", "-version"], timeout_s=10, tool="ffmpeg", check=False
        )
        first = result.stdout.decode(errors="replace").splitlines()[:1]
        return HealthReport(
            healthy=result.returncode == 0,
            detail=first[0] if first else "",
            latency_ms=(time.monotonic() - started) * 1000,
            info={"binary": binary},
        )
