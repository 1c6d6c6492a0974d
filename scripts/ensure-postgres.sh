#!/usr/bin/env bash
# Start the machine's PostgreSQL cluster if it is installed and not running (used by the tests).
set -uo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ ! -d /etc/postgresql ]; then
  echo "PostgreSQL is not installed; PostgreSQL tests will be skipped" >&2
  exit 0
fi
version=$(ls /etc/postgresql | sort -V | tail -n1)
if ! pg_lsclusters --no-header 2>/dev/null | awk -v v="$version" '$1==v && $2=="main" {print $4}' | grep -q online; then
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
