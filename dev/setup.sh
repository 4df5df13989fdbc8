#!/usr/bin/env bash
# Set up the environment: uv (from PyPI if missing), then the locked dependencies and the Rust
# tokenizer extension (built by maturin) into .venv. Safe to re-run; fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# rustbpe is Rust. Without cargo, maturin (>= 1.8.4, the build backend) fetches a private toolchain
# itself (the puccinialin package, into ~/.cache/puccinialin), unless MATURIN_NO_INSTALL_RUST is set
if ! command -v cargo >/dev/null 2>&1; then
    if [ -n "${MATURIN_NO_INSTALL_RUST:-}" ]; then
        echo 'error: no cargo and MATURIN_NO_INSTALL_RUST is set: install Rust with `curl https://sh.rustup.rs -sSf | sh -s -- -y` then `. "$HOME/.cargo/env"` (or unset MATURIN_NO_INSTALL_RUST)' >&2
        exit 1
    fi
    echo "no cargo: maturin will download a Rust toolchain to build rustbpe (needs internet, a few minutes, once)"
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
