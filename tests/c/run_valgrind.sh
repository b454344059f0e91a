#!/usr/bin/env bash
# Builds the header-driven C tests (tests/c/test_*.c) against <libdir>/libfdmoe.so and runs
# each under valgrind memcheck. Fails on any test failure, any memcheck error, and any
# definite or indirect leak; "possibly lost" blocks of the Rust/rayon runtime are listed in
# tests/c/valgrind.supp with the reason for each.
#
#   usage: tests/c/run_valgrind.sh <libdir>        e.g. tests/c/run_valgrind.sh target/release
#
# Environment: CC (default cc), FDMOE_TEST_SEED (varies the random inputs), VALGRIND_ARGS
# (extra valgrind options). Takes well under a minute on 2 cores.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [ $# -ne 1 ]; then
    echo "usage: $0 <libdir containing libfdmoe.so>" >&2
    exit 2
fi
libdir="$(cd "$1" && pwd)"
if [ ! -f "$libdir/libfdmoe.so" ]; then
    echo "error: $libdir/libfdmoe.so not found (build it with: cargo build --release)" >&2
    exit 2
fi
if ! command -v valgrind >/dev/null; then
    echo "error: valgrind is not installed" >&2
    exit 2
fi
cc="${CC:-cc}"

build="$(mktemp -d "${TMPDIR:-/tmp}/fdmoe-valgrind.XXXXXX")"
trap 'rm -rf "$build"' EXIT

status=0
for src in "$here"/test_*.c; do
    name="$(basename "$src" .c)"
    "$cc" -std=c11 -Wall -Wextra -Werror -pthread -g -O1 -I "$root/include" "$src" \
        -o "$build/$name" -L "$libdir" -lfdmoe -lm -Wl,-rpath,"$libdir"
    log="$build/$name.valgrind.log"
    start=$SECONDS
    # Run from the build folder: the tests read no files.
    if (cd "$build" && valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect \
        --error-exitcode=1 --track-origins=yes --num-callers=40 \
        --suppressions="$here/valgrind.supp" --log-file="$log" ${VALGRIND_ARGS:-} \
        "./$name" >"$build/$name.out" 2>&1); then
        result=ok
    else
        result=FAILED
        status=1
    fi
    errors="$(grep -h 'ERROR SUMMARY' "$log" | sed 's/^==[0-9]*== //; s/ (suppressed.*//')"
    echo "$name: $result ($(tail -n 1 "$build/$name.out"); valgrind $errors; $((SECONDS - start))s)"
    grep -hE 'definitely lost:|indirectly lost:|possibly lost:' "$log" | sed 's/^==[0-9]*==  */    /' || true
    if [ "$result" != ok ]; then
        echo "---- $name output"
        cat "$build/$name.out"
        echo "---- $name valgrind log"
        cat "$log"
    fi
done
if [ $status -eq 0 ]; then
    echo "valgrind: all C tests clean"
else
    echo "valgrind: FAILED"
fi
exit $status
