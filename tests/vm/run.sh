#!/usr/bin/env bash
# Boots the IPVS test VM (tests/vm/build.sh builds it) under qemu and prints its console.
# Usage: run.sh SELFTEST_BINARY
# Software emulation (-accel tcg) unless FLEETPROXY_VM_KVM=1: the /dev/kvm of some build machines is
# paravirtual and cannot run a stock kernel. Exit status: qemu's (124 on timeout).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
selftest=${1:?usage: run.sh SELFTEST_BINARY}
eval "$("$here/build.sh" "$selftest" | grep -E '^(KERNEL|INITRD)=')"
accel=tcg
[[ ${FLEETPROXY_VM_KVM:-0} == 1 && -w /dev/kvm ]] && accel=kvm
started=$(date +%s.%N)
status=0
timeout "${FLEETPROXY_VM_TIMEOUT:-600}" qemu-system-x86_64 -accel "$accel" -m 1024 -smp 1 -nographic -no-reboot \
    -nodefaults -serial stdio -kernel "$KERNEL" -initrd "$INITRD" \
    -append 'console=ttyS0 panic=-1 quiet' </dev/null || status=$?
echo "VM WALLCLOCK seconds=$(echo "$(date +%s.%N) - $started" | bc 2>/dev/null || echo '?')"
exit $status
