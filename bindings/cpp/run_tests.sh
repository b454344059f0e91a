#!/usr/bin/env bash
# Builds the C++ binding's tests (bindings/cpp/tests/test_*.cpp, strict warnings, C++17)
# against <libdir>/libfdmoe.so and runs each under valgrind memcheck with the C tests'
# suppressions (tests/c/valgrind.supp: the Rust runtime's "possibly lost" blocks). Fails on
# any test failure, memcheck error, or definite or indirect leak.
#
#   usage: bindings/cpp/run_tests.sh <libdir>        e.g. bindings/cpp/run_tests.sh target/release
#
# Environment: CXX (default c++).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [ $# -ne 1 ] || [ ! -f "$1/libfdmoe.so" ]; then
    echo "usage: $0 <libdir containing libfdmoe.so> (build it with: cargo build --release)" >&2
    exit 2
fi
libdir="$(cd "$1" && pwd)"
cxx="${CXX:-c++}"
build="$(mktemp -d "${TMPDIR:-/tmp}/fdmoe-cpp.XXXXXX")"
trap 'rm -rf "$build"' EXIT

status=0
for src in "$here"/tests/test_*.cpp; do
    name="$(basename "$src" .cpp)"
    "$cxx" -std=c++17 -Wall -Wextra -Wpedantic -Werror -g -O1 -I "$root/include" -I "$here/include" "$src" \
        -o "$build/$name" -L "$libdir" -lfdmoe -Wl,-rpath,"$libdir"
    log="$build/$name.valgrind.log"
    if valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=1 \
        --num-callers=40 --suppressions="$root/tests/c/valgrind.supp" --log-file="$log" \
        "$build/$name" >"$build/$name.out" 2>&1; then
        echo "$name: ok ($(tail -n 1 "$build/$name.out"); valgrind $(grep -h 'ERROR SUMMARY' "$log" | sed 's/^==[0-9]*== //; s/ (suppressed.*//'))"
    else
        status=1
        echo "$name: FAILED"
        cat "$build/$name.out" "$log"
    fi
done
exit $status
