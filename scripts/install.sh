#!/usr/bin/env bash
# Installs ztgate on a Debian-like host: the release binary, the systemd
# units, the sysusers.d, tmpfiles.d and sysctl.d snippets, and an example
# config (kept when one exists). Run as root from the repository.
#
# Usage: bash scripts/install.sh [--prefix /usr] [--no-build]
set -euo pipefail

prefix=/usr
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift ;;
    --no-build) build=0 ;;
    *) echo "install.sh: unknown argument $1 (use --prefix DIR or --no-build)" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
cd "$(dirname "$0")/.."

if [ "$build" -eq 1 ]; then
  cargo build --release --locked
fi
install -D -m 0755 target/release/ztgate "$prefix/bin/ztgate"
install -D -m 0644 systemd/ztgate.service /etc/systemd/system/ztgate.service
install -D -m 0644 systemd/ztgate-connect@.service /etc/systemd/system/ztgate-connect@.service
install -D -m 0644 systemd/ztgate.socket /etc/systemd/system/ztgate.socket
install -D -m 0644 systemd/ztgate.sysusers /usr/lib/sysusers.d/ztgate.conf
install -D -m 0644 systemd/ztgate.tmpfiles /usr/lib/tmpfiles.d/ztgate.conf
install -D -m 0644 systemd/99-ztgate-udp-buffers.conf /etc/sysctl.d/99-ztgate-udp-buffers.conf
if [ "$prefix" != /usr ]; then
  sed -i "s|/usr/bin/ztgate|$prefix/bin/ztgate|g" /etc/systemd/system/ztgate.service /etc/systemd/system/ztgate-connect@.service
fi
if command -v systemd-sysusers >/dev/null; then systemd-sysusers; fi
if command -v systemd-tmpfiles >/dev/null; then systemd-tmpfiles --create /usr/lib/tmpfiles.d/ztgate.conf; fi
if [ ! -e /etc/ztgate/ztgate.toml ]; then
  install -D -m 0640 config/ztgate.example.toml /etc/ztgate/ztgate.toml
  install -D -m 0640 config/policy.rego /etc/ztgate/policy.rego
  install -D -m 0640 config/policy-data.json /etc/ztgate/policy-data.json
  echo "install.sh: wrote /etc/ztgate/ztgate.toml; edit it (certificates, device CAs, applications) before starting"
fi
sysctl --system >/dev/null 2>&1 || true
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
echo "install.sh: installed $prefix/bin/ztgate; start with: systemctl enable --now ztgate"
echo "install.sh: for socket activation, edit /etc/systemd/system/ztgate.socket to list the config's listen addresses, then: systemctl enable --now ztgate.socket"
echo "install.sh: key and token files must be owned by ztgate: chown ztgate:ztgate FILE; chmod 0600 FILE"
