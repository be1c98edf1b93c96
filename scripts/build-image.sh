#!/usr/bin/env bash
# Builds the fleetproxy image with no container registry and no daemon, then checks that its programs
# run. The same image as Containerfile describes, assembled from other sources:
#   - the root file system: Debian bookworm (minbase) with iptables, nftables, conntrack, kmod, iproute2
#     and ca-certificates, from the Debian package mirror (mmdebstrap), instead of debian:bookworm-slim;
#   - the binaries: `cargo build --release` here, instead of the rust:bookworm builder stage;
#   - the image: `buildah from scratch` with its own vfs storage under the output directory, written as
#     an OCI archive (load it with `podman load`, `docker load`, or push it with skopeo/buildah/podman).
# The check unpacks the archive with umoci and runs every program with --version in a chroot.
#
#   scripts/build-image.sh [OUT_DIR]     default OUT_DIR: target/image
#   IMAGE=registry.example/fleetproxy:dev scripts/build-image.sh
#
# Needs root (chroot, and mmdebstrap's root mode), and mmdebstrap, buildah and umoci; as root, it
# installs the missing ones with apt-get.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/image}
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/fleetproxy/Chart.yaml")
image=${IMAGE:-ghcr.io/fleetproxy/fleetproxy:$version}
suite=bookworm
packages=iptables,nftables,conntrack,kmod,iproute2,ca-certificates

log() { echo "[build-image] $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (mmdebstrap and the chroot check need it)"
missing=()
for tool in mmdebstrap buildah umoci; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$out/work
rm -rf "$work"
mkdir -p "$work"
store=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
    if [[ -n "${container:-}" ]]; then buildah "${store[@]}" rm "$container" >/dev/null 2>&1 || true; fi
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

log "building the binaries (cargo build --release)"
(cd "$root" && cargo build --release --locked -p fleetproxy-operator -p fleetproxy-agent)

log "building the $suite root file system with $packages (mmdebstrap)"
mmdebstrap --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/apt "$1"/var/log/dpkg.log' \
    "$suite" "$work/rootfs.tar" >&2

log "assembling $image (buildah from scratch, vfs storage)"
container=$(buildah "${store[@]}" from scratch)
buildah "${store[@]}" add "$container" "$work/rootfs.tar" / >/dev/null
buildah "${store[@]}" copy --chmod 0755 "$container" \
    "$root/target/release/fleetproxy-operator" "$root/target/release/fleetproxy-agent" /usr/local/bin/ >/dev/null
buildah "${store[@]}" config --user 0:0 --entrypoint '[]' --cmd '["fleetproxy-agent", "--help"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label org.opencontainers.image.source=https://github.com/fleetproxy/fleetproxy \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.licenses=Apache-2.0 "$container"
rm -f "$out/fleetproxy.oci.tar"
buildah "${store[@]}" commit --quiet --format oci --disable-compression=false "$container" "oci-archive:$out/fleetproxy.oci.tar:$image" >/dev/null

log "checking the image: unpacking it (umoci) and running its programs in a chroot"
mkdir -p "$work/layout"
tar -xf "$out/fleetproxy.oci.tar" -C "$work/layout"
umoci unpack --image "$work/layout:$image" "$work/bundle" >/dev/null
rootfs=$work/bundle/rootfs
check() {
    local got
    got=$(chroot "$rootfs" "$@" 2>&1 | tail -n1) || die "'$*' does not run in the image: $got"
    log "  $* -> $got"
}
check /usr/local/bin/fleetproxy-operator --version
check /usr/local/bin/fleetproxy-agent --version
check iptables --version
check iptables-restore --version
check nft --version
check conntrack --version
check modprobe --version
check ip -V
size=$(du -sh "$out/fleetproxy.oci.tar" | cut -f1)
log "done: $out/fleetproxy.oci.tar ($size), image $image"
log "  load: podman load -i $out/fleetproxy.oci.tar   (or: docker load -i ...)"
log "  push: skopeo copy oci-archive:$out/fleetproxy.oci.tar docker://$image"
echo "$out/fleetproxy.oci.tar"
