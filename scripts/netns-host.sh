#!/bin/sh
# A second host on this machine for off-node runs (docs/offnode.md): a network namespace with its
# own host name and mounts, running the project's code location as a Dagster gRPC code server.
#   scripts/netns-host.sh up|status|restart|down [--name N] ...   (as root; --help for options)
# Run it with the plane's environment (ERGOT_STORAGE, ERGOT_INGEST_ROOT, ERGOT_PG_URL, AWS_*).
set -eu
repo=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
exec "$python" "$repo/scripts/netns_host.py" "$@"
