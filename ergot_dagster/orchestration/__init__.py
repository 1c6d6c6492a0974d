"""How runs are queued, routed, watched, retried and reported: the plane's use of Dagster's queue,
run launcher, run monitoring and event log."""
