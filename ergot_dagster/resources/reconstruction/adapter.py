"""The reconstruction runtime adapter: camera poses and a sparse point cloud from an image set.

One stage (`operation: sparse_reconstruction`) takes one input, `images` (a set of at least two
images, in capture order), and gives `points` (a PLY point cloud), `cameras` (application/json,
format `ergot.sparse/1`) and `model` (COLMAP's binary model, zipped).

Targets are local: `options` name the engine (`engine: colmap`), its CPU `threads` and its
`seed`. The engine runs in a worker process of its own process group (`worker.py`), whose pid is
the job id; it is killed with its group at once when the run is cancelled or the stage outlives
its timeout. A reconstruction that places too few images is a permanent failure saying how many
registered out of how many: the same images would fail again.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import Field, ValidationError

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.resources.reconstruction.model import (
    INPUT_NAME,
    MAX_IMAGES,
    OPERATION,
    OUTPUT_FILES,
    LocalOptions,
    SparseDocument,
    WorkerImage,
    WorkerJob,
    parse_params,
    problems,
)
from ergot_dagster.resources.reconstruction.process import WorkerProcess
from ergot_dagster.resources.runtime import (
    DeadlinePassed,
    HealthReport,
    JobRuntime,
    RuntimeJob,
    StageFile,
    StageRequest,
    StageResult,
    register_runtime,
)
from ergot_dagster.targets.model import RuntimeTarget
from ergot_dagster.workflows.model import StageSpec

# `ply` and `worker` (numpy, Pillow) are imported where a reconstruction needs them: a run of
# another workflow loads this module with the code location and should not pay for them.
WORKER_MODULE = "ergot_dagster.resources.reconstruction.worker"
WHAT = "the reconstruction worker"


def _local_options(target: RuntimeTarget) -> LocalOptions:
    if target.endpoint:
        raise PermanentRuntimeError(
            f"target {target.name}: reconstruction runs on this machine only; remove its endpoint"
        )
    try:
        return LocalOptions.model_validate(target.options)
    except ValidationError as exc:
        raise PermanentRuntimeError(
            f"target {target.name}: invalid options for the reconstruction engine: {problems(exc)}"
        ) from None


def _the_images(request: StageRequest) -> list[StageFile]:
    bound = request.inputs.get(INPUT_NAME)
    if bound is None:
        given = ", ".join(sorted(request.inputs)) or "none"
        raise PermanentRuntimeError(
            f"stage {request.stage.id!r}: {OPERATION} takes one input named {INPUT_NAME!r} "
            f"(given: {given})"
        )
    images = bound if isinstance(bound, list) else [bound]
    if not 2 <= len(images) <= MAX_IMAGES:
        raise PermanentRuntimeError(
            f"input {INPUT_NAME!r} must be a set of 2 to {MAX_IMAGES} images, not {len(images)}"
        )
    for number, image in enumerate(images, start=1):
        if not image.media_type.startswith("image/"):
            raise PermanentRuntimeError(
                f"input {INPUT_NAME!r}: item {number} is {image.media_type}, not an image"
            )
    return images


@register_runtime
class ReconstructionRuntime(JobRuntime):
    """Sparse reconstruction (structure from motion) of an image set with COLMAP on CPU.

    The engine runs in a worker process whose pid is the job id; it is killed with its process
    group when the run is cancelled or the stage outlives its timeout.
    """

    runtime_type = "reconstruction"
    python: str = Field(
        default="", description="interpreter that runs the worker; empty: this process's"
    )
    poll_interval_s: float = Field(
        default=0.2, gt=0, description="seconds between two looks at the worker"
    )

    @classmethod
    def validate_stage(cls, stage: StageSpec) -> None:
        if stage.template is not None or stage.operation != OPERATION:
            raise ValueError(
                f"reconstruction stages name operation {OPERATION!r} (not {stage.operation!r})"
            )
        if set(stage.inputs) != {INPUT_NAME}:
            raise ValueError(
                f"reconstruction stages take one input, {INPUT_NAME!r}; not "
                f"{sorted(stage.inputs) or 'none'}"
            )
        unknown = set(stage.outputs) - set(OUTPUT_FILES)
        if unknown:
            raise ValueError(
                f"reconstruction stages give {sorted(OUTPUT_FILES)}; not {sorted(unknown)}"
            )

    # -- submit -----------------------------------------------------------------------------------

    def submit(self, request: StageRequest, log: logging.Logger) -> RuntimeJob:
        started = time.monotonic()
        params = parse_params(request.params)
        options = _local_options(request.target)
        images = _the_images(request)
        workdir = request.workdir
        job = WorkerJob(
            images=[
                WorkerImage(path=image.path, index=number)
                for number, image in enumerate(images, start=1)
            ],
            params=params,
            options=options,
            workdir=workdir / "engine",
            outputs=workdir / "outputs",
        )
        job.workdir.mkdir(parents=True, exist_ok=True)
        job_file = workdir / "worker_job.json"
        job_file.write_text(job.model_dump_json(), encoding="utf-8")
        worker = WorkerProcess(
            [self.python or sys.executable, "-m", WORKER_MODULE, str(job_file)], workdir, WHAT
        )
        job_id = f"pid:{worker.pid}"
        log.info(
            f"reconstruction: COLMAP worker {job_id} on {len(images)} images "
            f"({params.matcher} matching, {params.camera_model}) for {request.target.name}"
        )
        return RuntimeJob(
            job_id=job_id,
            target=request.target.name,
            deadline=started + request.timeout_s,
            state={"worker": worker, "job": job, "started": started},
        )

    # -- wait -------------------------------------------------------------------------------------

    def wait(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> None:
        worker: WorkerProcess = job.state["worker"]
        while True:
            finished = worker.finished()
            for report in worker.new_reports():
                fraction = report.get("fraction")
                request.progress(
                    float(fraction) if isinstance(fraction, int | float) else None,
                    str(report.get("message", "")),
                )
            if finished:
                return
            remaining = job.remaining()
            if remaining <= 0:
                raise DeadlinePassed
            time.sleep(min(self.poll_interval_s, remaining))

    # -- outputs ----------------------------------------------------------------------------------

    def fetch_outputs(
        self, request: StageRequest, job: RuntimeJob, log: logging.Logger
    ) -> StageResult:
        from ergot_dagster.resources.reconstruction.ply import PlyError, vertex_count
        from ergot_dagster.resources.reconstruction.worker import ERROR_PREFIX

        worker: WorkerProcess = job.state["worker"]
        failure = worker.failure(ERROR_PREFIX, job.job_id)
        if failure is not None:
            raise failure
        work: WorkerJob = job.state["job"]
        outputs = {name: work.outputs / file for name, file in OUTPUT_FILES.items()}
        try:
            document = SparseDocument.model_validate_json(outputs["cameras"].read_bytes())
            points = vertex_count(outputs["points"])
        except (OSError, ValueError, PlyError) as exc:
            raise PermanentRuntimeError(
                f"{WHAT} (pid {worker.pid}) left no readable result: {type(exc).__name__}: "
                f"{str(exc)[:300]}",
                job_id=job.job_id,
            ) from exc
        counts = document.counts
        if points != counts.points:
            raise PermanentRuntimeError(
                f"{WHAT} wrote {points} points to the PLY but {counts.points} in the cameras "
                "document",
                job_id=job.job_id,
            )
        elapsed = time.monotonic() - job.state["started"]
        log.info(
            f"reconstruction: {counts.registered_images} of {counts.input_images} images "
            f"registered, {counts.points} points, reprojection error "
            f"{counts.mean_reprojection_error_px:.3f} px on {job.target} in {elapsed:.1f} s"
        )
        metadata: dict[str, Any] = {
            **counts.model_dump(),
            "camera_mode": document.camera_mode,
            "engine": document.engine,
        }
        return StageResult(
            outputs=dict(outputs),
            target=job.target,
            job_id=job.job_id,
            metadata=metadata,
        )

    # -- cancel and release -----------------------------------------------------------------------

    def cancel(self, request: StageRequest, job: RuntimeJob, log: logging.Logger) -> str:
        outcome = job.state["worker"].kill()
        log.info(f"reconstruction: {outcome}")
        return outcome

    def release(self, job: RuntimeJob) -> None:
        job.state["worker"].close()

    # -- health -----------------------------------------------------------------------------------

    def health(self, target: RuntimeTarget) -> HealthReport:
        """The engine is installed and the target's options are valid; nothing is loaded."""
        started = time.monotonic()
        try:
            options = _local_options(target)
        except PermanentRuntimeError as exc:
            return HealthReport(healthy=False, detail=str(exc))
        info: dict[str, Any] = {
            "engine": options.engine,
            "device": "cpu",
            "threads": options.threads or "all",
        }
        try:
            found = importlib.util.find_spec("pycolmap") is not None
            info["pycolmap"] = version("pycolmap")
        except (PackageNotFoundError, ImportError, ValueError):
            found = False
        latency_ms = (time.monotonic() - started) * 1000
        if not found:
            return HealthReport(
                healthy=False,
                detail="pycolmap is not installed (pip install pycolmap)",
                latency_ms=latency_ms,
                info=info,
            )
        return HealthReport(
            healthy=True,
            detail=f"COLMAP (pycolmap {info['pycolmap']}) on cpu",
            latency_ms=latency_ms,
            info=info,
        )
