#!/usr/bin/env bash
# Where the gateway's instructions go, per request: the release binary
# (with line tables) under callgrind, a fixed number of requests, the
# instruction count divided by that number. Unlike time or CPU seconds,
# instruction counts barely move on a busy shared machine, so a before and
# an after can be compared across days.
#
#   bench/profile.sh [REQUESTS] [TARGET...]   (defaults: 2000; hit miss)
#
# Targets, on bench/compare.sh's configuration (RS256 JWTs, verified-token
# cache on, static KooDrive tokens, the emulator as upstream over plain
# HTTP, RUST_LOG=warn):
#   hit       one user, one query: answered from the response cache (TTL
#             10 min, so that no entry expires during the run)
#   miss      the response cache off: every request goes to the emulator
#   hit-log   `hit` with the access log on (RUST_LOG=info, to a file)
#   hit-log-sampled  `hit-log` with log.success_sample = 10
# For each: the gateway starts under `valgrind --tool=callgrind`, takes
# WARMUP (300) requests (connections to the upstream, caches, allocator),
# its counters are zeroed (callgrind_control -z), it takes REQUESTS
# requests over CONNECTIONS (8) concurrent keep-alive TLS connections
# (bench/peers/fixed.py, HTTP/1.1, every answer checked; the connections
# are opened and warmed before the counters are zeroed, so no TLS handshake
# is counted), and its counters are dumped (callgrind_control -d). Callgrind counts user-space
# instructions only (the kernel's work shows as syscalls): with strace
# installed, the same load on the uninstrumented gateway then counts its
# system calls per request.
#
# Prints, per target: instructions per request, the share of each group
# of code (bench/peers/profile_groups.py) and the system calls per
# request. The callgrind files stay in PROFILE_OUT (default
# /tmp/koodrive-profile) for `callgrind_annotate --inclusive=yes FILE`.
# Environment: CONNECTIONS, WARMUP, PORT_BASE (18600), TOKIO_WORKER_THREADS
# (2), CARGO_TARGET_DIR. Everything listens on loopback and is stopped on
# exit.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-2000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(hit miss)
connections=${CONNECTIONS:-8}
warmup=${WARMUP:-300}
port_base=${PORT_BASE:-18600}
out=${PROFILE_OUT:-/tmp/koodrive-profile}
emulator_port=$port_base gateway_port=$((port_base + 1))
path="/koodrive/ose/v1/jobs?offset=0&limit=10"
for tool in valgrind callgrind_control callgrind_annotate python3 openssl; do
  command -v $tool >/dev/null || { echo "profile.sh: needs $tool (apt-get install valgrind)" >&2; exit 1; }
done

# Line tables let callgrind_annotate name inlined code's files.
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/koodrive-gateway
. bench/lib.sh
mkdir -p "$out"
start_work
export TOKIO_WORKER_THREADS=${TOKIO_WORKER_THREADS:-2}

prepare_rs256 1
jwt=$(sed -n 1p "$work/jwts.txt")
# A TTL no instrumented run outlasts (2,000 requests under callgrind and
# the access log take longer than compare.sh's 5 s).
gateway_config "$work/hit.toml" 600000
gateway_config "$work/miss.toml" 0
cp "$work/hit.toml" "$work/hit-log.toml"
gateway_config "$work/hit-log-sampled.toml" 600000 "" "" "[log]
success_sample = 10"
# The dev certificate the gateway serves (and the client trusts).
"$bin" dev-token --config "$work/hit.toml" --user "$(bench_user 1)" >/dev/null 2>&1
"$bin" emulator --listen "127.0.0.1:$emulator_port" --tokens "$work/tokens.json" 2>"$work/logs/emulator.log" &
pids+=($!)
wait_port $emulator_port

# fixed $1 = expected X-Cache: starts bench/peers/fixed.py as a coprocess
# that opens the connections, sends $warmup requests and waits; `go` then
# sends the $requests requests and waits for the end.
fixed() {
  coproc FIXED { python3 bench/peers/fixed.py 127.0.0.1 $gateway_port "$work/certs/ca.crt" "$path" "$jwt" \
    "$warmup" "$requests" "$connections" "$1"; }
  local line
  read -r line <&"${FIXED[0]}" || true
  [ "$line" = READY ] || { echo "profile.sh: the warm-up failed" >&2; exit 1; }
}
go() {
  local line fixed_pid=$FIXED_PID
  echo >&"${FIXED[1]}"
  read -r line <&"${FIXED[0]}" || true
  wait "$fixed_pid" 2>/dev/null || true
  [ "$line" = "DONE $requests" ] || { echo "profile.sh: the load failed: $line" >&2; exit 1; }
}
# One request first, so the warm-up already finds the cache filled.
prime() {
  python3 bench/peers/fixed.py 127.0.0.1 $gateway_port "$work/certs/ca.crt" "$path" "$jwt" 0 1 1 \
    </dev/null >/dev/null
}
expected_cache() { case $1 in miss) echo BYPASS ;; *) echo HIT ;; esac; }
log_level() { case $1 in *-log | *-log-*) echo info ;; *) echo warn ;; esac; }

# $1 = target: runs it under callgrind; prints instructions per request and
# the groups.
profile() {
  local name=$1 gw file cache
  cache=$(expected_cache "$name")
  rm -f "$out/$name".*
  RUST_LOG="$(log_level "$name"),rustls=error" valgrind --tool=callgrind --quiet \
    --callgrind-out-file="$out/$name.%p" "$bin" serve --config "$work/$name.toml" \
    2>"$work/logs/$name.log" &
  gw=$!
  pids+=($gw)
  wait_port $gateway_port 120
  prime
  fixed "$cache"
  callgrind_control -z $gw >/dev/null
  go
  callgrind_control -d $gw >/dev/null
  kill $gw
  wait $gw 2>/dev/null || true
  pids=("${pids[@]/$gw/}")
  # The dump taken after the load (the file at exit holds the shutdown).
  file=$(ls "$out/$name.$gw".* | sort -t. -k3 -n | head -1)
  python3 bench/peers/profile_groups.py "$file" "$requests" "$name"
}

# $1 = target: the same load on the gateway without valgrind, under
# strace; prints system calls per request.
syscalls() {
  local name=$1 gw tracer cache
  cache=$(expected_cache "$name")
  RUST_LOG="$(log_level "$name"),rustls=error" "$bin" serve --config "$work/$name.toml" 2>"$work/logs/$name.log" &
  gw=$!
  pids+=($gw)
  wait_port $gateway_port
  prime
  fixed "$cache"
  strace -f -c -p $gw -o "$out/$name.strace" 2>/dev/null &
  tracer=$!
  sleep 1
  go
  kill -INT $tracer
  wait $tracer 2>/dev/null || true
  kill $gw
  wait $gw 2>/dev/null || true
  pids=("${pids[@]/$gw/}")
  if [ ! -s "$out/$name.strace" ]; then
    # strace could not attach (not root under kernel.yama.ptrace_scope=1).
    echo "$name system calls per request: not counted (strace could not attach to the gateway)"
    return
  fi
  awk -v n="$requests" -v t="$name" '$NF == "total" {calls = $4}
    $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {by[$NF] = $4}
    END {
      printf "%-8s system calls per request: %.2f (", t, calls / n
      sep = ""; for (s in by) if (by[s] / n >= 0.05) { printf "%s%s %.2f", sep, s, by[s] / n; sep = ", " }
      print ")"
    }' "$out/$name.strace"
}

echo "instructions per request: $requests requests over $connections connections after $warmup;" \
  "TOKIO_WORKER_THREADS=$TOKIO_WORKER_THREADS; $(git log -1 --format='%h %s' | cut -c1-60)"
for name in "${targets[@]}"; do profile "$name"; done
if command -v strace >/dev/null; then
  for name in "${targets[@]}"; do syscalls "$name"; done
fi
