#!/usr/bin/env bash
# permessage-deflate against plain frames, interleaved: one basic_chat (compression on, as the
# example ships) with a private Redis; for each subscriber count and repetition, a fan-out run
# whose subscribers do not offer permessage-deflate, then one whose subscribers do. Payloads are
# dashboard-like JSON published on Redis. Prints each run's table; PERF.md#permessage-deflate.
#
#   loadtest/scripts/deflate-fanout.sh [REPS] [SUBSCRIBER_COUNTS] [DELIVERIES_PER_S] [PAYLOAD] [SECS]
#   loadtest/scripts/deflate-fanout.sh 3 "1000 10000" 100000 1024 5
#
# The publish rate is DELIVERIES_PER_S / subscribers, so every run delivers as many messages.
# CLIENT_THREADS sets the load client's worker threads (1 by default); it inflates every message.
#
# Loopback only; everything it starts it stops.
set -euo pipefail
cd "$(dirname "$0")/../.."
reps=${1:-3} counts=${2:-"1000 10000"} deliveries=${3:-100000} payload=${4:-1024} secs=${5:-5}
cargo build --release --example basic_chat --features prometheus -q
cargo build --release -p loadtest -q
# shellcheck source=private-redis.sh
. loadtest/scripts/private-redis.sh
port=$(free_port)
BIND_ADDR="127.0.0.1:$port" RUST_LOG=warn REDIS_URL="redis://127.0.0.1:$rport/" \
    ./target/release/examples/basic_chat >/dev/null 2>&1 &
spid=$!
trap 'kill $spid; kill $rpid' EXIT
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
    sleep 0.1
done
for subs in $counts; do
    rate=$((deliveries / subs))
    for rep in $(seq 1 "$reps"); do
        for mode in plain deflate; do
            flag=()
            [ "$mode" = deflate ] && flag=(--deflate)
            echo "== $subs subscribers, $mode, rep $rep/$reps"
            ./target/release/loadtest --client-threads "${CLIENT_THREADS:-1}" fanout --addr "127.0.0.1:$port" --redis "127.0.0.1:$rport" \
                --server-pid "$spid" --subscribers "$subs" --payload "$payload" --json-payload \
                --rates "$rate" --step-secs "$secs" --no-stop "${flag[@]}" 2>&1 | grep -E '^\|' | tail -1 || true
            # Let the server close the previous run's connections.
            sleep 2
        done
    done
done
