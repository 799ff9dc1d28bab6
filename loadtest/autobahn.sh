#!/usr/bin/env bash
# Runs Autobahn's WebSocket conformance cases against examples/echo with kosoku (a PyPI package
# that runs Autobahn's own case files under Python 3; the official wstest is Python-2-only).
#
#   bash loadtest/autobahn.sh            # cases 1-7, 9, 10, 12 and 13 (permessage-deflate)
#   CASES='1.* 2.*' bash loadtest/autobahn.sh
#
# Exits non-zero if any case's behaviour is not OK, NON-STRICT or INFORMATIONAL; prints the
# non-OK ones. Reports go to target/autobahn/. Loopback only; everything it starts it stops.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v kosoku >/dev/null 2>&1 || python3 -m pip install --quiet kosoku
cargo build --release --example echo

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BIND_ADDR=127.0.0.1:$port ./target/release/examples/echo >/dev/null 2>&1 &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
  sleep 0.1
done

out=target/autobahn
rm -rf "$out"
args=()
for c in ${CASES:-1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.* 12.* 13.*}; do args+=(-i "$c"); done
kosoku -m fuzzingclient "${args[@]}" -p 2 -o "$out" "127.0.0.1:$port"

python3 - "$out/index.json" <<'PY'
import collections, json, sys
index = json.load(open(sys.argv[1]))
counts = collections.Counter()
bad = []
for cases in index.values():
    for case, r in sorted(cases.items()):
        b = r.get("behavior")
        counts[b] += 1
        if b != "OK":
            print(f"  {case}: {b} (close: {r.get('behaviorClose')})")
        if b not in ("OK", "NON-STRICT", "INFORMATIONAL"):
            bad.append(case)
print("autobahn:", dict(counts))
sys.exit(1 if bad else 0)
PY
