#!/usr/bin/env bash
# Benchmarks: app impact against the naive migration, cost against the floor, NOT IN, Airflow overhead,
# scaling. Prints a Markdown report and writes bench/results/latest.json.
#   scripts/bench.sh [--sizes 1000000,10000000] [--hot-lock-rows 100000] [--memory-orphans 100000,1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m bench.run "$@"
