#!/usr/bin/env bash
# Builds a development PKI whose device CA CRL lists COUNT revoked certificates, for
# benchmarks of CRL parsing and lookups.
#
# Usage: scripts/make-large-crl.sh DIR COUNT
#
# Runs scripts/dev-pki.sh into DIR, revokes DEV-0002 (keyCompromise), appends COUNT
# synthetic revoked entries to the device CA's `openssl ca` database, and signs one CRL
# over all of them, valid for 30 days. The synthetic serials are 16 bytes: 4 random
# bytes, the 4-byte entry number (so they are unique) and 8 random bytes. Every fifth
# entry has no reason code; the others cycle through four reasons.
#
# Writes:
#   DIR/device-ca.crl.pem, DIR/device-ca.crl   the CRL as PEM and DER
#   DIR/large-crl-serials.txt                  the first 1000 synthetic serials, hex
#
# A million entries took 20 to 50 s and 210 MB of disk on a 2-core machine with OpenSSL
# 3.0.19, mostly in `openssl ca -gencrl`. Requires bash 5, awk and openssl 3.0 or later.

set -Eeuo pipefail

fail() {
    printf 'make-large-crl: %s\n' "$*" >&2
    exit 1
}

main() {
    [[ $# -eq 2 ]] || {
        printf 'usage: %s DIR COUNT\n' "${0##*/}" >&2
        exit 2
    }
    local dir=$1 count=$2
    [[ $count =~ ^[0-9]+$ && $count -le 16777215 ]] ||
        fail "COUNT must be a whole number up to 16777215, got: $count"

    local script_dir
    script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
    bash "$script_dir/dev-pki.sh" "$dir" >/dev/null
    dir=$(cd -- "$dir" && pwd -P)
    local config=$dir/ca/ca.cnf
    local index=$dir/ca/device-ca/index.txt

    openssl ca -config "$config" -name device_ca -revoke "$dir/DEV-0002.pem" \
        -crl_reason keyCompromise 2>>"$dir/dev-pki.log" ||
        fail "revoking DEV-0002 failed, see $dir/dev-pki.log"

    # index.txt columns: status, expiry, revocation time[,reason], serial (hex), file, subject.
    awk -v count="$count" -v serials="$dir/large-crl-serials.txt" 'BEGIN {
        srand(1)
        split("keyCompromise superseded cessationOfOperation affiliationChanged", reasons, " ")
        for (i = 0; i < count; i++) {
            serial = sprintf("%08X%08X%08X%08X", 268435456 + int(rand() * 1879048191), i,
                int(rand() * 4294967295), int(rand() * 4294967295))
            revoked = "260101000000Z"
            if (i % 5 != 4) {
                revoked = revoked "," reasons[i % 5 + 1]
            }
            printf "R\t301231000000Z\t%s\t%s\tunknown\t/CN=synthetic-%d\n", revoked, serial, i
            if (i < 1000) {
                print serial > serials
            }
        }
    }' >>"$index"

    openssl ca -batch -config "$config" -name device_ca -gencrl -crldays 30 \
        -out "$dir/device-ca.crl.pem" 2>>"$dir/dev-pki.log" ||
        fail "openssl ca -gencrl failed, see $dir/dev-pki.log"
    openssl crl -in "$dir/device-ca.crl.pem" -outform DER -out "$dir/device-ca.crl" ||
        fail "converting the CRL to DER failed"
    printf 'make-large-crl: wrote a CRL with %s entries to %s/device-ca.crl{,.pem}\n' \
        "$((count + 1))" "$dir"
}

main "$@"
