#!/usr/bin/env bash
# A local Airflow UI with this project's DAG and an embedded PostgreSQL holding demo data for kpi_db.
#   scripts/local-airflow.sh [--port 8080] [--rows 100000]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m devkit.local_airflow "$@"
