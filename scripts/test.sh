#!/usr/bin/env bash
# Runs the whole test suite. Installs what it needs on a fresh machine: a Python
# virtualenv in .venv with the pinned packages of tests/python/requirements.txt (the
# official `openai` package, grpcio with reflection, grpcurl), used by the real-client tests,
# and Postgres from Debian's packages for the shared-store tests (the tests start a private
# server of their own; nothing is installed when it is there already).
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

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    echo "test.sh: installing postgresql (apt-get)" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: Postgres is missing and installing it needs root: apt-get install postgresql" >&2
        exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
fi

cargo test --all-targets "$@"
# The store-agnostic suites again, with the books in Postgres instead of sled.
STEP3_TEST_STORE=shared cargo test --test it "$@" -- \
    admin:: apis:: billing:: books:: chat:: errors:: grpc:: grpc_admin::
