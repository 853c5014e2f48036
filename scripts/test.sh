#!/usr/bin/env bash
# Set up and run every check: a venv with pgwarden and its dev tools, ruff, mypy, then the test
# suite on both legs: the embedded PostgreSQL 18 and Debian's PostgreSQL 15.
# Usage: bash scripts/test.sh [pytest args…]
set -euo pipefail
cd "$(dirname "$0")/.."

PG15_BIN=/usr/lib/postgresql/15/bin
# As root, PostgreSQL runs as a service user, and with an S3 backup location its
# archive_command runs this venv's Python: an interpreter under /root (pyenv's) is out of that
# user's reach, so the venv is made from the system's Python.
if [ -z "${PYTHON:-}" ]; then
  if [ "$(id -u)" = 0 ] && [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi

# Debian's PostgreSQL 15 for the second leg, with its server headers: setup.py builds the
# compiled capture trigger for every major it finds headers for.
if [ ! -x "$PG15_BIN/postgres" ] || [ ! -f /usr/include/postgresql/15/server/postgres.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing postgresql-15 and its server headers (Debian) for the PostgreSQL 15 leg"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-server-dev-15 >/dev/null
  fi
fi

# Debian's Chromium for the browser tests (Playwright drives it: its own browser download is not
# reachable here).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing chromium (Debian) for the browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
echo "== installing pgwarden and its dev tools into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v -i -E "^\s*$|warning|location .* is ignored" || true

# The compiled trigger's build is optional for users (no compiler: PL/pgSQL capture); here a
# build that failed quietly would leave the tests on one engine, so it must be there.
for major in 18 $([ -f /usr/include/postgresql/15/server/postgres.h ] && echo 15); do
  if [ ! -f "src/pgwarden/native/capture_pg$major.so" ] || \
     [ "src/pgwarden/native/pgwarden_capture.c" -nt "src/pgwarden/native/capture_pg$major.so" ]; then
    echo "the compiled capture trigger for PostgreSQL $major was not built (see: pip install -v -e .)" >&2
    exit 1
  fi
done

# The same for WAL capture's compiled pgoutput decoder (a Python extension; without it the
# consumer decodes in Python, and the test comparing the two would skip).
decoder=$(ls src/pgwarden/native/_pgoutput*.so 2>/dev/null | head -1 || true)
if [ -z "$decoder" ] || [ src/pgwarden/native/pgoutput.c -nt "$decoder" ] || \
   ! .venv/bin/python -c "import pgwarden.native._pgoutput"; then
  echo "the compiled pgoutput decoder was not built (see: pip install -v -e .)" >&2
  exit 1
fi

echo "== ruff check";  .venv/bin/ruff check src tests bench
echo "== ruff format"; .venv/bin/ruff format --check src tests bench
echo "== mypy --strict src/"; .venv/bin/mypy --strict src/

status=0
# The benchmark harness, small, so it never rots (targets are reported, not enforced here: only
# the full run on a quiet machine measures them; a harness error or missing history fails).
echo "== bench --quick"
bench_out=$(mktemp -d)
if ! .venv/bin/python -m bench --quick --out "$bench_out" > "$bench_out/table.md"; then
  echo "bench --quick failed" >&2
  status=1
else
  tail -n 30 "$bench_out/table.md"
fi
rm -rf "$bench_out"

run_leg() {
  local name=$1; shift
  echo "== pytest on $name"
  set +e
  env "$@" .venv/bin/python -m pytest "${PYTEST_ARGS[@]}"
  local rc=$?
  set -e
  if [ $rc -eq 5 ]; then
    # Exit 5 means "no tests collected", e.g. a -k filter that matched nothing on this leg.
    echo "pytest collected no tests on $name (exit 5): nothing to fail" >&2
    rc=0
  fi
  [ $rc -eq 0 ] || status=$rc
}

PYTEST_ARGS=("$@")
run_leg "PostgreSQL 18 (embedded wheel)" -u PGWARDEN_PG_BIN
if [ -x "$PG15_BIN/postgres" ]; then
  run_leg "PostgreSQL 15 (Debian)" PGWARDEN_PG_BIN="$PG15_BIN"
elif [ -n "${CI:-}" ]; then
  echo "PostgreSQL 15 is missing at $PG15_BIN and could not be installed" >&2
  status=1
else
  echo "== skipping the PostgreSQL 15 leg: $PG15_BIN is missing (run as root to install it)"
fi
exit $status
