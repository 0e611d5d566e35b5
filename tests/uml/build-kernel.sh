#!/usr/bin/env bash
# Route B: a small UML kernel with WireGuard, veth, IPv6, netns and hostfs built in (no modules),
# from linux-source-6.1, PATCHED for hosts whose XSAVE area is larger than UML 6.1 expects.
#
# Why: UML saves and restores each guest process's FPU state with PTRACE_{GET,SET}REGSET
# NT_X86_XSTATE on a buffer of a fixed 2696 bytes (the AVX-512 layout). The host kernel accepts
# PTRACE_SETREGSET only with a buffer of exactly its full XSAVE size, which is 11008 bytes on CPUs
# with AMX (Intel Sapphire Rapids and later). Debian's UML binary therefore dies at the first
# guest process with "ptrace set fp regs failed, errno = 14" on such hosts. Upstream fixed this
# after 6.1 by sizing the buffer from CPUID; here the size is taken from this host's CPUID at build
# time (the cache key records it, and run-in-uml.sh refuses a kernel built for another size), and
# the kernel stack grows to 32 KiB because UML keeps one such buffer in thread_info on the stack.
#
# Usage: build-kernel.sh OUTPUT   (about 7 minutes on 2 cores). Needs linux-source-6.1 installed.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: build-kernel.sh OUTPUT}")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${WORK:-$(dirname "$OUT")/kbuild}
die() { echo "tests/uml/build-kernel.sh: $*" >&2; exit 1; }

XSIZE=$("$HERE/xsave-size.sh")
[ "$XSIZE" -ge 2696 ] || XSIZE=2696

rm -rf "$WORK"
mkdir -p "$WORK"
tar -C "$WORK" -xf /usr/src/linux-source-6.1.tar.xz
cd "$WORK/linux-source-6.1"
grep -q 'DEFINE_LONGS(HOST_FP_SIZE, 2696);' arch/x86/um/user-offsets.c \
    || die "arch/x86/um/user-offsets.c changed; the XSAVE-size patch no longer applies"
sed -i "s/DEFINE_LONGS(HOST_FP_SIZE, 2696);/DEFINE_LONGS(HOST_FP_SIZE, $XSIZE);/" arch/x86/um/user-offsets.c

make ARCH=um defconfig >/dev/null
./scripts/config --enable NET_NS --enable VETH --enable IPV6 --enable WIREGUARD \
    --enable HOSTFS --enable DEVTMPFS --enable DEVTMPFS_MOUNT --enable TMPFS \
    --enable UNIX --enable INET --enable BINFMT_ELF --enable BINFMT_SCRIPT \
    --enable MAGIC_SYSRQ --disable RAID6_PQ_BENCHMARK \
    --enable IP_ADVANCED_ROUTER --enable IP_MULTIPLE_TABLES --enable IPV6_MULTIPLE_TABLES \
    --enable TUN --enable DUMMY --enable BRIDGE --enable NET_SCHED \
    --enable NETFILTER --enable NF_CONNTRACK --enable NF_NAT --enable NF_TABLES \
    --enable NF_TABLES_INET --enable NFT_CT --enable NFT_NAT --enable NFT_MASQ \
    --set-val KERNEL_STACK_ORDER 3
make ARCH=um olddefconfig >/dev/null
# Policy routing (the mesh's dedicated table and its rules), TUN (wireguard-go) and nftables are
# what the tests use besides WireGuard itself.
for o in WIREGUARD VETH NET_NS IPV6 HOSTFS IP_MULTIPLE_TABLES IPV6_MULTIPLE_TABLES TUN NF_TABLES; do
    grep -q "^CONFIG_$o=y" .config || die "CONFIG_$o not built in"
done
grep -q '^CONFIG_KERNEL_STACK_ORDER=3$' .config || die "kernel stack order not set"
make ARCH=um -j"$(nproc)" linux >build.log 2>&1 || { tail -30 build.log >&2; die "kernel build failed"; }
strip -o "$OUT" linux
echo "built $OUT ($(make ARCH=um -s kernelrelease), XSAVE size $XSIZE)"
