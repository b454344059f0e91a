#!/usr/bin/env bash
# Vets and tests the Go binding (bindings/go/fdmoe) against <libdir>/libfdmoe.so, with cgo's
# full pointer checks on (GODEBUG=cgocheck=2: no Go pointer may be kept by C).
#
#   usage: bindings/go/run_tests.sh <libdir>        e.g. bindings/go/run_tests.sh target/release
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ne 1 ] || [ ! -f "$1/libfdmoe.so" ]; then
    echo "usage: $0 <libdir containing libfdmoe.so> (build it with: cargo build --release)" >&2
    exit 2
fi
libdir="$(cd "$1" && pwd)"
command -v go >/dev/null || { echo "error: go is not installed (apt-get install golang-go)" >&2; exit 2; }
cd "$here"
unformatted="$(gofmt -l .)"
if [ -n "$unformatted" ]; then
    echo "gofmt: not formatted: $unformatted" >&2
    exit 1
fi
export CGO_ENABLED=1 CGO_LDFLAGS="-L$libdir -Wl,-rpath,$libdir"
go vet ./...
GODEBUG=cgocheck=2 go test -count=1 ./...
