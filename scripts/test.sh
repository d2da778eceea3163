#!/usr/bin/env bash
# The full test suite: unit, property and end-to-end tests, the ones that
# need root included (they build network namespaces). Installs the Debian
# packages the tests use when they are missing, then checks that the suite
# left nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_root
ensure_packages

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi

# Nothing of the tests may remain: namespaces, UAPI sockets, processes
# (daemons, node agents, the labs' keepalived).
# A lab namespace is named cw<pid>x<n>-…; once the suite is over, one whose
# process is gone is a leftover (a live one belongs to something else).
leftover=""
for ns in $(ip netns list | awk '{print $1}' | grep -E '^cw[0-9]+x' || true); do
    pid=${ns#cw}; pid=${pid%%x*}
    kill -0 "$pid" 2>/dev/null || leftover+="$ns"$'\n'
done
leftover+=$(ls /var/run/wireguard/ 2>/dev/null | grep -E '^wgt[0-9]+x' || true)
leftover+=$(pgrep -af "$(pwd)/target/[a-z]+/causeway (up|node) " || true)
leftover+=$(pgrep -af "keepalived --dont-fork --log-console --vrrp --use-file /tmp/" || true)
if [ -n "$leftover" ]; then
    echo "tests left these behind:" >&2
    echo "$leftover" >&2
    exit 1
fi
echo "no namespaces, sockets or processes left behind"
