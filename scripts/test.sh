#!/usr/bin/env bash
# Runs the whole test suite. Installs what it needs on a fresh machine: a Python
# virtualenv in .venv with the pinned packages of tests/python/requirements.txt (the
# official `openai` package, grpcio with reflection, grpcurl), used by the real-client tests.
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

cargo test --all-targets "$@"
