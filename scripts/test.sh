#!/usr/bin/env bash
# Runs the whole test suite. Installs what it needs on a fresh machine: a Python
# virtualenv in .venv with the pinned packages of tests/python/requirements.txt (the
# official `openai` package, grpcio with reflection, grpcurl), used by the real-client tests,
# Postgres and Redis from Debian's packages for the shared-store tests, and Chromium and
# its WebDriver for the console's browser tests (the tests start
# private servers of their own; nothing is installed when it is there already).
set -euo pipefail
cd "$(dirname "$0")/.."

REQUIREMENTS=tests/python/requirements.txt
# A copy of the requirements last installed: a changed file means a reinstall.
INSTALLED=.venv/installed-requirements.txt
if ! cmp -s "$REQUIREMENTS" "$INSTALLED" ||
    ! .venv/bin/python -c "import openai, grpc, grpc_reflection, google.protobuf" 2>/dev/null ||
    ! .venv/bin/grpcurl -version >/dev/null 2>&1; then
    echo "test.sh: installing $REQUIREMENTS into .venv" >&2
    python3 -m venv .venv
    rm -f "$INSTALLED"
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    cp "$REQUIREMENTS" "$INSTALLED"
fi

MISSING=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    MISSING+=(postgresql)
fi
command -v redis-server >/dev/null || MISSING+=(redis-server)
# The console's browser tests: headless Chromium driven over WebDriver.
command -v chromium >/dev/null || MISSING+=(chromium)
command -v chromedriver >/dev/null || MISSING+=(chromium-driver)
if [ ${#MISSING[@]} -gt 0 ]; then
    echo "test.sh: installing ${MISSING[*]} (apt-get)" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: installing them needs root: apt-get install ${MISSING[*]}" >&2
        exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${MISSING[@]}"
fi

cargo test --all-targets "$@"
# The store-agnostic suites again, with the books in Postgres and the limits in Redis.
STEP3_TEST_STORE=shared cargo test --test it "$@" -- \
    admin:: apis:: audit:: billing:: books:: cache:: chat:: console:: errors:: grpc:: grpc_admin:: models:: money::
