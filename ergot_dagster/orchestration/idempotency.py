"""One run per request id.

Every run is submitted through the run coordinator, whatever started it (the client over GraphQL,
the UI, a sensor). A request's first run is the run carrying its request id that is not a retry,
with the lowest storage id; a later duplicate is removed at submission and the first run returned
in its place, so every submitter of that request id gets the same run. The launcher checks again
just before starting a run, for two submissions so close that neither could see the other yet.
"""

from __future__ import annotations

from dagster import DagsterInstance, RunsFilter
from dagster._core.storage.dagster_run import DagsterRun

from ergot_dagster.orchestration import tags as T


def first_run_of_request(instance: DagsterInstance, request_id: str) -> DagsterRun | None:
    """The run a request id was first accepted as (retries of it are not counted)."""
    records = instance.get_run_records(RunsFilter(tags={T.REQUEST_ID: request_id}), ascending=True)
    for record in records:
        if not record.dagster_run.parent_run_id:
            return record.dagster_run
    return None


def duplicate_of(instance: DagsterInstance, run: DagsterRun) -> DagsterRun | None:
    """The request's first run, if `run` is a later submission of the same request id."""
    request_id = run.tags.get(T.REQUEST_ID)
    if not request_id or run.parent_run_id:
        return None
    first = first_run_of_request(instance, request_id)
    if first is None or first.run_id == run.run_id:
        return None
    return first


def same_request(a: DagsterRun, b: DagsterRun) -> bool:
    return a.tags.get(T.REQUEST_SHA256) == b.tags.get(T.REQUEST_SHA256)
