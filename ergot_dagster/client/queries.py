"""The GraphQL documents the client sends: the contract's queries, in one place.

They are plain Dagster GraphQL; `docs/contract/README.md` shows the same documents used with curl.
Nothing here is private to the client: a consumer in another language sends the same text.
"""

METADATA_FRAGMENT = """
fragment Meta on MetadataEntry {
  __typename label
  ... on TextMetadataEntry { text }
  ... on JsonMetadataEntry { jsonString }
  ... on IntMetadataEntry { intValue intRepr }
  ... on FloatMetadataEntry { floatValue }
  ... on BoolMetadataEntry { boolValue }
  ... on UrlMetadataEntry { url }
  ... on PathMetadataEntry { path }
  ... on MarkdownMetadataEntry { mdStr }
}"""

RUN_FIELDS = """
fragment RunFields on Run {
  runId status creationTime startTime endTime parentRunId rootRunId
  tags { key value }
  assetSelection { path }
  assetMaterializations { assetKey { path } partition metadataEntries { ...Meta } }
}"""

RUN = (
    """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { ...RunFields }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}"""
    + RUN_FIELDS
    + METADATA_FRAGMENT
)

RUN_STATE = """
query RunState($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status parentRunId tags { key value } }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}"""

RUNS = (
    """
query Runs($filter: RunsFilter, $cursor: String, $limit: Int) {
  runsOrError(filter: $filter, cursor: $cursor, limit: $limit) {
    __typename
    ... on Runs { results { ...RunFields } }
    ... on InvalidPipelineRunsFilterError { message }
    ... on PythonError { message }
  }
}"""
    + RUN_FIELDS
    + METADATA_FRAGMENT
)

RUN_EVENTS = (
    """
query RunEvents($runId: ID!, $afterCursor: String, $limit: Int) {
  logsForRun(runId: $runId, afterCursor: $afterCursor, limit: $limit) {
    __typename
    ... on EventConnection {
      cursor hasMore
      events {
        __typename
        ... on MessageEvent { runId message timestamp level stepKey eventType }
        ... on DisplayableEvent { metadataEntries { ...Meta } }
        ... on MaterializationEvent { assetKey { path } partition }
        ... on ExecutionStepFailureEvent {
          error { message className }
          failureMetadata { description metadataEntries { ...Meta } }
        }
        ... on RunFailureEvent { error { message className } }
      }
    }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}"""
    + METADATA_FRAGMENT
)

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConflict { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message className }
    ... on Error { message }
  }
}"""

REEXECUTE = """
mutation Retry($params: ReexecutionParams!) {
  launchRunReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConflict { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message className }
    ... on Error { message }
  }
}"""

TERMINATE = """
mutation Terminate($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunSuccess { run { runId status } }
    ... on TerminateRunFailure { message }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
    ... on Error { message }
  }
}"""

ASSET_KEYS = """
query AssetKeys {
  assetNodes { assetKey { path } }
}"""

ASSET_METADATA = (
    """
query AssetMetadata($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) { assetKey { path } metadataEntries { ...Meta } }
}"""
    + METADATA_FRAGMENT
)

SOURCE_RECORD = (
    """
query SourceRecord($partition: String!) {
  assetOrError(assetKey: {path: ["ergot", "source"]}) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: [$partition], limit: 1) {
        runId timestamp metadataEntries { ...Meta }
      }
    }
    ... on AssetNotFoundError { message }
  }
}"""
    + METADATA_FRAGMENT
)

ASSET_MATERIALIZATIONS = (
    """
query AssetMaterializations($key: AssetKeyInput!, $partitions: [String!], $limit: Int) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: $partitions, limit: $limit) {
        runId timestamp partition metadataEntries { ...Meta }
      }
    }
    ... on AssetNotFoundError { message }
  }
}"""
    + METADATA_FRAGMENT
)

RUNTIME_TARGETS = (
    """
query RuntimeTargets($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    metadataEntries { ...Meta }
    assetObservations(limit: 1) { timestamp metadataEntries { ...Meta } }
  }
}"""
    + METADATA_FRAGMENT
)

ADD_PARTITION = """
mutation AddPartition(
  $selector: RepositorySelector!, $partitionsDefName: String!, $partitionKey: String!
) {
  addDynamicPartition(
    repositorySelector: $selector
    partitionsDefName: $partitionsDefName
    partitionKey: $partitionKey
  ) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionsDefName partitionKey }
    ... on DuplicateDynamicPartitionError { partitionsDefName partitionName }
    ... on UnauthorizedError { message }
    ... on PythonError { message }
  }
}"""
