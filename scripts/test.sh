#!/usr/bin/env bash
# Lint and the test suite against real PostgreSQL: everything on the embedded PostgreSQL 18 (or KPI_TEST_DSN),
# then every step, restore and declared-key test again on PostgreSQL 16 and 15 (fresh clusters, devkit.cluster): the SQL is
# what differs between majors, the Airflow wiring is not.
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/system-deps.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q --durations=12 "$@"
if [ $# -eq 0 ] && [ -z "${KPI_TEST_DSN:-}" ]; then
  # The two majors' passes at once (each its own cluster and Airflow home), their output one after the other.
  logs=$(mktemp -d)
  for major in 16 15; do
    KPI_TEST_PG=$major .venv/bin/python -m pytest -q -p no:cacheprovider \
      tests/test_steps.py tests/test_restore.py tests/test_declared_keys.py > "$logs/$major.log" 2>&1 &
    echo $! > "$logs/$major.pid"
  done
  failed=0
  for major in 16 15; do
    wait "$(cat "$logs/$major.pid")" || failed=1
    echo "--- the step, restore and declared-key tests on PostgreSQL $major" >&2
    cat "$logs/$major.log"
  done
  rm -rf "$logs"
  exit $failed
fi
