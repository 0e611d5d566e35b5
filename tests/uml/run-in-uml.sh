#!/bin/bash
# run-in-uml.sh - run a host command inside a User-Mode-Linux guest that has
# real in-kernel WireGuard (wireguard.ko loaded) and veth available.
#
# Usage: run-in-uml.sh [options] [--] COMMAND [ARGS...]
#   -m, --mem SIZE       guest RAM (default: $UML_MEM or 512M)
#   -t, --timeout SECS   wall-clock limit for the whole VM (default: $UML_TIMEOUT or 600)
#       --tmpfs DIR      mount a fresh tmpfs on DIR inside the guest (repeatable)
#       --module NAME    also modprobe NAME inside the guest (repeatable)
#       --no-modules     load no modules (kernel with WireGuard/veth built in)
#       --keep           keep the per-run directory (console log etc.)
#   -v, --verbose        echo the guest kernel console to stderr
#
# The guest root is the host's / via hostfs, so COMMAND (and the libraries it
# needs) are simply the host's files; the guest runs it as guest-root with the
# caller's exported environment and current directory. COMMAND's stdout and
# stderr are streamed to this script's stdout/stderr; the exit status of
# COMMAND becomes this script's exit status (124 = VM timeout, 125 = VM/setup
# failure, see console log).
#
# Network: the guest has NO network device to the outside (no eth0, no tap,
# no slirp); all traffic stays inside the guest (lo, veth, wireguard).
#
# Env overrides: UML_LINUX (kernel binary, default /usr/bin/linux.uml),
# UML_MODROOT (dir containing lib/modules/<ver>/ with the extra wireguard
# modules + depmod output; default: $UML_CACHE/modroot, built by setup.sh),
# UML_CACHE (setup.sh's output dir, default /var/cache/lemonade-nexus/uml: outside the checkout, so a fresh clone on the same machine reuses the 7-minute kernel build).
#
# Adapted from shared/reference/uml/run-in-uml.sh: the module root lives in the repository's
# target dir, and it is checked against the installed user-mode-linux package before booting
# (modules built for another UML build would fail to load, or worse, load and misbehave).

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${UML_CACHE:-/var/cache/lemonade-nexus/uml}   # where setup.sh put its results
UML_MODROOT=${UML_MODROOT:-$CACHE/modroot}
NO_MODULES=0
if [ -z "${UML_LINUX:-}" ]; then
  # Debian's binary runs only where the CPU's XSAVE area is the 2696 bytes it was built for;
  # elsewhere setup.sh built a patched kernel for this CPU (Route B, WireGuard built in).
  XSIZE=$("$HERE/xsave-size.sh")
  if [ "$XSIZE" = 2696 ]; then
    UML_LINUX=/usr/bin/linux.uml
  else
    UML_LINUX=$CACHE/linux-wg
    grep -q "xsave=$XSIZE " "$UML_LINUX.key" 2>/dev/null || {
      echo "run-in-uml: this CPU needs a UML kernel patched for its $XSIZE-byte XSAVE area;" \
           "$UML_LINUX is missing or built for another size: run tests/uml/setup.sh as root" >&2; exit 125; }
    NO_MODULES=1
  fi
fi
MEM=${UML_MEM:-512M}
TIMEOUT=${UML_TIMEOUT:-600}
VERBOSE=0
KEEP=0
TMPFS_DIRS=()
MODULES=(wireguard veth)

[ "$NO_MODULES" = 1 ] && { MODULES=(); UML_MODROOT=none; }
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--mem) MEM=$2; shift 2;;
    -t|--timeout) TIMEOUT=$2; shift 2;;
    --tmpfs) TMPFS_DIRS+=("$2"); shift 2;;
    --module) MODULES+=("$2"); shift 2;;
    --no-modules) MODULES=(); UML_MODROOT=none; shift;;
    --keep) KEEP=1; shift;;
    -v|--verbose) VERBOSE=1; shift;;
    --) shift; break;;
    -*) echo "run-in-uml: unknown option $1" >&2; exit 125;;
    *) break;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [options] [--] COMMAND [ARGS...]" >&2; exit 125; }
[ -x "$UML_LINUX" ] || { echo "run-in-uml: $UML_LINUX not found (apt-get install user-mode-linux)" >&2; exit 125; }
[ "$UML_MODROOT" = none ] || [ -d "$UML_MODROOT/lib/modules" ] || { echo "run-in-uml: no modules under $UML_MODROOT (run tests/uml/setup.sh as root)" >&2; exit 125; }
if [ "$UML_MODROOT" != none ] && [ "$UML_LINUX" = /usr/bin/linux.uml ]; then
  # The modules must have been built for exactly the installed UML package.
  have=$(dpkg-query -W -f='${Version}' user-mode-linux 2>/dev/null || echo none)
  grep -q "uml=$have " "$UML_MODROOT/.cache-key" 2>/dev/null || {
    echo "run-in-uml: $UML_MODROOT was built for '$(cat "$UML_MODROOT/.cache-key" 2>/dev/null)'," \
         "but user-mode-linux $have is installed: run tests/uml/setup.sh again" >&2; exit 125; }
fi

# Per-run dir; it must be reachable from the guest at the same path (hostfs
# root = host /), so it must not be under a --tmpfs dir -- fds are opened
# before the tmpfs mounts, so this works even if it is.
RUNDIR=$(mktemp -d "${UML_RUNDIR_BASE:-/tmp}/uml-run.XXXXXX") || exit 125
chmod 755 "$RUNDIR"
cleanup() { [ "$KEEP" = 1 ] || rm -rf "$RUNDIR"; }
trap cleanup EXIT
: > "$RUNDIR/stdout"; : > "$RUNDIR/stderr"

# Environment to recreate inside the guest (bash 'declare -x' format),
# minus variables that are read-only or meaningless in the guest.
export -p | grep -vE '^declare -[a-zA-Z]*x[a-zA-Z]* (BASHOPTS|SHELLOPTS|BASH_[A-Z_]*|EUID|PPID|UID|SHLVL|OLDPWD|PWD|_)(=|$)' > "$RUNDIR/env.sh"

q() { printf '%q ' "$@"; }
{
  echo '#!/bin/bash'
  echo "# generated by run-in-uml.sh; runs as PID 1 inside the UML guest"
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  echo "RUNDIR=$(q "$RUNDIR")"
  cat <<'EOF'
# open output/status fds first: they stay valid even if a --tmpfs mount hides $RUNDIR later
exec 3>"$RUNDIR/stdout" 4>"$RUNDIR/stderr" 5>"$RUNDIR/status"
die() { echo "run-in-uml(guest): $*" >&4; echo "run-in-uml(guest): $*"; echo 125 >&5; poweroff -ff || echo o > /proc/sysrq-trigger; sleep 30; }
mount -t proc proc /proc || die "mount proc"
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm 2>/dev/null
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run           # keeps 'ip netns add' etc. off the host's /run
hostname uml-guest
ip link set lo up
EOF
  echo "MODROOT=$(q "$UML_MODROOT")"
  echo "MODULES=($(q "${MODULES[@]}"))"
  echo 'for m in "${MODULES[@]}"; do [ -d "/sys/module/$m" ] || modprobe -d "$MODROOT" "$m" || die "modprobe $m failed"; done'
  echo "source $(q "$RUNDIR/env.sh")"
  echo "cd $(q "$PWD") || die 'cd $PWD'"
  for d in "${TMPFS_DIRS[@]}"; do echo "mount -t tmpfs tmpfs $(q "$d") || die 'tmpfs $d'"; done
  echo "$(q "$@") </dev/null >&3 2>&4"
  cat <<'EOF'
rc=$?
echo "$rc" >&5
exec 3>&- 4>&- 5>&-
poweroff -ff 2>/dev/null || { echo o > /proc/sysrq-trigger; sleep 30; }
EOF
} > "$RUNDIR/init.sh"
chmod 755 "$RUNDIR/init.sh"

# Stream the command's output while the VM runs.
timeout -k 5 "$TIMEOUT" "$UML_LINUX" mem="$MEM" root=/dev/root rootfstype=hostfs rootflags=/ rw \
  init="$RUNDIR/init.sh" uml_dir="$RUNDIR" umid=uml \
  con=null con0=null,fd:1 quiet \
  </dev/null >"$RUNDIR/console.log" 2>&1 &
UMLPID=$!
trap 'kill -TERM $UMLPID 2>/dev/null' INT TERM HUP
tail -q -s 0.2 --pid=$UMLPID -n +1 -f "$RUNDIR/stdout" &
T1=$!
tail -q -s 0.2 --pid=$UMLPID -n +1 -f "$RUNDIR/stderr" >&2 &
T2=$!
T3=
if [ "$VERBOSE" = 1 ]; then
  { tail -q -s 0.2 --pid=$UMLPID -n +1 -f "$RUNDIR/console.log" | tr -d '\r' >&2; } &
  T3=$!
fi

wait $UMLPID
UMLRC=$?
wait $T1 $T2 $T3 2>/dev/null

if [ -s "$RUNDIR/status" ]; then
  rc=$(cat "$RUNDIR/status")
else
  if [ $UMLRC = 124 ] || [ $UMLRC = 137 ]; then
    echo "run-in-uml: VM timed out after ${TIMEOUT}s" >&2; rc=124
  else
    echo "run-in-uml: VM ended without a status (exit $UMLRC)" >&2; rc=125
  fi
fi
if [ "$rc" != 0 ] && [ "$VERBOSE" != 1 ]; then
  [ "$rc" -ge 124 ] 2>/dev/null && { echo "---- UML console ----" >&2; tr -d '\r' < "$RUNDIR/console.log" | tail -40 >&2; }
fi
exit "$rc"
