#!/usr/bin/env bash
# Lint, the documentation site (mkdocs build --strict), and the test suite against real PostgreSQL: everything on
# the embedded PostgreSQL 18 (or KPI_TEST_DSN), then the tests whose SQL differs between majors again on
# PostgreSQL 16 and 15 (fresh clusters, devkit.cluster): the SQL is what differs between majors, the Airflow
# wiring is not. The tests that run a whole Airflow (scheduler, triggerer, api-server, Celery workers, the
# browser) spend most of their time waiting for it: they run beside the main pass, in pytest processes of their
# own (each its own embedded PostgreSQL, Airflow home and ports).
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/system-deps.sh
.venv/bin/ruff check .
# The documentation site, strict: a broken link or anchor fails it (built into a temporary folder, no site/ left).
docs_site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$docs_site"
rm -rf "$docs_site"
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q --durations=12 "$@"
fi
# The tests that run a whole Airflow, in two lanes of about equal length, each followed by one major's pass.
BROWSER_AIRFLOW=(tests/test_ui.py)
SCHEDULER_AIRFLOW=(tests/test_fleet_scheduler.py tests/test_fleet_celery.py tests/test_approvers.py tests/test_all_keys.py)
PER_MAJOR=(tests/test_steps.py tests/test_restore.py tests/test_declared_keys.py tests/test_composite_keys.py
  tests/test_partitioned_keys.py tests/test_orphan_delete.py tests/test_key_definition.py tests/test_declare.py
  tests/test_record_privileges.py tests/test_restore_exact.py)
logs=$(mktemp -d)
# Beside the main pass, two lanes: whole-Airflow tests (mostly waiting on the scheduler), then one major's pass
# (its own cluster). Each ends about when the main pass does.
lane() {  # lane NAME MAJOR TESTS...
  local name=$1 major=$2 status=0
  shift 2
  local cache="$logs/$name-cache"
  if ! .venv/bin/python -m pytest -q -o cache_dir="$cache" --durations=5 "$@" > "$logs/$name.log" 2>&1; then
    # A whole Airflow sharing two cores with the rest of the suite: a test that lost a race with the scheduler or
    # a slow api-server is run once more (its first failure stays in the log, above the second try).
    echo "--- the failed tests of this lane, tried once more" >> "$logs/$name.log"
    .venv/bin/python -m pytest -q -o cache_dir="$cache" --last-failed "$@" >> "$logs/$name.log" 2>&1 || status=1
  fi
  if [ -z "${KPI_TEST_DSN:-}" ]; then
    KPI_TEST_PG=$major .venv/bin/python -m pytest -q -p no:cacheprovider "${PER_MAJOR[@]}" > "$logs/$major.log" 2>&1 \
      || status=1
  fi
  return $status
}
lane browser 16 "${BROWSER_AIRFLOW[@]}" &
browser_lane=$!
lane scheduler 15 "${SCHEDULER_AIRFLOW[@]}" &
scheduler_lane=$!
status=0
ignored=("${BROWSER_AIRFLOW[@]/#/--ignore=}" "${SCHEDULER_AIRFLOW[@]/#/--ignore=}")
.venv/bin/python -m pytest -q --durations=12 "${ignored[@]}" || status=1
wait $browser_lane || status=1
wait $scheduler_lane || status=1
for name in browser scheduler; do
  echo "--- the tests that run a whole Airflow ($name lane)" >&2
  cat "$logs/$name.log"
done
for major in 16 15; do
  if [ -f "$logs/$major.log" ]; then
    echo "--- the tests whose SQL differs between majors, on PostgreSQL $major" >&2
    cat "$logs/$major.log"
  fi
done
rm -rf "$logs"
exit $status
