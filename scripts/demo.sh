#!/usr/bin/env bash
# The local demo: a real control plane, the operator installed by the Helm chart, three simulated
# nodes (network namespaces) running real agents, sample Services with real backends, and a switch
# of the whole fleet from iptables to nftables while requests keep flowing.
#
#   scripts/demo.sh            interactive: waits for Enter between steps, Ctrl-C cleans up and quits
#   DEMO_SMOKE=1 scripts/demo.sh   runs straight through and exits (what the smoke test does)
#
# Needs root (network namespaces, iptables, nftables). A first run installs the tools and builds
# everything it needs (the control plane from source takes about 10 minutes), and says so.
# The demo removes what it created when it ends; this script stops the control plane it started
# (keep it with DEMO_KEEP_CONTROLPLANE=1).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FLEETPROXY_CACHE:-$HOME/.cache/fleetproxy}
export PATH="$cache/tools:$PATH"
state=${FLEETPROXY_STATE:-/tmp/fleetproxy-demo-controlplane}
controlplane=$root/tests/controlplane/controlplane.sh

say() { printf '[demo] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  say "the demo creates network namespaces and programs iptables and nftables: run it as root (sudo $0)"
  exit 1
fi

say "checking the tools (iptables, nftables, helm, kubectl, the control plane binaries)"
"$root/scripts/setup.sh" >/dev/null

cd "$root"
say "building the operator, the agent and the demo (cargo build; the first build takes a few minutes)"
cargo build -p fleetproxy-operator -p fleetproxy-agent -p fleetproxy-tests --bin fleetproxy-demo

say "starting a control plane (etcd, kube-apiserver, kube-controller-manager) in $state"
kubeconfig=$("$controlplane" start "$state" | tail -n 1)
if [[ ${DEMO_KEEP_CONTROLPLANE:-0} != 1 ]]; then
  trap '"$controlplane" stop "$state" >/dev/null 2>&1 || true' EXIT
fi

target=${CARGO_TARGET_DIR:-$root/target}
FLEETPROXY_KUBECONFIG=$kubeconfig "$target/debug/fleetproxy-demo"
