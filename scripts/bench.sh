#!/usr/bin/env bash
# Benchmarks ztgate against direct TCP, a bare quinn relay and TLS peers, on loopback.
#
# Usage: scripts/bench.sh [--quick] [--seconds N] [--only LIST] [--set SECTION.KEY=VALUE]...
#   --quick     one short run per setup and small tunnel counts, in under a minute; a
#               smoke test that does not rewrite docs/benchmarks.md
#   --seconds   length of each iperf3 run (default 10, 1 with --quick)
#   --only      comma-separated subset of: direct, quic, tls, stunnel, haproxy, relay
#               (throughput setups), handshakes, idle (default: all of them)
#   --set       puts KEY = VALUE into table [SECTION] of the generated gateway config, for
#               example --set limits.stream_receive_window=4194304; VALUE is TOML, so
#               strings need quotes (--set 'log.level="info"'); repeatable
#
# Throughput: iperf3 for 1 and 8 parallel streams (-P 8) through
#   direct   iperf3 client to server
#   quic     ztgate connect -> ztgate serve (QUIC) -> iperf3
#   tls      ztgate connect --transport tls -> ztgate serve (TLS over TCP) -> iperf3
#   stunnel  stunnel client -> stunnel server (verifyChain, requireCert, CRLs) -> iperf3
#   haproxy  stunnel client -> HAProxy (verify required, CRLs) -> iperf3
#   relay    quic_relay client -> quic_relay server (bare quinn stream) -> iperf3
# with the runs of the setups interleaved, the median of three runs each, and the CPU time
# (utime + stime from /proc) of the server-side process per GiB received.
# Handshakes: examples/tunnel_load opens new tunnels with full mutual-TLS handshakes and a
# one-byte echo through the upstream, against ztgate (QUIC and TLS), stunnel and HAProxy,
# and reads the server's CPU time per tunnel.
# Idle: ztgate's VmRSS growth with 10,000 admitted QUIC connections without streams and
# with 5,000 TLS tunnels connected upstream, each on a fresh gateway.
#
# ZTGATE_BENCH_WRAPPER, when set, is a command put in front of every `ztgate serve` the
# script starts, to profile the gateway: for example
#   ZTGATE_BENCH_WRAPPER="valgrind --tool=massif --massif-out-file=/tmp/massif.%p"
# (figures measured that way are not comparable). ZTGATE_BENCH_KEEP=DIR copies the work
# directory (configs and every process's log) to DIR on exit.
#
# Installs iperf3, stunnel4 and haproxy with apt-get when they are missing (needs root).
# A full run without --only writes the generated section of docs/benchmarks.md. Every process it starts
# listens on 127.0.0.1 only, runs for a bounded time and is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
quick=0
runs=3
seconds=10
only=""
sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; runs=1; seconds=1 ;;
    --seconds) seconds=${2:?--seconds needs a number}; shift ;;
    --only) only=${2:?--only needs a comma-separated list}; shift ;;
    --set) sets+=("${2:?--set needs SECTION.KEY=VALUE}"); shift ;;
    *) echo "bench.sh: unknown argument $1 (see the usage at the top of scripts/bench.sh)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$quick" = 1 ]; then
  handshake_seconds=1; idle_quic=300; idle_tls=200
else
  handshake_seconds=5; idle_quic=10000; idle_tls=5000
fi
all_setups="direct quic tls stunnel haproxy relay"
wanted=" ${only//,/ } "
[ -n "$only" ] || wanted=" $all_setups handshakes idle "
for word in $wanted; do
  case " $all_setups handshakes idle " in
    *" $word "*) ;;
    *) echo "bench.sh: unknown --only entry '$word' (use $all_setups handshakes idle)" >&2; exit 2 ;;
  esac
done
for entry in "${sets[@]}"; do
  [[ $entry =~ ^[a-z_]+\.[a-z_]+=.+$ ]] ||
    { echo "bench.sh: invalid --set '$entry' (expected SECTION.KEY=VALUE, such as limits.max_streams_per_connection=16)" >&2; exit 2; }
done
wants() { [[ $wanted == *" $1 "* ]]; }

need=()
for tool in iperf3 openssl python3 stunnel4 haproxy; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || {
    echo "bench.sh: missing ${need[*]}; run as root with apt-get, or: sudo apt-get install ${need[*]}" >&2
    exit 1
  }
  echo "bench.sh: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The idle benchmark keeps 5,000 TLS tunnels open, with two sockets each in the gateway.
ulimit -n "$(ulimit -Hn)"

# The same release build as scripts/test.sh, so CI builds only once.
cargo build --release --locked --all-targets --quiet
bin=$root/target/release/ztgate
relay_bin=$root/target/release/examples/quic_relay
load_bin=$root/target/release/examples/tunnel_load
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${ZTGATE_BENCH_KEEP:-}" ] && cp -r "$work" "$ZTGATE_BENCH_KEEP"
  rm -rf "$work"
}
trap cleanup EXIT
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# Waits up to 20 s for a line matching $2 in file $1 and prints the rest of it.
wait_line() {
  local file=$1 marker=$2 i
  for i in $(seq 1 200); do
    if grep -q "$marker" "$file" 2>/dev/null; then
      grep -m1 "$marker" "$file" | sed "s/.*$marker//"
      return 0
    fi
    sleep 0.1
  done
  echo "bench.sh: timed out waiting for '$marker' in $file" >&2
  cat "$file" >&2
  return 1
}

# Waits up to 20 s until TCP port $1 on 127.0.0.1 accepts connections; $2 names the server.
wait_port() {
  local i
  for i in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "bench.sh: $2 is not listening on 127.0.0.1:$1 after 20 s; its log:" >&2
  cat "$work/$2.log" >&2 || true
  return 1
}

# Prints a loopback port that was free a moment ago and that no earlier call handed out
# (the kernel may give a just-released port again). The peers that need one cannot bind
# port 0 and report it.
free_port() {
  python3 - "$work/ports-given" <<'PY'
import socket, sys
path = sys.argv[1]
try:
    handed_out = set(open(path).read().split())
except FileNotFoundError:
    handed_out = set()
for _ in range(100):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    if port not in handed_out:
        break
else:
    sys.exit("bench.sh: no unused loopback port after 100 tries")
with open(path, "a") as f:
    f.write(port + "\n")
print(port)
PY
}

# Starts a background process with its output in $work/NAME.log and stores its PID in
# $started. Usage: start NAME COMMAND...
start() {
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  started=$!
  pids+=("$started")
}

# --- PKI, with DEV-0002 revoked and a CRL for both CA levels (stunnel and HAProxy check
# every level of the chain).
bash scripts/dev-pki.sh "$work/pki" >/dev/null
pki=$work/pki
openssl ca -config "$pki/ca/ca.cnf" -name device_ca -revoke "$pki/DEV-0002.pem" \
  -crl_reason keyCompromise >/dev/null 2>&1
openssl ca -config "$pki/ca/ca.cnf" -name device_ca -gencrl -crlhours 2 -out "$pki/device-ca.crl.pem" 2>/dev/null
openssl ca -config "$pki/ca/ca.cnf" -name root_ca -gencrl -crlhours 2 -out "$pki/root-ca.crl.pem" 2>/dev/null
cat "$pki/root-ca.crl.pem" "$pki/device-ca.crl.pem" >"$pki/all.crl.pem"
cat "$pki/gateway-chain.pem" "$pki/gateway.key" >"$pki/gateway-bundle.pem"
device=(--cert "$pki/DEV-0001-chain.pem" --key "$pki/DEV-0001.key" --ca "$pki/root-ca.pem")

# --- Upstreams: the iperf3 server and an echo server for the handshake and idle tunnels.
iperf_port=$(free_port)
start iperf3 iperf3 -s -B 127.0.0.1 -p "$iperf_port"
start echo "$load_bin" echo --listen 127.0.0.1:0
echo_addr=$(wait_line "$work/echo.log" "ready ")

# Writes a gateway config to $1: the base keys below, with each --set key added to (or
# replacing a key of) its table.
write_gateway_config() {
  python3 - "$1" "$pki" "$iperf_port" "$echo_addr" "${sets[@]}" <<'PY'
import sys
out, pki, iperf_port, echo_addr, *sets = sys.argv[1:]
tables = {
    "gateway": {"listen": '["127.0.0.1:0"]', "listen_tls": '["127.0.0.1:0"]',
                "certificate": f'"{pki}/gateway-chain.pem"', "private_key": f'"{pki}/gateway.key"'},
    "log": {"level": '"warn"'},
    "identity": {"hardware_bound_oid": '"1.3.6.1.4.1.55555.1.1"'},
    # One device on one address opens every tunnel of the handshake and idle
    # runs, so the per-source and per-device caps and the handshake rate limit
    # are lifted, and Retry starts only past the idle run's pending handshakes.
    "limits": {"max_connections_per_source": "100000", "max_connections_per_device": "100000",
               "handshakes_per_source_per_sec": "0", "retry_pending_handshakes": "100000"},
}
arrays = {
    "device_ca": [{"name": '"dev"', "certificates": f'["{pki}/device-ca.pem"]',
                   "crl_files": f'["{pki}/device-ca.crl.pem"]'}],
    "application": [
        {"name": '"iperf"', "server_name": '"iperf.apps.example.test"',
         "upstream": f'"127.0.0.1:{iperf_port}"'},
        {"name": '"echo"', "server_name": '"echo.apps.example.test"', "upstream": f'"{echo_addr}"'},
    ],
}
for entry in sets:
    name, value = entry.split("=", 1)
    section, key = name.split(".", 1)
    if section in arrays:
        for table in arrays[section]:
            table[key] = value
    else:
        tables.setdefault(section, {})[key] = value
lines = []
for section, keys in tables.items():
    lines.append(f"[{section}]")
    lines += [f"{k} = {v}" for k, v in keys.items()]
for section, entries in arrays.items():
    for keys in entries:
        lines.append(f"[[{section}]]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
        if section == "application":
            lines += ["[application.access]", 'device_cas = ["dev"]',
                      'spiffe_prefixes = ["spiffe://example.test/device"]']
open(out, "w").write("\n".join(lines) + "\n")
PY
}
write_gateway_config "$work/ztgate.toml"

# Starts `ztgate serve` as NAME and sets $gateway_pid, $gateway_quic and $gateway_tls.
start_gateway() {
  # shellcheck disable=SC2086 # the wrapper is a command line, split on purpose
  ${ZTGATE_BENCH_WRAPPER:-} "$bin" serve --config "$work/ztgate.toml" >"$work/$1.out" 2>"$work/$1.log" &
  gateway_pid=$!
  pids+=("$gateway_pid")
  gateway_quic=$(wait_line "$work/$1.out" "ztgate: listening quic ")
  gateway_tls=$(wait_line "$work/$1.out" "ztgate: listening tls ")
}

# --- Servers and clients of the throughput setups. ${port[SETUP]} is the port that iperf3
# dials, and ${server[SETUP]} is the process whose CPU time is counted.
declare -A port server
if wants direct; then port[direct]=$iperf_port; fi

if wants quic || wants tls || wants handshakes; then
  start_gateway serve
  server[quic]=$gateway_pid
  server[tls]=$gateway_pid
fi
if wants quic; then
  start connect "$bin" connect --gateway "$gateway_quic" --app iperf.apps.example.test \
    --listen 127.0.0.1:0 "${device[@]}"
  tunnel=$(wait_line "$work/connect.log" "listening on ")
  port[quic]=${tunnel##*:}
fi
if wants tls; then
  start connect-tls "$bin" connect --transport tls --gateway "$gateway_quic" --gateway-tls "$gateway_tls" \
    --app iperf.apps.example.test --listen 127.0.0.1:0 "${device[@]}"
  tunnel=$(wait_line "$work/connect-tls.log" "listening on ")
  port[tls]=${tunnel##*:}
fi

if wants relay; then
  start relay-server "$relay_bin" server --listen 127.0.0.1:0 --upstream "127.0.0.1:$iperf_port"
  server[relay]=$started
  relay_addr=$(wait_line "$work/relay-server.log" "ready ")
  start relay-client "$relay_bin" client --listen 127.0.0.1:0 --server "$relay_addr"
  relay_client=$(wait_line "$work/relay-client.log" "ready ")
  port[relay]=${relay_client##*:}
fi

# stunnel server and HAProxy each serve two services: iperf3 for throughput and the echo
# server for handshakes. Both require a client certificate that chains to the root CA and
# check the CRLs of both CA levels, as ztgate checks the device CA's CRL.
stunnel_iperf=$(free_port); stunnel_echo=$(free_port)
haproxy_iperf=$(free_port); haproxy_echo=$(free_port)
if wants stunnel || wants haproxy || wants handshakes; then
  {
    printf 'foreground = yes\npid =\ndebug = 3\nsslVersionMin = TLSv1.3\n'
    for service in "iperf $stunnel_iperf 127.0.0.1:$iperf_port" "echo $stunnel_echo $echo_addr"; do
      read -r name accept connect <<<"$service"
      printf '[%s]\naccept = 127.0.0.1:%s\nconnect = %s\n' "$name" "$accept" "$connect"
      printf 'cert = %s\nkey = %s\n' "$pki/gateway-chain.pem" "$pki/gateway.key"
      printf 'CAfile = %s\nCRLfile = %s\nverifyChain = yes\nrequireCert = yes\n' \
        "$pki/root-ca.pem" "$pki/all.crl.pem"
    done
  } >"$work/stunnel-server.conf"
  start stunnel-server stunnel4 "$work/stunnel-server.conf"
  server[stunnel]=$started
  stunnel_server_pid=$started
  wait_port "$stunnel_iperf" stunnel-server

  cat >"$work/haproxy.cfg" <<CFG
global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend iperf
    bind 127.0.0.1:$haproxy_iperf ssl crt $pki/gateway-bundle.pem ca-file $pki/root-ca.pem verify required crl-file $pki/all.crl.pem ssl-min-ver TLSv1.3
    default_backend iperf
backend iperf
    server iperf3 127.0.0.1:$iperf_port
frontend echo
    bind 127.0.0.1:$haproxy_echo ssl crt $pki/gateway-bundle.pem ca-file $pki/root-ca.pem verify required crl-file $pki/all.crl.pem ssl-min-ver TLSv1.3
    default_backend echo
backend echo
    server echo $echo_addr
CFG
  # -db keeps HAProxy in the foreground as one process, so its PID is the one to measure.
  start haproxy haproxy -db -f "$work/haproxy.cfg"
  server[haproxy]=$started
  haproxy_pid=$started
  wait_port "$haproxy_iperf" haproxy
fi
if wants stunnel || wants haproxy; then
  port[stunnel]=$(free_port)
  port[haproxy]=$(free_port)
  {
    printf 'foreground = yes\npid =\ndebug = 3\n'
    for service in "stunnel ${port[stunnel]} $stunnel_iperf" "haproxy ${port[haproxy]} $haproxy_iperf"; do
      read -r name accept connect <<<"$service"
      printf '[%s]\nclient = yes\naccept = 127.0.0.1:%s\nconnect = 127.0.0.1:%s\n' "$name" "$accept" "$connect"
      printf 'cert = %s\nkey = %s\nCAfile = %s\nverifyChain = yes\ncheckHost = iperf.apps.example.test\n' \
        "$pki/DEV-0001-chain.pem" "$pki/DEV-0001.key" "$pki/root-ca.pem"
    done
  } >"$work/stunnel-client.conf"
  start stunnel-client stunnel4 "$work/stunnel-client.conf"
  wait_port "${port[stunnel]}" stunnel-client
  wants stunnel || unset 'port[stunnel]'
  wants haproxy || unset 'port[haproxy]'
fi

cpu_ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }
ticks_per_sec=$(getconf CLK_TCK)
results=$work/results.tsv
: >"$results"

# Runs iperf3 with $2 streams against port $1 and prints "bits_per_second bytes".
run_iperf() {
  timeout $((seconds + 30)) iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t "$seconds" -J >"$work/run.json"
  python3 - "$work/run.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d:
    sys.exit(f"bench.sh: iperf3 failed: {d['error']}")
s = d["end"]["sum_received"]
print(f'{s["bits_per_second"]:.0f} {s["bytes"]}')
PY
}

# --- Throughput, interleaved: every run goes through all setups before the next run.
order=()
for setup in $all_setups; do [ -n "${port[$setup]:-}" ] && order+=("$setup"); done
for i in $(seq 1 "$runs"); do
  for streams in 1 8; do
    for setup in "${order[@]}"; do
      pid=${server[$setup]:-}
      before=0
      [ -n "$pid" ] && before=$(cpu_ticks "$pid")
      read -r bps bytes < <(run_iperf "${port[$setup]}" "$streams")
      cpu=-
      if [ -n "$pid" ]; then
        cpu=$(python3 -c "print(($(cpu_ticks "$pid")-$before)/$ticks_per_sec/($bytes/2**30))")
      fi
      printf 'throughput\t%s\t%s\t%s\t%s\n' "$setup" "$streams" "$bps" "$cpu" >>"$results"
      echo "run $i, $streams stream(s), $setup: $(python3 -c "print(f'{$bps/1e9:.2f}')") Gbit/s" >&2
    done
  done
done

# --- New tunnels per second and server CPU per tunnel.
if wants handshakes; then
  targets=(
    "quic quic $gateway_quic $gateway_pid"
    "tls tls $gateway_tls $gateway_pid"
    "stunnel tls 127.0.0.1:$stunnel_echo $stunnel_server_pid"
    "haproxy tls 127.0.0.1:$haproxy_echo $haproxy_pid"
  )
  for i in $(seq 1 "$runs"); do
    for target in "${targets[@]}"; do
      read -r name transport addr pid <<<"$target"
      line=$(timeout $((handshake_seconds + 60)) "$load_bin" handshakes --transport "$transport" \
        --target "$addr" --server-name echo.apps.example.test "${device[@]}" \
        --seconds "$handshake_seconds" --server-pid "$pid")
      echo "run $i, handshakes, $name: $line" >&2
      printf 'handshakes\t%s\t-\t%s\n' "$name" "$line" >>"$results"
    done
  done
fi

# --- Gateway memory per idle tunnel, each transport on a fresh gateway.
if wants idle; then
  for spec in "quic $idle_quic" "tls $idle_tls"; do
    read -r transport count <<<"$spec"
    start_gateway "idle-$transport"
    addr=$gateway_quic
    [ "$transport" = tls ] && addr=$gateway_tls
    line=$(timeout 300 "$load_bin" idle --transport "$transport" --count "$count" \
      --target "$addr" --server-name echo.apps.example.test "${device[@]}" --server-pid "$gateway_pid")
    echo "idle, $transport: $line" >&2
    printf 'idle\t%s\t-\t%s\n' "$transport" "$line" >>"$results"
    kill "$gateway_pid"
  done
fi

# --- Report.
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), \
$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), \
Debian $(cat /etc/debian_version 2>/dev/null || echo '?'), Linux $(uname -r), $(rustc --version | cut -d' ' -f1-2)"
# sed and awk read all input, so the version commands get no SIGPIPE under pipefail.
versions="$(iperf3 --version | sed -n '1s/^\([^ ]* [^ ]*\).*/\1/p'), \
$(stunnel4 -version 2>&1 | awk '/^stunnel/ && !seen {print $1, $2; seen = 1}'), \
HAProxy $(haproxy -v | awk 'NR == 1 {print $3}')"
command_line="bash scripts/bench.sh${only:+ --only $only}"
for entry in "${sets[@]}"; do command_line+=" --set $entry"; done
report=$work/report.md
python3 scripts/bench_report.py "$results" "$runs" "$seconds" "$handshake_seconds" \
  "$command_line" "$machine" "$versions" "$load_before" "$load_after" >"$report"
echo
cat "$report"
if [ "$quick" = 0 ] && [ -z "$only" ]; then
  python3 scripts/bench_report.py --splice docs/benchmarks.md "$report"
  echo "bench.sh: wrote docs/benchmarks.md" >&2
fi
