#!/usr/bin/env bash
# Runs every test that needs no GPU: formatting and lints, Rust unit and integration tests
# (which also build and run the header-driven C tests), the C tests and the C++ binding's
# under valgrind, the Go binding's tests, the C examples, and the Python binding's tests.
# Needs: cargo, a C and a C++ compiler, make, valgrind, go (1.19 or newer), python3 with
# numpy, ml_dtypes and pytest (`.ci/run` installs them on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo build --release --quiet
cargo test --release --quiet

echo "== C tests under valgrind"
tests/c/run_valgrind.sh target/release

echo "== C++ binding under valgrind"
bindings/cpp/run_tests.sh target/release

echo "== Go binding"
bindings/go/run_tests.sh target/release

echo "== C examples"
make -C examples-c run LIBDIR="$PWD/target/release"

echo "== Python binding"
FDMOE_LIBRARY="$PWD/target/release/libfdmoe.so" python3 -m pytest -q bindings/python/tests

echo "== all tests passed"
