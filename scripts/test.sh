#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, starts one real control plane for the
# run, runs every test of the workspace (unit, real kube-apiserver, network namespaces), stops it.
# Needs root for the kernel tests (network namespaces, iptables, nftables).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FLEETPROXY_CACHE:-$HOME/.cache/fleetproxy}
export PATH="$cache/tools:$PATH"
export FLEETPROXY_STATE=${FLEETPROXY_STATE:-/tmp/fleetproxy-test-controlplane}
controlplane=$root/tests/controlplane/controlplane.sh

"$root/scripts/setup.sh"

cd "$root"
echo "[test] building the workspace" >&2
cargo build --workspace --all-targets --locked

"$controlplane" start "$FLEETPROXY_STATE" >/dev/null
trap '"$controlplane" stop "$FLEETPROXY_STATE" >/dev/null 2>&1 || true' EXIT

echo "[test] running every test" >&2
cargo test --workspace --locked -- "$@"
