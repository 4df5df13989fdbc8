#!/usr/bin/env bash
# The test command: set up the environment (idempotent), then run the whole suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow"` or `-k tokenizer`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
exec .venv/bin/python -m pytest "$@"
