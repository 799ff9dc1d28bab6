#!/usr/bin/env bash
# Interleaved connect runs of two builds of basic_chat (and of the second one with mimalloc's
# default purge delay), unpinned, with a private Redis: the before/after of
# docs/performance-notes.md#accept-queue-and-allocator.
#
#   loadtest/scripts/connect-ab.sh BEFORE_BIN AFTER_BIN [REPS]
#
# BEFORE_BIN is basic_chat built from the earlier revision, e.g.
#   git worktree add /tmp/before <rev> && (cd /tmp/before && cargo build --release --example basic_chat)
# Needs target/release/loadtest (cargo build --release -p loadtest) and redis-server.
set -euo pipefail
before=$1 after=$2 reps=${3:-5}
lt="$(dirname "$0")/../../target/release/loadtest"
# shellcheck source=private-redis.sh
. "$(dirname "$0")/private-redis.sh"
run() { # label binary [env...]
    local label=$1 bin=$2 port pid
    shift 2
    port=$(free_port)
    env "$@" BIND_ADDR="127.0.0.1:$port" RUST_LOG=warn REDIS_URL="redis://127.0.0.1:$rport/" "$bin" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    sleep 0.3
    printf '%s: ' "$label"
    "$lt" connect --addr "127.0.0.1:$port" --server-pid "$pid" --connections 10000 --hold-secs 2 2>&1 |
        grep ' connections in '
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    sleep 1
}
for _ in $(seq 1 "$reps"); do
    run before "$before"
    run "after, MIMALLOC_PURGE_DELAY=1000" "$after" MIMALLOC_PURGE_DELAY=1000
    run after "$after"
done
