#!/usr/bin/env bash
# Whether the gateway gives memory back: RSS at idle, at the peak of a
# connection storm, and after it, for each allocator the binary can be built
# with (the system's glibc malloc, mimalloc, jemalloc), in one run.
#
#   bench/memory.sh [STORM_SECONDS] [CONNECTIONS]
#
# Each round: start the gateway (cache on, the emulator as upstream), warm
# it up, read VmRSS (idle); throughput with 32 keep-alive connections (the
# allocator's cost on the hot path); 2,000-connection keep-alive load, then a load
# that opens a new TLS connection per request; read VmHWM (peak); let it
# rest 10 s and read VmRSS (after); the same storm again, to see whether
# memory ratchets up. Needs wrk. Results go to standard output; the numbers
# behind the choice are in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-2000}
# The order of the rounds (later rounds meet the TIME_WAIT sockets of
# earlier storms): run it both ways.
allocators=${ALLOCATORS:-system mimalloc jemalloc}
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)"; exit 1; }
ulimit -n 20000

. bench/lib.sh
start_work

for allocator in $allocators; do
  features=()
  [ "$allocator" != system ] && features=(--features "$allocator")
  cargo build --release --quiet --no-default-features "${features[@]}"
  cp target/release/koodrive-gateway "$work/gateway-$allocator"
done
bin="$work/gateway-system"

user=bench-user
token=bench-koodrive-token
echo "{\"$user\": \"$token\"}" > "$work/tokens.json"
emulator_port=19444
gateway_port=18444
path="/koodrive/ose/v1/jobs?offset=0&limit=10"
"$bin" emulator --listen "127.0.0.1:$emulator_port" --tokens "$work/tokens.json" 2>/dev/null &
pids+=($!)

gateway_config "$work/gateway.toml" 1000

mib() { awk -v k="$1" '$1 == k":" {printf "%.1f", $2 / 1024}' "/proc/$2/status"; }

printf '%-9s %9s %9s %9s %9s %9s %9s\n' allocator req/s idle peak1 after1 peak2 after2
for allocator in $allocators; do
  "$work/gateway-$allocator" serve --config "$work/gateway.toml" 2>"$work/logs/$allocator.log" &
  gw=$!
  pids+=($gw)
  wait_port $gateway_port
  jwt=$("$bin" dev-token --config "$work/gateway.toml" --user "$user" 2>/dev/null)
  url="https://127.0.0.1:$gateway_port$path"
  wrk -t1 -c4 -d2s -H "Authorization: Bearer $jwt" "$url" >/dev/null
  sleep 2
  idle=$(mib VmRSS $gw)
  rps=$(wrk -t2 -c32 -d"${seconds}s" -H "Authorization: Bearer $jwt" "$url" | awk '/Requests\/sec/ {printf "%.0f", $2}')
  storm() {
    local a b
    a=$(wrk -t2 -c"$connections" -d"${seconds}s" -H "Authorization: Bearer $jwt" "$url" | awk '/requests in/ {print $1}')
    b=$(wrk -t2 -c200 -d"${seconds}s" -H "Connection: close" -H "Authorization: Bearer $jwt" "$url" | awk '/requests in/ {print $1}')
    echo $((a + b))
  }
  storm >/dev/null
  peak1=$(mib VmHWM $gw)
  sleep 10
  after1=$(mib VmRSS $gw)
  storm >/dev/null
  peak2=$(mib VmHWM $gw)
  sleep 10
  after2=$(mib VmRSS $gw)
  printf '%-9s %9s %9s %9s %9s %9s %9s\n' "$allocator" "$rps" "$idle" "$peak1" "$after1" "$peak2" "$after2"
  kill $gw; wait $gw 2>/dev/null || true
done
echo "(MiB; peak = VmHWM so far; after = VmRSS 10 s after the storm)"
