"""The command line of a local engine worker: a child process that runs one job file.

Adapters that keep a heavy engine out of the run worker (faces with dlib, reconstruction with
pycolmap) start `python -m <worker module> JOB.json`. The worker reports a failure it understood as
one line on stderr, `<prefix>{"message": ..., "permanent": ...}`, and exits with `EXIT_ERROR`;
anything else (a crash, a signal) is for the adapter to judge from the exit status.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

EXIT_ERROR = 2

Job = TypeVar("Job", bound=BaseModel)


class WorkerFailure(Exception):
    """A failure to report to the adapter; `permanent` says whether trying again could help."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


def run_job_file(
    argv: list[str],
    job_model: type[Job],
    run: Callable[[Job], None],
    *,
    error_prefix: str,
    prog: str,
) -> int:
    """Read the job file named in `argv`, run it, and return the worker's exit status."""
    if len(argv) != 1:
        print(f"usage: python -m {prog} JOB.json", file=sys.stderr)
        return EXIT_ERROR
    try:
        try:
            job = job_model.model_validate_json(Path(argv[0]).read_bytes())
        except (OSError, ValueError) as exc:
            # The adapter wrote the job, so this is a bug rather than bad input: not retryable.
            raise WorkerFailure(f"the worker job cannot be read: {exc}") from exc
        run(job)
    except WorkerFailure as exc:
        failure = {"message": str(exc), "permanent": exc.permanent}
        print(error_prefix + json.dumps(failure), file=sys.stderr, flush=True)
        return EXIT_ERROR
    return 0
