#!/usr/bin/env bash
# Runs the ztgate demo on this machine: one gateway, one demo web application and one
# tunnel, all on 127.0.0.1.
#
# Usage: bash scripts/quickstart.sh
#
# The script installs missing Debian packages (as root), builds the release binary,
# and writes a development PKI and a gateway config into a temporary directory. It
# starts a demo upstream (python3 http.server), `ztgate serve` and `ztgate connect`,
# fetches the demo page through the tunnel with curl, and shows two devices that the
# gateway refuses. Every process the script starts is stopped on exit.
#
# Exits with status 0 when the page came through the tunnel and both refusals
# happened, 1 otherwise. The temporary directory is removed on success and kept, with
# every log, on failure. Each wait is bounded by READY_TIMEOUT_SECS (30 s). The build
# is not bounded: a first build downloads and compiles the dependencies, which takes
# a few minutes.

set -Eeuo pipefail

readonly READY_TIMEOUT_SECS=30
readonly STOP_TIMEOUT_SECS=15
readonly APP=wiki.apps.example.test
readonly PAGE_MARKER="Hello through the ztgate tunnel"

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly REPO
WORK=
PIDS=()
STEP=0

step() {
    STEP=$((STEP + 1))
    printf '\n[%d] %s\n' "$STEP" "$*"
}

info() {
    printf '    %s\n' "$*"
}

# Copies standard input to standard output with each line indented by WIDTH spaces.
indent() {
    local width=${1:-4} line
    while IFS= read -r line; do
        printf '%*s%s\n' "$width" '' "$line"
    done
}

fail() {
    printf 'quickstart: %s\n' "$*" >&2
    exit 1
}

# Prints the last lines of each log file that exists, for a failure report.
show_logs() {
    local file
    for file in "$@"; do
        if [[ -s $file ]]; then
            printf -- '--- last lines of %s ---\n' "$file" >&2
            tail -n 20 -- "$file" >&2
        fi
    done
}

# Stops the processes this script started, newest first: SIGTERM, then SIGKILL after
# STOP_TIMEOUT_SECS. Removes the work directory after a successful run.
cleanup() {
    local status=$? index pid deadline
    for ((index = ${#PIDS[@]} - 1; index >= 0; index--)); do
        pid=${PIDS[index]}
        kill -TERM "$pid" 2>/dev/null || continue
        deadline=$((SECONDS + STOP_TIMEOUT_SECS))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            printf 'quickstart: process %s did not stop within %ss; sending SIGKILL\n' "$pid" "$STOP_TIMEOUT_SECS" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if ((status == 0)); then
            rm -rf -- "$WORK"
        else
            printf 'quickstart: failed; logs and config are kept in %s\n' "$WORK" >&2
        fi
    fi
}

# Waits until FILE has a line that matches the extended regex PATTERN and prints that
# line. Fails when process PID exits first or READY_TIMEOUT_SECS pass.
#   $1 file, $2 pattern, $3 pid, $4 what is starting (for messages), then extra log files
wait_for_line() {
    local file=$1 pattern=$2 pid=$3 what=$4
    shift 4
    local deadline=$((SECONDS + READY_TIMEOUT_SECS)) line
    while ((SECONDS < deadline)); do
        if line=$(grep -m 1 -E -- "$pattern" "$file" 2>/dev/null); then
            printf '%s\n' "$line"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            show_logs "$file" "$@"
            fail "$what exited before it was ready"
        fi
        sleep 0.1
    done
    show_logs "$file" "$@"
    fail "$what was not ready within ${READY_TIMEOUT_SECS}s"
}

# Installs the Debian packages that provide missing commands, with one apt-get update.
install_missing_packages() {
    local -a missing=()
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    # cargo fetches crates over HTTPS and needs the system CA bundle.
    [[ -e /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
    # The ring crate compiles C and assembly, and rustc links with cc.
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    if ((${#missing[@]} == 0)); then
        info "openssl, curl, python3, CA certificates and a C compiler are present"
        return
    fi
    command -v apt-get >/dev/null ||
        fail "missing packages: ${missing[*]}; this script installs them only with apt-get (Debian, Ubuntu)"
    ((EUID == 0)) ||
        fail "missing packages: ${missing[*]}; run this script as root or run: sudo apt-get install ${missing[*]}"
    info "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

find_cargo() {
    if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
        PATH=$HOME/.cargo/bin:$PATH
    fi
    command -v cargo >/dev/null ||
        fail "cargo not found; install Rust 1.80 or later with rustup (https://rustup.rs), then rerun this script"
}

# Writes the demo gateway config. The wiki application admits devices of the dev
# device CA whose SPIFFE ID is under spiffe://example.test/device and whose key is
# hardware-bound. config/ztgate.example.toml explains each key.
write_config() {
    local upstream_port=$1
    cat >"$WORK/ztgate.toml" <<EOF
[gateway]
listen = ["127.0.0.1:0"]
certificate = "pki/gateway-chain.pem"
private_key = "pki/gateway.key"

[identity]
hardware_bound_oid = "1.3.6.1.4.1.55555.1.1"

[log]
level = "info"

[[device_ca]]
name = "dev-devices"
certificates = ["pki/device-ca.pem"]

[[application]]
name = "wiki"
server_name = "$APP"
upstream = "127.0.0.1:$upstream_port"

[application.access]
device_cas = ["dev-devices"]
spiffe_prefixes = ["spiffe://example.test/device"]
require_hardware_bound = true
EOF
}

# Runs `ztgate connect` for DEVICE, which the gateway must refuse, and prints the
# client's message.
#   $1 device name, $2 what the refusal demonstrates
expect_refusal() {
    local device=$1 why=$2 log=$WORK/connect-$1.log status=0
    timeout "$READY_TIMEOUT_SECS" "$ZTGATE" connect --gateway "$GATEWAY_ADDR" --app "$APP" \
        --listen 127.0.0.1:0 --cert "$PKI/$device-chain.pem" --key "$PKI/$device.key" \
        --ca "$PKI/root-ca.pem" --connect-timeout-secs 10 2>"$log" || status=$?
    if ((status == 0 || status == 124)); then
        show_logs "$log" "$WORK/gateway.log"
        fail "$device was not refused (ztgate connect exit status $status)"
    fi
    info "$device: $why"
    info "ztgate connect exited with status $status and printed:"
    indent 6 <"$log"
}

main() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    step "Checking the required packages"
    install_missing_packages
    find_cargo

    step "Building the release binary (cargo build --release --locked)"
    (cd -- "$REPO" && cargo build --release --locked)
    ZTGATE=${CARGO_TARGET_DIR:-$REPO/target}/release/ztgate
    [[ -x $ZTGATE ]] || fail "the build did not produce $ZTGATE"

    step "Writing a development PKI"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/ztgate-quickstart.XXXXXX")
    PKI=$WORK/pki
    bash "$REPO/scripts/dev-pki.sh" "$PKI" | indent
    info "DEV-0001 is a good device, DEV-0003 has no hardware-bound key, DEV-ROGUE comes from an untrusted CA"

    step "Starting the demo upstream (python3 http.server on 127.0.0.1)"
    mkdir -p "$WORK/site"
    printf '<!doctype html>\n<title>ztgate demo</title>\n<h1>%s</h1>\n' "$PAGE_MARKER" >"$WORK/site/index.html"
    python3 -u -m http.server --bind 127.0.0.1 --directory "$WORK/site" 0 >"$WORK/upstream.log" 2>&1 &
    local upstream_pid=$!
    PIDS+=("$upstream_pid")
    local line upstream_port
    line=$(wait_for_line "$WORK/upstream.log" '^Serving HTTP on .* port [0-9]+' "$upstream_pid" "the demo upstream")
    upstream_port=$(sed -E 's/.* port ([0-9]+).*/\1/' <<<"$line")
    info "serving $WORK/site on 127.0.0.1:$upstream_port"

    step "Starting the gateway (ztgate serve)"
    write_config "$upstream_port"
    "$ZTGATE" check-config "$WORK/ztgate.toml" | indent
    "$ZTGATE" serve --config "$WORK/ztgate.toml" >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
    local gateway_pid=$!
    PIDS+=("$gateway_pid")
    line=$(wait_for_line "$WORK/gateway.out" '^ztgate: listening quic ' "$gateway_pid" "ztgate serve" "$WORK/gateway.log")
    GATEWAY_ADDR=${line#ztgate: listening quic }
    info "the gateway listens on QUIC $GATEWAY_ADDR and forwards $APP to 127.0.0.1:$upstream_port"

    step "Opening a tunnel as device DEV-0001 (ztgate connect)"
    "$ZTGATE" connect --gateway "$GATEWAY_ADDR" --app "$APP" --listen 127.0.0.1:0 \
        --cert "$PKI/DEV-0001-chain.pem" --key "$PKI/DEV-0001.key" --ca "$PKI/root-ca.pem" \
        2>"$WORK/connect.log" &
    local connect_pid=$!
    PIDS+=("$connect_pid")
    line=$(wait_for_line "$WORK/connect.log" '^ztgate connect: listening on ' "$connect_pid" "ztgate connect" "$WORK/gateway.log")
    local tunnel_addr=${line#ztgate connect: listening on }
    indent <"$WORK/connect.log"

    step "Fetching http://$tunnel_addr/ through the tunnel with curl"
    local page
    if ! page=$(curl --fail --silent --show-error --noproxy '*' --max-time 10 "http://$tunnel_addr/"); then
        show_logs "$WORK/connect.log" "$WORK/gateway.log" "$WORK/upstream.log"
        fail "curl could not fetch the page through the tunnel"
    fi
    if [[ $page != *"$PAGE_MARKER"* ]]; then
        show_logs "$WORK/connect.log" "$WORK/gateway.log"
        fail "the page fetched through the tunnel is not the demo page: $page"
    fi
    info "curl received the demo page:"
    indent 6 <<<"$page"

    step "Trying devices that the gateway refuses"
    expect_refusal DEV-ROGUE "its CA is not a configured device CA, so the TLS handshake fails"
    expect_refusal DEV-0003 "the chain is valid, but the wiki policy requires a hardware-bound key"

    step "What the gateway logged"
    indent <"$WORK/gateway.log"

    step "Done"
    info "the page came through the tunnel, and DEV-ROGUE and DEV-0003 were refused"
    info "stopping the client, the gateway and the upstream"
}

main "$@"
