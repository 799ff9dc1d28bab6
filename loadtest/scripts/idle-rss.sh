#!/usr/bin/env bash
# Resident memory of an idle server that no client ever connected to: starts BIN (basic_chat or
# another build of it) with a private Redis, then prints its anonymous RSS at 1, 3, 6, 9 and 12 s
# and, at the end, the resident size and transparent huge pages of its largest anonymous mapping
# (mimalloc's arena). docs/performance-notes.md#transparent-huge-pages.
#
#   loadtest/scripts/idle-rss.sh BIN [RUNS] [KEY=VALUE ...]
#
# The KEY=VALUE pairs are added to the server's environment (MIMALLOC_ALLOW_THP=0, say).
set -euo pipefail
bin=$1 runs=${2:-3}
shift 2 || shift $#
# shellcheck source=private-redis.sh
. "$(dirname "$0")/private-redis.sh"
for run in $(seq 1 "$runs"); do
    port=$(free_port)
    env "$@" BIND_ADDR="127.0.0.1:$port" RUST_LOG=warn REDIS_URL="redis://127.0.0.1:$rport/" "$bin" >/dev/null 2>&1 &
    pid=$!
    printf 'run %s, RssAnon KiB at 1/3/6/9/12 s:' "$run"
    for wait in 1 2 3 3 3; do
        sleep "$wait"
        printf ' %s' "$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status")"
    done
    # The largest mapping is the arena mimalloc reserves.
    python3 - "$pid" <<'PY'
import sys
best = (0, "")
size = 0
fields = {}
for line in open(f"/proc/{sys.argv[1]}/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:
        lo, hi = (int(x, 16) for x in head.split("-"))
        size, fields = hi - lo, {}
    elif head in ("Rss:", "AnonHugePages:"):
        fields[head] = line.split()[1]
        if head == "AnonHugePages:" and size > best[0]:
            best = (size, f"{fields['Rss:']} KiB resident, {fields[head]} KiB in huge pages")
print(f"; arena: {best[1]}")
PY
    kill "$pid"
    wait "$pid" 2>/dev/null || true
done
