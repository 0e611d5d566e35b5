#!/usr/bin/env bash
# Prepares the User-Mode Linux guest that runs the kernel-WireGuard tests (see README.md beside
# this file). Two routes, chosen by what this CPU allows:
#
# Route A (default): Debian's `user-mode-linux` kernel (6.1, built WITHOUT WireGuard) +
#   wireguard.ko and the two lib/crypto modules it needs, built from EXACTLY the kernel source the
#   UML binary was built from. The modules land in /var/cache/lemonade-nexus/uml/modroot, which run-in-uml.sh loads
#   with `modprobe -d`. About 30 s plus a 138 MB download.
# Route B (only where Debian's binary cannot run): Debian's UML 6.1 binary hard-codes a 2696-byte
#   XSAVE buffer, and the host kernel demands the CPU's exact XSAVE size for ptrace; CPUs with AMX
#   have 11008 bytes, and the binary dies at its first process ("ptrace set fp regs failed, errno
#   = 14"). There, build-kernel.sh builds a small UML kernel with WireGuard built in, patched for
#   this CPU's size, into /var/cache/lemonade-nexus/uml/linux-wg. About 7 minutes on 2 idle cores.
#
# Each result is cached with a key (package versions, the scripts' text, the XSAVE size) and not
# rebuilt while the key matches.
#
# Run as root (apt-get). Env: UML_PACKAGE_VERSION (default pinned below), UML_CACHE (cache dir),
# NO_APT=1 (packages already installed), KEEP_UML_BUILD=1 (keep the extracted kernel tree).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${UML_CACHE:-/var/cache/lemonade-nexus/uml}
MODROOT=$CACHE/modroot
WORK=$CACHE/build

# The UML package these modules are built for. Its `Built-Using: linux (= X)` names the kernel
# source version; bookworm-security carries NEWER linux-source-6.1 versions that must not be used.
UML_PACKAGE_VERSION=${UML_PACKAGE_VERSION:-6.1um4+b13}

die() { echo "tests/uml/setup.sh: $*" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

if [ "${NO_APT:-0}" != 1 ]; then
    apt-get install -y -qq --no-install-recommends --allow-downgrades \
        "user-mode-linux=$UML_PACKAGE_VERSION" wireguard-tools iproute2 kmod procps \
        gcc make flex bison bc xz-utils netcat-openbsd iputils-ping >/dev/null \
        || die "cannot install user-mode-linux=$UML_PACKAGE_VERSION (pinned; see README.md to move the pin)"
fi
HAVE_UML=$(dpkg-query -W -f='${Version}' user-mode-linux 2>/dev/null || true)
[ "$HAVE_UML" = "$UML_PACKAGE_VERSION" ] \
    || die "user-mode-linux $HAVE_UML is installed, but the pin is $UML_PACKAGE_VERSION"
SRCVER=$(dpkg-query -W -f='${Built-Using}' user-mode-linux | sed -n 's/.*linux (= \([^)]*\)).*/\1/p')
[ -n "$SRCVER" ] || die "cannot read Built-Using of user-mode-linux"
UMLREL=$(ls /usr/lib/uml/modules/)
[ "$(echo "$UMLREL" | wc -l)" = 1 ] || die "expected one dir in /usr/lib/uml/modules, got: $UMLREL"

# Cache key: package versions + this script's own text (a changed recipe rebuilds).
KEY="uml=$UML_PACKAGE_VERSION src=$SRCVER rel=$UMLREL script=$(sha256sum "$0" | cut -c1-16)"
D="$MODROOT/lib/modules/$UMLREL"
XSIZE=$("$HERE/xsave-size.sh")
if [ "$XSIZE" != 2696 ]; then
    # Route B: Debian's binary cannot run on this CPU (see the top of this file).
    # Keyed on the kernel recipe only (not this script), so editing setup.sh does not cost a rebuild.
    KKEY="src=$SRCVER xsave=$XSIZE recipe=$(cat "$HERE/build-kernel.sh" "$HERE/xsave-size.sh" | sha256sum | cut -c1-16)"
    if [ -x "$CACHE/linux-wg" ] && [ "$(cat "$CACHE/linux-wg.key" 2>/dev/null)" = "$KKEY" ]; then
        echo "tests/uml/setup.sh: patched UML kernel up to date ($KKEY)"
        exit 0
    fi
    echo "tests/uml/setup.sh: this CPU's XSAVE area is $XSIZE bytes, Debian's UML binary expects 2696;"
    echo "tests/uml/setup.sh: building a patched UML kernel with WireGuard built in (Route B, ~7 min)"
    if [ "${NO_APT:-0}" != 1 ]; then
        apt-get install -y -qq --no-install-recommends --allow-downgrades "linux-source-6.1=$SRCVER" >/dev/null \
            || die "cannot install linux-source-6.1=$SRCVER"
    fi
    mkdir -p "$CACHE"
    rm -f "$CACHE/linux-wg" "$CACHE/linux-wg.key"
    WORK="$CACHE/kbuild" bash "$HERE/build-kernel.sh" "$CACHE/linux-wg"
    [ "${KEEP_UML_BUILD:-0}" = 1 ] || rm -rf "$CACHE/kbuild"
    echo "$KKEY" > "$CACHE/linux-wg.key"
    UML_LINUX="$CACHE/linux-wg" bash "$HERE/run-in-uml.sh" --no-modules -- ip link add lnprobe0 type wireguard \
        || die "the patched UML kernel does not boot or has no WireGuard"
    echo "tests/uml/setup.sh: patched UML kernel ready: $CACHE/linux-wg"
    exit 0
fi

if [ -f "$MODROOT/.cache-key" ] && [ "$(cat "$MODROOT/.cache-key")" = "$KEY" ] \
    && [ -f "$D/extra/wireguard.ko" ] && [ -e "$D/kernel" ]; then
    echo "tests/uml/setup.sh: module root up to date ($KEY)"
    exit 0
fi

if [ "${NO_APT:-0}" != 1 ]; then
    apt-get install -y -qq --no-install-recommends --allow-downgrades "linux-source-6.1=$SRCVER" >/dev/null \
        || die "cannot install linux-source-6.1=$SRCVER (the source user-mode-linux was built from)"
fi
HAVE_SRC=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || true)
[ "$HAVE_SRC" = "$SRCVER" ] || die "linux-source-6.1 $HAVE_SRC installed, $SRCVER required (Built-Using)"

echo "tests/uml/setup.sh: building wireguard.ko for UML $UMLREL from linux-source-6.1=$SRCVER"
rm -rf "$WORK"
mkdir -p "$WORK"
tar -C "$WORK" -xf /usr/src/linux-source-6.1.tar.xz
cd "$WORK/linux-source-6.1"
zcat /usr/share/doc/user-mode-linux/config.gz > .config
cp .config .config.debian-uml
./scripts/config --module WIREGUARD --disable WIREGUARD_DEBUG
make ARCH=um olddefconfig >/dev/null
# Enabling WireGuard may only ADD modules; a changed built-in would not match the shipped binary.
BAD=$( (diff .config.debian-uml .config || true) | grep '^>' | grep -v -e '=m$' -e 'is not set$' || true)
[ -z "$BAD" ] || die "enabling WireGuard changed built-in options, refusing: $BAD"
KREL=$(make ARCH=um -s kernelrelease)
[ "$KREL" = "$UMLREL" ] || die "kernelrelease $KREL != UML modules dir $UMLREL"

JOBS=$(nproc)
make ARCH=um -j"$JOBS" modules_prepare >/dev/null
# There is no Module.symvers for Debian's UML kernel: modpost's undefined-symbol warnings are
# expected (no MODVERSIONS, so symbols resolve by name at load time). Only vermagic must match.
make ARCH=um -j"$JOBS" KBUILD_MODPOST_WARN=1 M=lib/crypto modules >build-crypto.log 2>&1 \
    || { tail -30 build-crypto.log >&2; die "building lib/crypto modules failed"; }
make ARCH=um -j"$JOBS" KBUILD_MODPOST_WARN=1 KBUILD_EXTRA_SYMBOLS="$PWD/lib/crypto/Module.symvers" \
    M=drivers/net/wireguard modules >build-wg.log 2>&1 \
    || { tail -30 build-wg.log >&2; die "building wireguard.ko failed"; }

VERMAGIC=$(modinfo -F vermagic drivers/net/wireguard/wireguard.ko)
WANT=$(modinfo -F vermagic "$(find "/usr/lib/uml/modules/$UMLREL/kernel" -name veth.ko | head -1)")
[ "$VERMAGIC" = "$WANT" ] || die "vermagic '$VERMAGIC' of wireguard.ko != '$WANT' of the shipped modules"

rm -rf "$MODROOT"
mkdir -p "$D/extra"
ln -s "/usr/lib/uml/modules/$UMLREL/kernel" "$D/kernel"
cp /usr/lib/uml/modules/"$UMLREL"/modules.{order,builtin,builtin.modinfo} "$D/"
cp lib/crypto/libcurve25519-generic.ko lib/crypto/libcurve25519.ko \
    lib/crypto/libchacha20poly1305.ko drivers/net/wireguard/wireguard.ko "$D/extra/"
depmod -b "$MODROOT" "$UMLREL"
grep -q '^extra/wireguard.ko' "$D/modules.dep" || die "depmod did not index wireguard.ko"
echo "$KEY" > "$MODROOT/.cache-key"

cd "$REPO"
[ "${KEEP_UML_BUILD:-0}" = 1 ] || rm -rf "$WORK"
bash "$HERE/run-in-uml.sh" -- ip link add lnprobe0 type wireguard \
    || die "Debian's UML kernel with the built modules does not boot or has no WireGuard"
echo "tests/uml/setup.sh: module root ready: $MODROOT ($VERMAGIC)"
