"""The engine's worker process: `python -m ergot_dagster.resources.reconstruction.worker JOB`.

The adapter starts it in its own process group for each stage, so that a cancelled run or a passed
deadline kills COLMAP at once (its C++ loops cannot be stopped from a thread of the run worker).
JOB is a JSON file (`WorkerJob`). The worker prepares the images, runs features, matching and
mapping, keeps the largest model and writes the stage's files (`OUTPUT_FILES`) under `outputs`.
Progress goes to stdout, one JSON object a line (`{"fraction": 0.35, "message": "..."}`).

A failure the worker understands ends it with status 2 and a last stderr line
`ergot-sparse-error: {"message": ..., "permanent": true}`; anything else is a traceback and
status 1. COLMAP's own log goes to stderr too.
"""

from __future__ import annotations

import json
import statistics
import sys

from ergot_dagster.resources.reconstruction.model import WorkerJob
from ergot_dagster.resources.reconstruction.prepare import PrepareError, prepare_images
from ergot_dagster.resources.worker_cli import WorkerFailure, run_job_file

ERROR_PREFIX = "ergot-sparse-error: "


def report(fraction: float, message: str) -> None:
    """One progress line for the adapter."""
    print(json.dumps({"fraction": round(fraction, 4), "message": message}), flush=True)


def _too_few(job: WorkerJob, registered: int, keypoints: dict[str, int], pairs: int) -> str:
    total = len(job.images)
    needed = job.params.needed(total)
    median = statistics.median(keypoints.values()) if keypoints else 0
    return (
        f"only {registered} of {total} images registered; at least {needed} are needed "
        f"(min_registered_images {job.params.min_registered_images}, min_registered_fraction "
        f"{job.params.min_registered_fraction:g}). The images had a median of {median:g} "
        f"features and {pairs} geometrically verified image pairs: the set needs a textured scene "
        "seen from several distinct viewpoints"
    )


def run(job: WorkerJob) -> None:
    """Reconstruct the job's images and write the outputs, or raise `WorkerFailure`."""
    image_dir = job.workdir / "images"
    mask_dir = job.workdir / "masks"
    report(0.0, f"preparing {len(job.images)} images")
    try:
        prepared = prepare_images(job.images, image_dir, mask_dir)
    except PrepareError as exc:
        raise WorkerFailure(str(exc)) from exc
    # Imported here so that a job that fails on its images does not pay for loading COLMAP.
    try:
        from ergot_dagster.resources.reconstruction.engine import reconstruct
        from ergot_dagster.resources.reconstruction.outputs import build_document, write_outputs
    except ImportError as exc:
        raise WorkerFailure(f"the COLMAP engine cannot be loaded: {exc}") from exc
    masked = any(image.masked for image in prepared)
    result = reconstruct(
        prepared,
        image_dir,
        mask_dir if masked else None,
        job.params,
        job.options,
        job.workdir,
        report,
    )
    best = result.models[0] if result.models else None
    registered = best.num_reg_images() if best is not None else 0
    if best is None or registered < job.params.needed(len(job.images)):
        raise WorkerFailure(_too_few(job, registered, result.keypoints, result.verified_pairs))
    report(0.95, f"{registered} of {len(job.images)} images registered; writing the model")
    document = build_document(
        best,
        prepared,
        keypoints=result.keypoints,
        params=job.params,
        engine={**result.info, "masked_images": sum(image.masked for image in prepared)},
        camera_mode=result.camera_mode,
        models_found=len(result.models),
    )
    write_outputs(best, document, job.outputs, job.workdir)
    report(1.0, f"{document.counts.points} points from {registered} images")


def main(argv: list[str] | None = None) -> int:
    """Run the job file named on the command line; the exit status says how it went."""
    return run_job_file(
        sys.argv[1:] if argv is None else argv,
        WorkerJob,
        run,
        error_prefix=ERROR_PREFIX,
        prog=__spec__.name if __spec__ else "worker",
    )


if __name__ == "__main__":
    raise SystemExit(main())
