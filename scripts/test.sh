#!/usr/bin/env bash
# Runs the ztgate test suite, the one test command for developers and CI (.ci/run).
#
# Usage: bash scripts/test.sh [ARGS...]
#
# Installs the missing Debian packages that the tests and the benchmark smoke test call,
# which needs root and apt-get: openssl for scripts/dev-pki.sh, curl, python3 with venv for
# the aioquic test, iperf3, stunnel4, haproxy, and iproute2 for the network namespace test.
# Then it builds every target in release mode and runs
# `cargo test --release --locked ARGS...`, so `bash scripts/test.sh quic -- --nocapture`
# runs only the tests whose names contain "quic" and shows their output. Without ARGS it
# then runs two smoke tests on the same build. `scripts/fuzz.sh` in its seed-corpus mode
# runs every fuzz target over fuzz/seeds (a few seconds). `scripts/bench.sh --quick` runs
# every benchmark setup once and does not judge the figures. Exits with the first failing
# status.

set -Eeuo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly REPO

fail() {
    printf 'test.sh: %s\n' "$*" >&2
    exit 1
}

# Installs the Debian packages that provide missing commands, with one apt-get update.
install_missing_packages() {
    local -a missing=()
    local command
    for command in openssl curl python3 iperf3 stunnel4 haproxy; do
        command -v "$command" >/dev/null || missing+=("$command")
    done
    command -v ip >/dev/null || missing+=(iproute2)
    # tests/mobile.rs makes a venv for aioquic; Debian's python3 needs python3-venv.
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    # cargo fetches crates over HTTPS and needs the system CA bundle.
    [[ -e /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
    # The ring crate compiles C and assembly, and rustc links with cc.
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    ((${#missing[@]} > 0)) || return 0
    command -v apt-get >/dev/null ||
        fail "missing packages: ${missing[*]}; this script installs them only with apt-get (Debian, Ubuntu)"
    ((EUID == 0)) ||
        fail "missing packages: ${missing[*]}; run this script as root or run: sudo apt-get install ${missing[*]}"
    printf 'test.sh: installing %s\n' "${missing[*]}"
    apt-get update -q
    # The iperf3 package has a debconf question (start a daemon?), and noninteractive
    # keeps its default answer, no.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

main() {
    install_missing_packages
    if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
        PATH=$HOME/.cargo/bin:$PATH
    fi
    command -v cargo >/dev/null ||
        fail "cargo not found; install Rust 1.80 or later with rustup (https://rustup.rs)"
    cd -- "$REPO"
    cargo build --release --locked --all-targets
    cargo test --release --locked "$@"
    if (($# == 0)); then
        FUZZ_MODE=seeds bash scripts/fuzz.sh
        bash scripts/bench.sh --quick
    fi
}

main "$@"
