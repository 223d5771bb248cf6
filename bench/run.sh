#!/usr/bin/env bash
# Throughput and latency of the gateway against the KooDrive emulator called
# directly, in one run on this machine, reported as ratios (the machine is
# shared and noisy: absolute numbers mean little, ratios within a run do).
#
#   bench/run.sh [DURATION_SECONDS] [CONNECTIONS]
#
# Rows: cache off/on, rate limiting (in process, Redis), audit trail (file,
# failing closed) at each durability (queued, written, fsynced).
# Needs wrk (Debian: apt-get install wrk) and, for the shared rate-limit
# row, redis-server. Everything listens on loopback; every load runs for a
# bounded time and then stops.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
connections=${2:-32}
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)"; exit 1; }

cargo build --release --quiet
. bench/lib.sh
bin=${CARGO_TARGET_DIR:-target}/release/koodrive-gateway
start_work

user=bench-user
token=bench-koodrive-token
echo "{\"$user\": \"$token\"}" > "$work/tokens.json"
emulator_port=19443
gateway_port=18443
path="/koodrive/ose/v1/jobs?offset=0&limit=10"

"$bin" emulator --listen "127.0.0.1:$emulator_port" --tokens "$work/tokens.json" 2>"$work/logs/emulator.log" &
pids+=($!)

redis_port=16379
redis_pid=
if command -v redis-server >/dev/null; then
  redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >/dev/null &
  redis_pid=$!
  pids+=($redis_pid)
fi

# bench/lib.sh's configuration: $1 = cache ttl_ms, $2 = extra TOML.
write_config() { gateway_config "$work/gateway.toml" "$1" "" "" "$2"; }

# A budget no load here reaches: the rows measure the cost of deciding.
limits="[rate_limit]
requests_per_second = 1000000
burst = 1000000"



# wrk prints "Requests/sec: N" and "Latency avg stdev max"; keep both.
measure() { # $1 = label, rest = wrk args
  local label=$1; shift
  local out
  out=$(wrk -t2 -c"$connections" -d"${duration}s" --latency "$@")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local non2xx
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  printf '%-28s %10s req/s   p50 %8s   p99 %8s   non-2xx %s\n' "$label" "$rps" "$p50" "$p99" "${non2xx:-0}"
  echo "$rps" > "$work/$label.rps"
}

wait_port $emulator_port
x_date=$(date -u +%Y%m%dT%H%M%SZ)
measure direct -H "Authorization: Bearer $token" -H "X-User-Id: $user" -H "X-Date: $x_date" \
  "http://127.0.0.1:$emulator_port$path"

labels=(gateway-cache-off gateway-cache-on gateway-ratelimit-local gateway-audit-queued gateway-audit-written gateway-audit-fsynced)
[ -n "$redis_pid" ] && labels+=(gateway-ratelimit-redis)
for label in "${labels[@]}"; do
  case $label in
    gateway-cache-off) write_config 0 "" ;;
    gateway-cache-on) write_config 5000 "" ;;
    gateway-ratelimit-local) write_config 0 "$limits" ;;
    gateway-audit-*) write_config 0 "[audit]
path = \"$work/logs/audit-$label.log\"
on_error = \"reject\"
durability = \"${label#gateway-audit-}\"" ;;
    gateway-ratelimit-redis) write_config 0 "$limits
redis_url = \"redis://127.0.0.1:$redis_port\"
redis_timeout_ms = 1000" ;;
  esac
  "$bin" serve --config "$work/gateway.toml" 2>"$work/logs/$label.log" &
  gw=$!
  pids+=($gw)
  wait_port $gateway_port
  jwt=$("$bin" dev-token --config "$work/gateway.toml" --user "$user" 2>/dev/null)
  measure "$label" -H "Authorization: Bearer $jwt" "https://127.0.0.1:$gateway_port$path"
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$gw/status")
  echo "  gateway peak RSS: $((rss / 1024)) MiB"
  kill $gw; wait $gw 2>/dev/null || true
done

direct=$(cat "$work/direct.rps")
for label in "${labels[@]}"; do
  awk -v g="$(cat "$work/$label.rps")" -v d="$direct" -v l="$label" \
    'BEGIN { printf "%-28s %.2f x direct throughput\n", l, g / d }'
done
