"""Run tag keys the plane writes and reads. Dagster's own keys are used where they exist."""

REQUEST_ID = "ergot/request_id"
REQUEST = "ergot/request"  # the whole request, canonical JSON: what a consumer gets back
REQUEST_SHA256 = "ergot/request_sha256"
WORKFLOW = "ergot/workflow"  # name@version
WORKFLOW_NAME = "ergot/workflow_name"  # name alone, to list a workflow's runs across versions
SOURCE_REF = "ergot/source_ref"
EXECUTION_TARGET = "ergot/execution_target"
WORKER = "ergot/worker"  # run id@host:pid:start ticks of the process running the step
PROMOTION = "ergot/promotion"  # the library ref a promotion run records

# Dagster's own.
PARTITION = "dagster/partition"
PRIORITY = "dagster/priority"
MAX_RETRIES = "dagster/max_retries"
RETRY_ON_STEP_FAILURE = "dagster/retry_on_asset_or_op_failure"
MAX_RUNTIME = "dagster/max_runtime"
PARENT_RUN_ID = "dagster/parent_run_id"
ROOT_RUN_ID = "dagster/root_run_id"
