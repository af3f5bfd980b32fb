#!/usr/bin/env bash
# Lint, the documentation site (mkdocs build --strict), and the test suite against real PostgreSQL: everything on
# the embedded PostgreSQL 18 (or KPI_TEST_DSN), then every step, restore, declared-key, partitioned-key and
# orphan-delete test again on PostgreSQL 16 and 15 (fresh clusters, devkit.cluster):
# the SQL is what differs between majors, the Airflow wiring is not.
# The tests that run a whole Airflow (scheduler, triggerer, api-server, Celery workers, the browser) spend most
# of their time waiting for it: they run beside the others, in a pytest process of their own (its own
# embedded PostgreSQL, Airflow home and ports), and the two majors' passes run beside each other.
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
WHOLE_AIRFLOW=(tests/test_fleet_scheduler.py tests/test_fleet_celery.py tests/test_ui.py tests/test_approvers.py
  tests/test_all_keys.py)
PER_MAJOR=(tests/test_steps.py tests/test_restore.py tests/test_declared_keys.py tests/test_composite_keys.py
  tests/test_partitioned_keys.py tests/test_orphan_delete.py tests/test_key_definition.py tests/test_declare.py
  tests/test_record_privileges.py tests/test_restore_exact.py)
logs=$(mktemp -d)
# Beside the main pass, one after the other: the whole-Airflow tests, then the two majors' passes at once (each its
# own cluster and Airflow home). That lane ends before the main pass does, so it adds nothing to the wall time.
(
  lane=0
  .venv/bin/python -m pytest -q -p no:cacheprovider --durations=5 "${WHOLE_AIRFLOW[@]}" > "$logs/airflow.log" 2>&1 \
    || lane=1
  if [ -z "${KPI_TEST_DSN:-}" ]; then
    pids=()
    for major in 16 15; do
      KPI_TEST_PG=$major .venv/bin/python -m pytest -q -p no:cacheprovider "${PER_MAJOR[@]}" \
        > "$logs/$major.log" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || lane=1; done
  fi
  exit $lane
) &
lane=$!
status=0
.venv/bin/python -m pytest -q --durations=12 "${WHOLE_AIRFLOW[@]/#/--ignore=}" || status=1
wait $lane || status=1
echo "--- the tests that run a whole Airflow (scheduler, Celery workers, the browser)" >&2
cat "$logs/airflow.log"
for major in 16 15; do
  if [ -f "$logs/$major.log" ]; then
    echo "--- the tests whose SQL differs between majors, on PostgreSQL $major" >&2
    cat "$logs/$major.log"
  fi
done
rm -rf "$logs"
exit $status
