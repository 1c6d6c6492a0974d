"""Step retries: transient runtime failures are tried again, with exponential backoff.

Only failures the plane marks transient (connection refused, timeouts, HTTP 5xx/429) are retried;
permanent ones (bad media, a 4xx naming the input) fail at once. A crashed run worker is a
different matter, handled by run retries (`dagster/max_retries`).

The step raises Dagster's `RetryRequested` itself rather than carrying a `RetryPolicy`: with a
policy, Dagster also turns a run *termination* into a retry, so a cancelled run would start its
step again instead of ending CANCELED.
"""

from __future__ import annotations

import os
import random

from pydantic import BaseModel


class StepRetry(BaseModel):
    """How often and how patiently a transiently failed step is tried again."""

    max_retries: int
    delay_s: float

    @classmethod
    def from_env(cls) -> StepRetry:
        """3 retries, 2 s then doubling; `ERGOT_STEP_RETRIES` / `ERGOT_STEP_RETRY_DELAY_S`."""
        return cls(
            max_retries=int(os.environ.get("ERGOT_STEP_RETRIES", "3")),
            delay_s=float(os.environ.get("ERGOT_STEP_RETRY_DELAY_S", "2")),
        )

    def should_retry(self, retries_so_far: int) -> bool:
        return retries_so_far < self.max_retries

    def delay_for(self, retries_so_far: int) -> float:
        """Seconds before the next attempt: doubling, with ±25 % jitter so retries spread out."""
        base = self.delay_s * (2**retries_so_far)
        return base * random.uniform(0.75, 1.25)
