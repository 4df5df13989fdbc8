#!/usr/bin/env bash
# Set up the environment: uv (from PyPI if missing), then the locked dependencies and the Rust
# tokenizer extension (built by maturin) into .venv. Safe to re-run; fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo (Rust) is needed to build the rustbpe tokenizer trainer: see https://rustup.rs" >&2
    exit 1
fi
if command -v uv >/dev/null 2>&1; then
    UV=uv
else
    echo "uv not found: installing it from PyPI"
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
    UV="python3 -m uv"
fi
# --frozen: install exactly what uv.lock says; never download a Python interpreter (pyproject).
# --compile-bytecode: precompile .pyc once, so every process (tests spawn many) starts fast even
# where PYTHONDONTWRITEBYTECODE is set
$UV sync --frozen --compile-bytecode "$@"
