"""The local engine's worker process: `python -m ergot_dagster.resources.face_embedding.worker JOB`.

The adapter starts it in its own process group for each stage, so that a cancelled run or a passed
deadline kills the dlib work at once (a thread in the run worker could not be stopped). JOB is a
JSON file (`WorkerJob`) naming the prepared frames and the engine options. The worker loads the
engine, analyses the frames in order and writes one protocol answer per frame to `output`
(atomically, so a half-written file is never read). Progress goes to stdout, one JSON object a
line (`{"done": 1, "total": 4, "faces": 1}`).

A failure the worker understands ends it with status 2 and a last stderr line
`ergot-face-error: {"message": ..., "permanent": true}`; anything else is a traceback and status 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ergot_dagster.resources.face_embedding.model import LocalOptions
from ergot_dagster.resources.worker_cli import WorkerFailure, run_job_file

ERROR_PREFIX = "ergot-face-error: "


class WorkerFrame(BaseModel):
    """One prepared picture to analyse, and the smallest face to keep in its pixels."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    min_face_px: float = Field(ge=1)


class WorkerJob(BaseModel):
    """What the adapter asks of one worker run."""

    model_config = ConfigDict(extra="forbid")

    frames: list[WorkerFrame] = Field(min_length=1)
    options: LocalOptions
    max_faces: int = Field(ge=1)
    output: Path


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise WorkerFailure(f"{path.name} cannot be decoded: {exc}") from exc


def run(job: WorkerJob) -> None:
    """Analyse every frame of `job` and write the answers."""
    # Imported here so that `--help`-like failures and job errors do not pay for loading dlib.
    from ergot_dagster.resources.face_embedding.engine import DlibEngine

    try:
        engine = DlibEngine(landmarks=job.options.model)
    except (FileNotFoundError, ImportError, RuntimeError) as exc:
        raise WorkerFailure(f"the dlib engine cannot start: {exc}") from exc
    answers = []
    total = len(job.frames)
    for done, frame in enumerate(job.frames, start=1):
        answer = engine.analyze(
            _load_rgb(frame.path),
            upsample=job.options.upsample,
            min_score=job.options.min_score,
            min_face_px=frame.min_face_px,
            max_faces=job.max_faces,
            jitters=job.options.jitters,
        )
        answers.append(answer)
        print(json.dumps({"done": done, "total": total, "faces": len(answer["faces"])}), flush=True)
    partial = job.output.with_name(f".{job.output.name}.part")
    partial.write_text(json.dumps({"engine": engine.info, "frames": answers}), encoding="utf-8")
    os.replace(partial, job.output)


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
