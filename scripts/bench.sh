#!/usr/bin/env bash
# Throughput benchmark on loopback: iperf3 through direct TCP and through a
# ztgate QUIC tunnel (ztgate connect -> ztgate serve -> iperf3 server), the
# runs of each setup interleaved, medians of three, plus the gateway's CPU
# time per GiB forwarded and the time from connect to admitted.
#
# Usage: scripts/bench.sh [--quick] [--seconds N]
#   --quick     one short run per setup (a smoke test, under a minute)
#   --seconds   length of each iperf3 run (default 10)
# Every process it starts listens on 127.0.0.1 only and is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
runs=3
seconds=10
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) runs=1; seconds=2 ;;
    --seconds) seconds=$2; shift ;;
    *) echo "bench.sh: unknown argument $1 (use --quick or --seconds N)" >&2; exit 2 ;;
  esac
  shift
done

need=()
for tool in iperf3 openssl python3; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --locked --quiet
bin=$root/target/release/ztgate
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

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

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

bash scripts/dev-pki.sh "$work/pki" >/dev/null
iperf_port=$(free_port)
iperf3 -s -B 127.0.0.1 -p "$iperf_port" >"$work/iperf3.log" 2>&1 &
pids+=($!)

cat >"$work/ztgate.toml" <<TOML
[gateway]
listen = ["127.0.0.1:0"]
listen_tls = ["127.0.0.1:0"]
certificate = "$work/pki/gateway-chain.pem"
private_key = "$work/pki/gateway.key"
[log]
level = "warn"
[identity]
hardware_bound_oid = "1.3.6.1.4.1.55555.1.1"
[[device_ca]]
name = "dev"
certificates = ["$work/pki/device-ca.pem"]
[[application]]
name = "iperf"
server_name = "iperf.apps.example.test"
upstream = "127.0.0.1:$iperf_port"
[application.access]
device_cas = ["dev"]
spiffe_prefixes = ["spiffe://example.test/device"]
TOML
"$bin" serve --config "$work/ztgate.toml" >"$work/serve.out" 2>"$work/serve.err" &
serve_pid=$!
pids+=("$serve_pid")
gateway=$(wait_line "$work/serve.out" "ztgate: listening quic ")
gateway_tls=$(wait_line "$work/serve.out" "ztgate: listening tls ")

"$bin" connect --gateway "$gateway" --app iperf.apps.example.test --listen 127.0.0.1:0 \
  --cert "$work/pki/DEV-0001-chain.pem" --key "$work/pki/DEV-0001.key" --ca "$work/pki/root-ca.pem" \
  2>"$work/connect.err" &
pids+=($!)
tunnel=$(wait_line "$work/connect.err" "listening on ")
tunnel_port=${tunnel##*:}

"$bin" connect --transport tls --gateway "$gateway" --gateway-tls "$gateway_tls" --app iperf.apps.example.test \
  --listen 127.0.0.1:0 --cert "$work/pki/DEV-0001-chain.pem" --key "$work/pki/DEV-0001.key" \
  --ca "$work/pki/root-ca.pem" 2>"$work/connect-tls.err" &
pids+=($!)
tls_tunnel=$(wait_line "$work/connect-tls.err" "listening on ")
tls_port=${tls_tunnel##*:}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_per_sec=$(getconf CLK_TCK)

# Runs iperf3 against port $1 and prints "bits_per_second bytes".
run_iperf() {
  iperf3 -c 127.0.0.1 -p "$1" -t "$seconds" -J >"$work/run.json"
  python3 - "$work/run.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["end"]["sum_received"]
print(f'{s["bits_per_second"]:.0f} {s["bytes"]}')
PY
}

declare -a direct=() quic=() quic_cpu=() tls=() tls_cpu=()
for i in $(seq 1 "$runs"); do
  read -r bps _ < <(run_iperf "$iperf_port")
  direct+=("$bps")
  before=$(cpu_ticks "$serve_pid")
  read -r bps bytes < <(run_iperf "$tunnel_port")
  after=$(cpu_ticks "$serve_pid")
  quic+=("$bps")
  quic_cpu+=("$(python3 -c "print(($after-$before)/$ticks_per_sec/($bytes/2**30))")")
  before=$(cpu_ticks "$serve_pid")
  read -r bps bytes < <(run_iperf "$tls_port")
  after=$(cpu_ticks "$serve_pid")
  tls+=("$bps")
  tls_cpu+=("$(python3 -c "print(($after-$before)/$ticks_per_sec/($bytes/2**30))")")
  echo "run $i: direct ${direct[-1]} bit/s, ztgate quic ${quic[-1]} bit/s, ztgate tls ${tls[-1]} bit/s" >&2
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
d=$(median "${direct[@]}")
q=$(median "${quic[@]}")
c=$(median "${quic_cpu[@]}")
t=$(median "${tls[@]}")
tc=$(median "${tls_cpu[@]}")

latency=$(cargo bench --quiet --bench connect -- 200 2>/dev/null | grep 'connect to admitted' || true)

echo
echo "| setup | Gbit/s (median of $runs x ${seconds}s) | ratio to direct | gateway CPU s per GiB |"
echo "| --- | --- | --- | --- |"
python3 - "$d" "$q" "$c" "$t" "$tc" <<'PY'
import sys
d, q, c, t, tc = (float(x) for x in sys.argv[1:])
print(f"| direct TCP | {d/1e9:.2f} | 1.00 | - |")
print(f"| ztgate QUIC tunnel, 1 stream | {q/1e9:.2f} | {q/d:.2f} | {c:.2f} |")
print(f"| ztgate TLS-over-TCP tunnel, 1 stream | {t/1e9:.2f} | {t/d:.2f} | {tc:.2f} |")
PY
echo
echo "$latency"
