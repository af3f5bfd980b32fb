#!/usr/bin/env bash
# The demo: installs what it needs into .venv, starts an embedded PostgreSQL with generated KPIs, runs the
# DAG end to end with `airflow dags test`, prints the report, stops the server.
#   scripts/demo.sh [--rows 100000] [--orphan-ratio 0.01] [--fleet N]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m devkit.demo "$@"
