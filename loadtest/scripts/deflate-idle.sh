#!/usr/bin/env bash
# Server memory per idle connection with and without permessage-deflate, interleaved: for each
# repetition, a fresh basic_chat (compression on, as the example ships) with a private Redis
# takes CONNECTIONS clients that do not offer it, then a fresh one takes clients that do.
# docs/performance-notes.md#deflate-idle-memory.
#
#   loadtest/scripts/deflate-idle.sh [REPS] [CONNECTIONS]
#
# Loopback only; everything it starts it stops.
set -euo pipefail
cd "$(dirname "$0")/../.."
reps=${1:-2} conns=${2:-10000}
cargo build --release --example basic_chat --features prometheus -q
cargo build --release -p loadtest -q
# shellcheck source=private-redis.sh
. loadtest/scripts/private-redis.sh
for rep in $(seq 1 "$reps"); do
    for mode in plain deflate; do
        port=$(free_port)
        BIND_ADDR="127.0.0.1:$port" RUST_LOG=warn REDIS_URL="redis://127.0.0.1:$rport/" \
            ./target/release/examples/basic_chat >/dev/null 2>&1 &
        spid=$!
        sleep 1
        flag=()
        [ "$mode" = deflate ] && flag=(--deflate)
        echo "== $mode, rep $rep/$reps: connections | failures | seconds | handshakes/s | server KiB/connection"
        ./target/release/loadtest connect --addr "127.0.0.1:$port" --redis "127.0.0.1:$rport" \
            --server-pid "$spid" --connections "$conns" --hold-secs 3 "${flag[@]}" 2>&1 |
            grep -E '^\| [0-9]' || true
        kill "$spid"
        sleep 1
    done
done
