#!/usr/bin/env bash
# Runs the whole test suite. Installs what it needs on a fresh machine: a Python
# virtualenv in .venv with the official `openai` package, used by the real-client test.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENAI_VERSION=3.57.0
if ! .venv/bin/python -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
    echo "test.sh: creating .venv with openai==$OPENAI_VERSION" >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
fi

cargo test --all-targets "$@"
