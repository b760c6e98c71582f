#!/usr/bin/env bash
# Runs a bounded soak of ztgate on loopback for MINUTES minutes and prints a summary.
#
# Usage: scripts/soak.sh MINUTES
#
# Builds the release binary, writes a development PKI with scripts/dev-pki.sh into a
# temporary directory, and runs scripts/soak.py, which starts an echo upstream, a CRL
# server, scripts/ocsp-responder.py, `ztgate serve` and one `ztgate connect` per device,
# all on 127.0.0.1. In cycles it checks the SHA-256 of random data sent through each
# tunnel, rebinds clients with SIGUSR1, restarts clients, revokes fresh device
# certificates (CA database, CRL and admin API push), reloads the policy with SIGHUP and
# restarts the OCSP responder. scripts/soak.py lists every check and its tolerance.
#
# Needs bash 5, openssl 3, python3 and cargo. Exits 0 when every check passed, 1 on a
# failure, 2 on a usage error. Every process it starts is stopped on exit, and the work
# directory (with gateway.log) is kept only on failure.

set -Eeuo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly REPO

fail() {
    printf 'soak.sh: %s\n' "$*" >&2
    exit 1
}

main() {
    if [[ $# -ne 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
        printf 'usage: %s MINUTES (a whole number of minutes, at least 1)\n' "${0##*/}" >&2
        exit 2
    fi
    local minutes=$1
    local tool
    for tool in openssl python3 cargo; do
        command -v "$tool" >/dev/null || fail "$tool not found; scripts/test.sh lists how to install it"
    done
    (cd -- "$REPO" && cargo build --release --locked --quiet --bin ztgate)

    local work status=0
    work=$(mktemp -d)
    bash "$REPO/scripts/dev-pki.sh" "$work/pki" >/dev/null
    printf 'soak.sh: %s minutes, work directory %s, on %s (%s CPUs)\n' \
        "$minutes" "$work" "$(uname -sr)" "$(nproc)"
    python3 "$REPO/scripts/soak.py" --minutes "$minutes" --ztgate "$REPO/target/release/ztgate" \
        --pki "$work/pki" --work "$work" --repo "$REPO" || status=$?
    if ((status == 0)); then
        rm -rf -- "$work"
    else
        printf 'soak.sh: failed; the gateway log is %s/gateway.log\n' "$work" >&2
    fi
    return "$status"
}

main "$@"
