#!/usr/bin/env bash
# Debian packages the test suite uses: chromium (the trigger-form browser test, driven by Playwright with
# executable_path, no browser download), docker-compose (validating docker-compose.yml; no engine runs),
# postgresql-15 (the step and DAG tests on PostgreSQL 15), pgbouncer (the connection-pooler tests) and redis-server
# (the broker of the CeleryExecutor fleet test and benchmark).
# Installs them when missing and running as root; otherwise says which tests will fail for want of them.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
[ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing ${missing[*]} from Debian's packages..." >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    echo "WARNING: could not install ${missing[*]}; the tests that need them will fail." >&2
  fi
else
  echo "Not root: ${missing[*]} missing, the tests that need them will fail." >&2
fi
