#!/usr/bin/env bash
# How many live frames one Redis carries: redis-benchmark against a throwaway redis-server on loopback, replaying
# the Redis work of one frame of the live path (docs/deployment.md, "Capacity"):
#   gateway   SET of a 45 KB frame (PX) + EVALSHA of protocol.FRAME_TICKET_LUA (NX flag + LPUSH); the gateway
#             sends them in one MULTI/EXEC with an EXISTS, which this replays as separate requests
#   worker    RPOP of a ticket (one per batch), GET-sized take of the 45 KB frame, PUBLISH of a 2 KB result
#
#   deploy/bench-redis.sh              (from the repository root; needs redis-server, redis-benchmark and .venv)
#
# redis-benchmark's client runs on the same machine and competes with Redis for the cores, so the rates are
# lower bounds for the server. INFO commandstats at the end gives Redis's own execution time per call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
P=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DIR=$(mktemp -d)
PW=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(16))')
redis-server - --port "$P" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >/dev/null <<CONF &
requirepass $PW
CONF
RP=$!
trap 'kill $RP 2>/dev/null; wait $RP 2>/dev/null; rm -rf "$DIR"' EXIT
export REDISCLI_AUTH=$PW
for _ in $(seq 50); do redis-cli -p "$P" ping >/dev/null 2>&1 && break; sleep 0.1; done

SHA=$("$PY" -c 'from densecap_core.protocol import FRAME_TICKET_LUA; print(FRAME_TICKET_LUA)' | redis-cli -p "$P" -x SCRIPT LOAD)
FRAME=$(head -c 45000 /dev/zero | tr '\0' 'x')
RESULT=$(head -c 2000 /dev/zero | tr '\0' 'r')
B=(redis-benchmark -p "$P" -a "$PW" --csv -c 16)  # a throwaway password: argv is fine
rate() { tail -1 | cut -d, -f2 | tr -d '"'; }

echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); requests/s with 16 connections:"
echo "  ingest  SET, 45 KB frame:     $("${B[@]}" -n 20000 -r 1000 SET dc:frame:__rand_int__ "$FRAME" PX 2000 | rate)"
echo "  ticket  EVALSHA:              $("${B[@]}" -n 50000 -r 1000 EVALSHA "$SHA" 2 dc:pending:__rand_int__ \
    dc:ready 2000 __rand_int__ 10000 | rate)"
echo "  take    GET, 45 KB value:     $("${B[@]}" -n 20000 -r 1000 -d 45000 -t get | rate)"
echo "  publish 2 KB result:          $("${B[@]}" -n 50000 PUBLISH dc:result:bench "$RESULT" | rate)"
echo "  pop     RPOP:                 $("${B[@]}" -n 50000 RPOP dc:ready | rate)"
echo "Redis execution time per call (INFO commandstats, microseconds; socket I/O and parsing not included):"
redis-cli -p "$P" INFO commandstats | grep -E "cmdstat_(set|evalsha|get|publish|rpop):" \
    | sed -E 's/^cmdstat_([a-z]+):.*usec_per_call=([0-9.]+).*/  \1 \2/'
