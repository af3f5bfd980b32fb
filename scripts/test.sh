#!/usr/bin/env bash
# Lint and the test suite against a real PostgreSQL (embedded unless KPI_TEST_DSN names a server).
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/system-deps.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
