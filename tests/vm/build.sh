#!/usr/bin/env bash
# Builds what the IPVS VM test boots, from Debian packages, cached under $FLEETPROXY_VM_CACHE
# (default ~/.cache/fleetproxy/vm):
#   vmlinux-<ver>        the uncompressed kernel of linux-image-amd64 (boots through its PVH entry,
#                        about twice as fast under TCG as the bzImage), or the bzImage if that fails
#   initramfs.cpio.gz    busybox-static, iproute2's ip, ipvsadm (assertions only), iptables, nft,
#                        kmod, the netfilter/IPVS/veth/dummy modules with a depmod'ed tree, the
#                        self-test binary (node-agent/examples/ipvs_selftest.rs) and tests/vm/init
# Usage: build.sh SELFTEST_BINARY      prints "KERNEL=<path>" and "INITRD=<path>"
# Installs qemu-system-x86 linux-image-amd64 busybox-static iproute2 ipvsadm kmod cpio when missing.
set -euo pipefail

selftest=${1:?usage: build.sh SELFTEST_BINARY}
here=$(cd "$(dirname "$0")" && pwd)
cache=${FLEETPROXY_VM_CACHE:-$HOME/.cache/fleetproxy/vm}
mkdir -p "$cache"

log() { echo "[vm-build] $*" >&2; }

kernel_version() {
    local dir
    for dir in $(ls -d /lib/modules/*-amd64 2>/dev/null | sort -V -r); do
        if [[ -d $dir/kernel/net/netfilter/ipvs && -f /boot/vmlinuz-$(basename "$dir") ]]; then
            basename "$dir"
            return
        fi
    done
}

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[[ -x /bin/busybox ]] && /bin/busybox --list | grep -qx ash || need+=(busybox-static)
[[ -n $(kernel_version) ]] || need+=(linux-image-amd64)
command -v ipvsadm >/dev/null || need+=(ipvsadm)
[[ -x /usr/sbin/ip || -x /sbin/ip || -x /usr/bin/ip ]] || need+=(iproute2)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
command -v nft >/dev/null || need+=(nftables)
command -v iptables-restore >/dev/null || need+=(iptables)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends "${need[@]}" >&2; }
fi

ver=$(kernel_version)
[[ -n $ver ]] || { log "no kernel with IPVS modules in /lib/modules"; exit 1; }

# --- the kernel: vmlinux extracted from the bzImage's XZ/gzip/zstd payload ---
kernel=$cache/vmlinux-$ver
if [[ ! -s $kernel ]]; then
    log "extracting vmlinux from /boot/vmlinuz-$ver"
    if python3 - "/boot/vmlinuz-$ver" "$kernel.tmp" <<'PY'
import lzma, gzip, sys, zlib
data = open(sys.argv[1], "rb").read()
def try_xz(i):
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    return d.decompress(data[i:])
def try_gz(i):
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return d.decompress(data[i:])
for magic, fn in ((b"\xfd7zXZ\x00", try_xz), (b"\x1f\x8b\x08", try_gz)):
    i = data.find(magic)
    while i != -1:
        try:
            out = fn(i)
            if out[:4] == b"\x7fELF":
                open(sys.argv[2], "wb").write(out)
                sys.exit(0)
        except Exception:
            pass
        i = data.find(magic, i + 1)
sys.exit(1)
PY
    then
        mv "$kernel.tmp" "$kernel"
    else
        log "cannot extract vmlinux; booting the bzImage (slower)"
        rm -f "$kernel.tmp"
        cp "/boot/vmlinuz-$ver" "$kernel"
    fi
fi

# --- the module tree (cached per kernel version) ---
modroot=$cache/modules-$ver
if [[ ! -f $modroot/.done ]]; then
    log "collecting modules of $ver"
    rm -rf "$modroot"
    src=/lib/modules/$ver
    mkdir -p "$modroot/lib/modules/$ver"
    for path in kernel/net/netfilter kernel/net/ipv4/netfilter kernel/net/ipv6/netfilter \
        kernel/drivers/net/dummy.ko kernel/drivers/net/veth.ko kernel/lib/libcrc32c.ko \
        kernel/crypto/crc32c_generic.ko kernel/net/sctp kernel/lib/crypto; do
        [[ -e $src/$path ]] || continue
        mkdir -p "$modroot/lib/modules/$ver/$(dirname "$path")"
        cp -a "$src/$path" "$modroot/lib/modules/$ver/$(dirname "$path")/"
    done
    cp "$src"/modules.builtin* "$src"/modules.order "$modroot/lib/modules/$ver/" 2>/dev/null || true
    depmod -b "$modroot" "$ver"
    touch "$modroot/.done"
fi

# --- the root file system ---
root=$cache/root
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,proc,sys,dev,run,tmp,var,root}
cp -a "$modroot/lib/modules" "$root/lib/"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
done

# Dynamically linked tools with their libraries (the guest has no package manager).
copy_with_libs() {
    local file=$1 dest=$2
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$file" "$root$dest"
    ldd "$file" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        [[ -e $root$lib ]] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
ipbin=$(command -v ip || echo /usr/sbin/ip)
copy_with_libs "$(readlink -f "$ipbin")" /usr/sbin/ip
copy_with_libs "$(command -v ipvsadm)" /usr/sbin/ipvsadm
copy_with_libs "$(command -v nft)" /usr/sbin/nft
copy_with_libs /usr/bin/kmod /usr/bin/kmod
for tool in modprobe insmod lsmod depmod; do
    ln -sf /usr/bin/kmod "$root/usr/sbin/$tool"
    ln -sf /usr/bin/kmod "$root/sbin/$tool" # the kernel's module autoloader runs /sbin/modprobe
done
xtables=$(readlink -f "$(command -v iptables-restore)")
copy_with_libs "$xtables" "/usr/sbin/$(basename "$xtables")"
for tool in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf "$(basename "$xtables")" "$root/usr/sbin/$tool"
done
# The extensions (libxt_*.so), where iptables was built to look for them.
xtlib=
for dir in /usr/lib/x86_64-linux-gnu/xtables /usr/lib64/xtables /usr/lib/xtables; do
    [[ -d $dir ]] && { xtlib=$dir; break; }
done
if [[ -n $xtlib ]]; then
    mkdir -p "$root$xtlib"
    for so in "$xtlib"/*.so; do copy_with_libs "$so" "$so"; done
else
    log "no iptables extensions in $xtlib"
fi
mkdir -p "$root/etc/iproute2" "$root/var/run/netns"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
printf '6\ttcp\n17\tudp\n132\tsctp\n' | awk '{print $2"\t"$1"\t"toupper($2)}' >"$root/etc/protocols"

# The self-test (a dynamically linked example: no separate static build of the whole workspace).
copy_with_libs "$selftest" /bin/ipvs_selftest
strip --strip-debug "$root/bin/ipvs_selftest" 2>/dev/null || true
cp "$here/init" "$root/init"
chmod +x "$root/init"

initrd=$cache/initramfs.cpio.gz
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 >"$initrd.tmp")
mv "$initrd.tmp" "$initrd"
log "kernel $kernel, initramfs $(du -h "$initrd" | cut -f1)"
echo "KERNEL=$kernel"
echo "INITRD=$initrd"
