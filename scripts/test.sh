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
  for major in 16 15; do
    echo "--- the step and restore tests on PostgreSQL $major" >&2
    KPI_TEST_PG=$major .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_steps.py tests/test_restore.py tests/test_declared_keys.py
  done
fi
