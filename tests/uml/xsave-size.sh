#!/usr/bin/env bash
# Prints this CPU's full XSAVE area size in bytes (CPUID leaf 0xD, sub-leaf 0, ECX): the exact
# buffer size the host kernel demands for PTRACE_SETREGSET NT_X86_XSTATE. See build-kernel.sh.
set -euo pipefail
BIN=${TMPDIR:-/tmp}/ln-xsave-size-$(id -u)
if [ ! -x "$BIN" ]; then
    printf '%s\n' '#include <cpuid.h>' '#include <stdio.h>' \
        'int main(void){unsigned a,b,c,d; if(!__get_cpuid_count(0xd,0,&a,&b,&c,&d)) return 1; printf("%u\n",c); return 0;}' \
        | gcc -x c -o "$BIN" -
fi
"$BIN"
