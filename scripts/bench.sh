#!/usr/bin/env bash
# Benchmarks: app impact against the naive migration, cost against the floor, NOT IN, Airflow overhead,
# scaling. Prints a Markdown report and writes bench/results/latest.json.
#   scripts/bench.sh [--sizes 100000,1000000,5000000] [--not-in-cap 60]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m bench.run "$@"
