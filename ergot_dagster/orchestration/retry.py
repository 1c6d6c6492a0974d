"""The step retry policy: transient runtime failures are tried again with backoff.

Only failures the plane marks transient (`Failure(allow_retries=True)`: connection refused,
timeouts, HTTP 5xx/429) are retried; permanent ones (bad media, a 4xx naming the input) fail at
once. A crashed run worker is a different matter, handled by run retries (`dagster/max_retries`).
"""

from __future__ import annotations

import os

from dagster import Backoff, Jitter, RetryPolicy


def step_retry_policy() -> RetryPolicy:
    """3 retries, 2 s then doubling, with jitter; `ERGOT_STEP_RETRIES` / `_DELAY_S` override."""
    return RetryPolicy(
        max_retries=int(os.environ.get("ERGOT_STEP_RETRIES", "3")),
        delay=float(os.environ.get("ERGOT_STEP_RETRY_DELAY_S", "2")),
        backoff=Backoff.EXPONENTIAL,
        jitter=Jitter.PLUS_MINUS,
    )
