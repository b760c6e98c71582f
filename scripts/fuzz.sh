#!/usr/bin/env bash
# Runs ztgate's fuzz targets (fuzz/) and fails if one of them crashes.
#
# Usage: scripts/fuzz.sh [SECONDS [TARGET...]]
#        scripts/fuzz.sh --make-seeds
#
# SECONDS is the libFuzzer run time per target (default 20, a CI smoke run). TARGET
# names limit the run to those targets; the default is every target in fuzz/Cargo.toml.
#
# Modes, chosen automatically and printed at the start and the end:
#   libfuzzer  needs a nightly toolchain and cargo-fuzz. The script installs cargo-fuzz
#              with `cargo install` when it is missing, and the nightly toolchain with
#              rustup when that is missing. New inputs go to fuzz/corpus/TARGET (ignored
#              by git), crash inputs to fuzz/artifacts/TARGET.
#   seeds      when nightly or cargo-fuzz cannot be installed: runs every file of
#              fuzz/seeds/TARGET through the same checks as a regression test on the
#              default toolchain (the main crate's tests/fuzz_seeds.rs, in release mode,
#              so it reuses the build of scripts/test.sh). SECONDS is ignored.
# Set FUZZ_MODE=seeds to force the seeds mode.
#
# The config target loads configs whose relative paths point at pki/; this script writes
# a development PKI with scripts/dev-pki.sh and passes it in ZTGATE_FUZZ_PKI.
#
# --make-seeds rewrites fuzz/seeds/ from the project's fixtures: the certificates of
# scripts/dev-pki.sh and scripts/zoo-pki.sh as DER, encoded control frames and configs,
# and CRLs and OCSP responses signed by a fresh development device CA. It also rewrites
# fuzz/fixtures/, the CA certificate, device certificate, time and nonce that the crl and
# ocsp_response targets verify against, so that the signed seeds pass their signature
# check and the fuzzer reaches the checks after it.
#
# Needs bash 5, openssl 3 and cargo. Exits 0 when every target ran without a crash, 1 on a
# crash or failure, 2 on a usage error.

set -Eeuo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly REPO
readonly FUZZ_DIR=$REPO/fuzz
readonly ALL_TARGETS=(identity control_decode control_reader preamble config_load crl ocsp_response)

fail() {
    printf 'fuzz.sh: %s\n' "$*" >&2
    exit 1
}

usage() {
    printf 'usage: %s [SECONDS [TARGET...]] | --make-seeds\n' "${0##*/}" >&2
    printf 'targets: %s\n' "${ALL_TARGETS[*]}" >&2
    exit 2
}

# Writes one byte with the value $1 (0 to 255).
byte() {
    # shellcheck disable=SC2059 # the format is the escape for the byte
    printf "\\x$(printf '%02x' "$1")"
}

# Writes one control frame: the type byte, a big-endian u16 body length and the body.
frame() {
    local type=$1 body=$2
    local length
    length=$(LC_ALL=C printf '%s' "$body" | wc -c)
    byte "$type"
    byte $((length >> 8))
    byte $((length & 255))
    printf '%s' "$body"
}

make_seeds() {
    local seeds=$FUZZ_DIR/seeds work
    work=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: $work is local
    trap "rm -rf -- '$work'" EXIT
    rm -rf -- "$seeds"
    mkdir -p "$seeds"/{identity,control_decode,control_reader,preamble,config_load}

    bash "$REPO/scripts/dev-pki.sh" "$work/dev" >/dev/null
    bash "$REPO/scripts/zoo-pki.sh" "$work/zoo" >/dev/null
    local pem name
    for pem in "$work"/dev/*.pem "$work"/zoo/*.pem; do
        # A chain file starts with its leaf, which has a file of its own.
        [[ $pem != *-chain.pem ]] || continue
        name=$(basename "$(dirname "$pem")")-$(basename "$pem" .pem)
        # openssl x509 reads the first certificate of a chain file; key and CRL files fail.
        openssl x509 -in "$pem" -outform DER -out "$seeds/identity/$name.der" 2>/dev/null ||
            rm -f "$seeds/identity/$name.der"
    done
    printf 'not a certificate' >"$seeds/identity/garbage"
    make_revocation_seeds "$work/dev" "$seeds" "$work"

    local -A bodies=(
        [admitted]='1 {"session_id":7,"application":"wiki","device_id":"spiffe://example.test/device/DEV-0001","expires_in_secs":300}'
        [refused]='2 {"code":"policy-denied","reason":"device not in group","remediation":"https://help.example.test"}'
        [step_up]='3 {"challenge":"https://idp.example.test/step-up","grace_secs":60,"reason":"step-up required"}'
        [going_away]='4 {"drain_secs":30,"reason":"restart"}'
        [closing]='5 {"code":"session-expired","reason":"the device certificate expired"}'
        [unknown_type]='9 {}'
        [bad_json]='2 {"code":'
    )
    local key type body
    for key in "${!bodies[@]}"; do
        type=${bodies[$key]%% *}
        body=${bodies[$key]#* }
        { byte "$type"; printf '%s' "$body"; } >"$seeds/control_decode/$key"
        { printf '\x00\x01'; frame "$type" "$body"; } >"$seeds/control_reader/$key"
    done
    {
        printf '\x03\x01'
        for key in admitted step_up going_away closing; do
            type=${bodies[$key]%% *}
            frame "$type" "${bodies[$key]#* }"
        done
    } >"$seeds/control_reader/session"
    printf '\x00\x02\x01\x00\x05{}' >"$seeds/control_reader/wrong_version"
    printf '\x07\x01\x01\x00\x40{"session_id":1' >"$seeds/control_reader/truncated"

    printf '\x01\x00' >"$seeds/preamble/valid"
    printf '\x02\x00' >"$seeds/preamble/version_2"
    printf '\x01\x80' >"$seeds/preamble/flags"

    cp "$REPO/config/ztgate.example.toml" "$seeds/config_load/example.toml"
    cat >"$seeds/config_load/full.toml" <<'EOF'
[gateway]
listen = ["127.0.0.1:0", "[::1]:0"]
certificate = "pki/gateway-chain.pem"
private_key = "pki/gateway.key"
handshake_timeout_ms = 3000
idle_timeout_secs = 30
keep_alive_secs = 5
admission_timeout_ms = 500
drain_secs = 0
udp_receive_buffer_bytes = 65536
udp_send_buffer_bytes = 65536

[limits]
max_streams_per_connection = 4
stream_receive_window = 1024
connection_receive_window = 4096
send_window = 4096
max_connections = 10
max_connections_per_source = 2
max_connections_per_device = 1
upstream_connect_timeout_ms = 100
copy_buffer_bytes = 1024

[identity]
hardware_bound_oid = "1.3.6.1.4.1.55555.1.1"

[policy]
engine = "builtin"
decision_lifetime_secs = 1
max_session_secs = 2

[log]
level = "info,ztgate=debug"
format = "json"

[[device_ca]]
name = "dev-devices"
certificates = ["pki/device-ca.pem"]
intermediates = ["pki/device-ca-chain.pem"]

[[device_ca]]
name = "root"
certificates = ["pki/root-ca.pem", "pki/other-ca.pem"]

[[application]]
name = "wiki"
server_name = "Wiki.Apps.Example.Test."
upstream = "127.0.0.1:8080"
labels = { tier = "internal" }
[application.access]
device_cas = ["dev-devices"]
spiffe_prefixes = ["spiffe://example.test/device"]
permanent_identifiers = [{ assigner = "1.3.6.1.4.1.55555.2", value = "SN-A1B2C3D4" }]
require_hardware_bound = true
remediation_url = "https://help.example.test/enroll"

[[application]]
name = "ssh"
server_name = "ssh.apps.example.test"
upstream = "ssh.internal:22"
[application.access]
device_cas = ["root"]
allow_any_device = true
EOF
    cat >"$seeds/config_load/errors.toml" <<'EOF'
[gateway]
listen = ["localhost:4433", "[::1]"]
certificate = "pki/missing.pem"
private_key = "pki/root-ca.key"
keep_alive_secs = 90
handshake_timeout_ms = 0

[log]
levell = "debug"

[[device_ca]]
name = ""
certificates = []

[[application]]
name = "wiki"
server_name = "10.0.0.1"
upstream = "wiki.internal"
[application.access]
device_cas = ["nobody"]
spiffe_prefixes = ["spiffe://Example.test/"]
allow_any_device = true
EOF
    printf '[gateway\nlisten = [' >"$seeds/config_load/syntax_error.toml"
    printf 'fuzz.sh: wrote %s seed files to %s\n' "$(find "$seeds" -type f | wc -l)" "$seeds"
}

# Writes CRL and OCSP response seeds signed by the device CA of the development PKI in
# $1 into $2/crl and $2/ocsp_response, and the fixtures they verify against into
# fuzz/fixtures. $3 is a scratch directory. Revokes DEV-0001 and DEV-0002 in that PKI.
make_revocation_seeds() {
    local pki=$1 seeds=$2 work=$3
    local fixtures=$FUZZ_DIR/fixtures cnf=$pki/ca/ca.cnf
    rm -rf -- "$fixtures"
    mkdir -p "$fixtures" "$seeds/crl" "$seeds/ocsp_response"
    openssl x509 -in "$pki/device-ca.pem" -outform DER -out "$fixtures/device-ca.der"
    openssl x509 -in "$pki/DEV-0001.pem" -outform DER -out "$fixtures/DEV-0001.der"
    date +%s >"$fixtures/made-at"

    # CRLs: none revoked, then two revoked, each as DER and PEM; one from another CA.
    openssl ca -config "$cnf" -name device_ca -gencrl -crlhours 24 -out "$work/empty.crl.pem" 2>/dev/null
    openssl ca -config "$cnf" -name device_ca -revoke "$pki/DEV-0002.pem" -crl_reason keyCompromise 2>/dev/null
    openssl ca -config "$cnf" -name device_ca -revoke "$pki/DEV-0001.pem" -crl_reason superseded 2>/dev/null
    openssl ca -config "$cnf" -name device_ca -gencrl -crlhours 24 -out "$work/revoked.crl.pem" 2>/dev/null
    openssl ca -config "$cnf" -name other_ca -gencrl -crlhours 24 -out "$work/other.crl.pem" 2>/dev/null
    local name
    for name in empty revoked other; do
        openssl crl -in "$work/$name.crl.pem" -outform DER -out "$seeds/crl/$name.der"
    done
    cp "$work/empty.crl.pem" "$seeds/crl/empty.pem"
    cat "$work/empty.crl.pem" "$work/revoked.crl.pem" >"$seeds/crl/two-blocks.pem"
    printf 'not a CRL' >"$seeds/crl/garbage"

    # OCSP responses for DEV-0001 (revoked above) and DEV-0003 (good) with SHA-1 and
    # SHA-256 CertIDs, signed by the device CA, one request with a nonce.
    local -a responder=(-index "$pki/ca/device-ca/index.txt" -CA "$pki/device-ca.pem"
        -rsigner "$pki/device-ca.pem" -rkey "$pki/device-ca.key" -ndays 3650)
    local device digest
    for device in DEV-0001 DEV-0003; do
        for digest in sha1 sha256; do
            openssl ocsp -issuer "$pki/device-ca.pem" -"$digest" -cert "$pki/$device.pem" \
                -no_nonce -reqout "$work/req.der" >/dev/null 2>&1
            openssl ocsp "${responder[@]}" -reqin "$work/req.der" \
                -respout "$seeds/ocsp_response/$device-$digest.der" >/dev/null 2>&1
        done
    done
    openssl ocsp -issuer "$pki/device-ca.pem" -cert "$pki/DEV-0001.pem" -nonce \
        -reqout "$work/req.der" >/dev/null 2>&1
    openssl ocsp "${responder[@]}" -reqin "$work/req.der" \
        -respout "$seeds/ocsp_response/DEV-0001-nonce.der" >/dev/null 2>&1
    # The request's nonce extension value, which `-req_text` prints as hex.
    local hex i
    hex=$(openssl ocsp -reqin "$work/req.der" -req_text 2>/dev/null |
        grep -A1 'OCSP Nonce' | tail -n1 | tr -d ' \n')
    [[ $hex =~ ^([0-9A-Fa-f]{2})+$ ]] || fail "openssl printed no nonce for the OCSP request"
    for ((i = 0; i < ${#hex}; i += 2)); do
        byte $((16#${hex:i:2}))
    done >"$fixtures/ocsp-nonce.der"
    printf '\x30\x03\x0a\x01\x01' >"$seeds/ocsp_response/malformed-request"
}

# Prints why libFuzzer mode is unavailable, or nothing when it is available. Installs
# the nightly toolchain and cargo-fuzz when they are missing.
prepare_libfuzzer() {
    if [[ ${FUZZ_MODE:-} == seeds ]]; then
        printf 'FUZZ_MODE=seeds'
        return
    fi
    command -v rustup >/dev/null || {
        printf 'rustup not found, so no nightly toolchain'
        return
    }
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        printf 'fuzz.sh: installing the nightly toolchain\n' >&2
        rustup toolchain install nightly --profile minimal >&2 || {
            printf 'the nightly toolchain cannot be installed'
            return
        }
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        printf 'fuzz.sh: installing cargo-fuzz\n' >&2
        cargo install cargo-fuzz --locked >&2 || {
            printf 'cargo-fuzz cannot be installed'
            return
        }
    fi
}

run_libfuzzer() {
    local seconds=$1 target
    shift
    for target in "$@"; do
        mkdir -p "$FUZZ_DIR/corpus/$target"
        local -a options=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1)
        [[ ! -f $FUZZ_DIR/dicts/$target.dict ]] || options+=(-dict="$FUZZ_DIR/dicts/$target.dict")
        printf 'fuzz.sh: libfuzzer: %s for %ss\n' "$target" "$seconds"
        if ! (cd -- "$FUZZ_DIR" && cargo +nightly fuzz run "$target" \
            "corpus/$target" "seeds/$target" -- "${options[@]}"); then
            fail "target $target crashed or failed; the input is in fuzz/artifacts/$target/ (reproduce: cd fuzz && cargo +nightly fuzz run $target ARTIFACT)"
        fi
    done
}

main() {
    ((BASH_VERSINFO[0] >= 5)) || fail "bash 5 or later is required, found: $BASH_VERSION"
    if [[ ${1:-} == --make-seeds ]]; then
        (($# == 1)) || usage
        make_seeds
        return
    fi
    local seconds=${1:-20}
    [[ $seconds =~ ^[1-9][0-9]*$ ]] || usage
    shift $(($# > 0 ? 1 : 0))
    local -a targets=("$@")
    ((${#targets[@]} > 0)) || targets=("${ALL_TARGETS[@]}")
    local target
    for target in "${targets[@]}"; do
        [[ " ${ALL_TARGETS[*]} " == *" $target "* ]] || usage
    done

    command -v openssl >/dev/null || fail "openssl not found; install it (apt-get install openssl)"
    local pki
    pki=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: $pki is local
    trap "rm -rf -- '$pki'" EXIT
    bash "$REPO/scripts/dev-pki.sh" "$pki" >/dev/null
    export ZTGATE_FUZZ_PKI=$pki

    local unavailable
    unavailable=$(prepare_libfuzzer)
    if [[ -z $unavailable ]]; then
        printf 'fuzz.sh: mode libfuzzer, %ss per target: %s\n' "$seconds" "${targets[*]}"
        run_libfuzzer "$seconds" "${targets[@]}"
        printf 'fuzz.sh: mode libfuzzer: %s targets ran %ss each without a crash\n' "${#targets[@]}" "$seconds"
    else
        printf 'fuzz.sh: mode seeds (libFuzzer unavailable: %s): running fuzz/seeds through the checks\n' "$unavailable"
        local -a filters=()
        for target in "${targets[@]}"; do
            filters+=("${target}_seeds")
        done
        (cd -- "$REPO" && cargo test --release --locked --test fuzz_seeds -- "${filters[@]}") ||
            fail "a seed input failed its check (mode seeds)"
        printf 'fuzz.sh: mode seeds: seed corpus passed for %s\n' "${targets[*]}"
    fi
}

main "$@"
