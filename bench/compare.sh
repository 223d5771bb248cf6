#!/usr/bin/env bash
# The gateway against HAProxy doing the same job (bench/peers/haproxy.cfg),
# and both against the KooDrive emulator called directly, in one
# interleaved run on this machine.
#
#   bench/compare.sh [SECONDS] [ROUNDS]      (defaults: 10 s per load, 3 rounds)
#
# Each round loads every target once, in an order that rotates from round
# to round; the table gives the median of the rounds. Targets: the
# emulator direct (plain HTTP); HAProxy without and with its per-user
# cache, and with the cache under 1,000 users; the gateway's cache hit
# (one user) and its miss (cache off), each also with the verified-token
# cache off (then it verifies every signature, as HAProxy does), 1,000
# users with the cache on, rate limiting (in process; through Redis when
# redis-server is installed) and the audit trail (file, failing closed).
# Both proxies run 2 worker threads (HAProxy `nbthread 2`, the gateway's
# tokio runtime through TOKIO_WORKER_THREADS), verify the same RS256 JWTs,
# use the same TLS certificate and log nothing per request (RUST_LOG=warn:
# HAProxy's configuration has no `log` line).
#
# Before any timing, HAProxy's answers are checked against the gateway's
# (same status and body for good requests of two users, cache misses and
# hits; 401 for a bad signature, an expired token and garbage; 400 for
# seven bad queries); the run stops if one
# differs. Then the RSS of each proxy with 1,000 and 10,000 idle TLS
# keep-alive connections (bench/peers/idle.py).
#
# Per target (medians of the rounds): req/s and its spread over the rounds
# ((max - min) / median: the noise), latency p50/p99/p99.9 (wrk; p99.9 from the Lua done
# hook in bench/peers/wrk.lua), CPU seconds per 1,000 requests (utime +
# stime of the target's processes from /proc/<pid>/stat, before and after
# the load), peak RSS (VmHWM), the errors wrk saw (any non-zero count
# makes the row's numbers meaningless) and the target's threads at the end
# of the load; then gateway/HAProxy ratios.
#
# Environment: CONNECTIONS (64), WRK_THREADS (2), WORKERS (2), USERS
# (1000), IDLE_STAGES ("1000 10000"; empty skips the idle rows),
# PORT_BASE (18500: five ports from it), CARGO_TARGET_DIR. Installs
# haproxy and wrk from Debian's packages when missing (as root). Everything
# listens on loopback; every load is bounded in time; everything started is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
rounds=${2:-3}
connections=${CONNECTIONS:-64}
wrk_threads=${WRK_THREADS:-2}
workers=${WORKERS:-2}
users=${USERS:-1000}
idle_stages=${IDLE_STAGES-1000 10000}
port_base=${PORT_BASE:-18500}
emulator_port=$port_base direct_port=$((port_base + 1)) gateway_port=$((port_base + 2))
haproxy_port=$((port_base + 3)) redis_port=$((port_base + 4))
path="/koodrive/ose/v1/jobs?offset=0&limit=10"

die() { echo "compare.sh: $*" >&2; exit 1; }
missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "needs ${missing[*]} (apt-get install ${missing[*]})"
  echo "installing ${missing[*]} from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for tool in python3 openssl curl; do command -v $tool >/dev/null || die "needs $tool"; done
for port in $emulator_port $direct_port $gateway_port $haproxy_port $redis_port; do
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use (set PORT_BASE)"; fi
done

cargo build --release --quiet
. bench/lib.sh
bin=${CARGO_TARGET_DIR:-target}/release/koodrive-gateway
start_work
# rustls warns of every wrk connection (it sends the IP address as SNI).
export TOKIO_WORKER_THREADS=$workers RUST_LOG=warn,rustls=error

# ---- users, their KooDrive tokens, RS256 key and JWTs (bench/lib.sh)
echo "preparing $users users and their RS256 JWTs"
mkdir -p "$work/haproxy"
prepare_rs256 "$users"
for i in $(seq 1 "$users"); do printf '%s koodrive-token-%04d\n' "$(bench_user "$i")" "$i"; done >"$work/haproxy/tokens.map"
openssl rsa -in "$work/rs256/key.pem" -pubout -out "$work/haproxy/jwt_pub.pem" 2>/dev/null
# bench/peers/haproxy.cfg checks the same issuer and audience.
jwt=$(sed -n 1p "$work/jwts.txt")                    # the one-user rows' caller
jwt_other=$(sed -n "$(((users + 1) / 2))p" "$work/jwts.txt")
signature=${jwt##*.}
jwt_bad_signature="${jwt%.*}.$(rev <<<"$signature")"
jwt_expired=$(mint_rs256 -120 "$(bench_user 1)")

# ---- configurations (bench/lib.sh's gateway_config: $1 = file, $2 =
# cache ttl_ms, $3 = extra [server] keys, $4 = extra [auth] keys, $5 = extra
# sections)
write_config() { gateway_config "$@"; }
# A budget no load here reaches: the rows measure the cost of deciding.
limits="[rate_limit]
requests_per_second = 1000000
burst = 1000000"
write_config "$work/gw-hit.toml" 5000
write_config "$work/gw-hit-verify-all.toml" 5000 "" "verified_cache_bytes = 0"
write_config "$work/gw-miss.toml" 0
write_config "$work/gw-miss-verify-all.toml" 0 "" "verified_cache_bytes = 0"
write_config "$work/gw-1k-users.toml" 5000
write_config "$work/gw-ratelimit.toml" 0 "" "" "$limits"
write_config "$work/gw-ratelimit-redis.toml" 0 "" "" "$limits
redis_url = \"redis://127.0.0.1:$redis_port\"
redis_timeout_ms = 1000"
write_config "$work/gw-audit.toml" 0 "" "" "[audit]
path = \"$work/logs/audit.log\"
on_error = \"reject\""
write_config "$work/gw-idle.toml" 5000 "max_connections = 20000
idle_timeout_ms = 300000"
# The dev certificate (created by dev-token) serves both proxies.
"$bin" dev-token --config "$work/gw-hit.toml" --user "$(bench_user 1)" >/dev/null 2>&1
cat "$work/certs/server.crt" "$work/certs/server.key" >"$work/haproxy/server.pem"
cp bench/peers/haproxy.cfg "$work/haproxy/haproxy.cfg"

# ---- starting and stopping targets
"$bin" emulator --listen "127.0.0.1:$emulator_port" --tokens "$work/tokens.json" 2>"$work/logs/emulator.log" &
pids+=($!)
wait_port $emulator_port

target_pids=() target_url= target_tokens= target_headers=()
# $1 = target name; sets target_pids, target_url, target_tokens (a JWT file
# for wrk to rotate through, or empty) and target_headers.
start_target() {
  local name=$1
  target_tokens= target_headers=(-H "Authorization: Bearer $jwt")
  case $name in
    direct)
      "$bin" emulator --listen "127.0.0.1:$direct_port" --tokens "$work/tokens.json" 2>>"$work/logs/direct.log" &
      target_pids=($!)
      target_url="http://127.0.0.1:$direct_port$path"
      # What a proxy would stamp: the user's token, X-User-Id, X-Date.
      target_headers=(-H "Authorization: Bearer koodrive-token-0001" -H "X-User-Id: $(bench_user 1)"
        -H "X-Date: $(date -u +%Y%m%dT%H%M%SZ)")
      wait_port $direct_port ;;
    haproxy-*)
      local variant=nocache maxconn=${2:-5000} idle=${3:-60s}
      [[ $name == haproxy-cache* ]] && variant=cache
      (cd "$work/haproxy" && PEER_VARIANT=$variant PEER_THREADS=$workers PEER_MAXCONN=$maxconn \
        PEER_IDLE=$idle PEER_BIND="127.0.0.1:$haproxy_port" PEER_UPSTREAM="127.0.0.1:$emulator_port" \
        exec haproxy -f haproxy.cfg -db 2>>"$work/logs/haproxy.log") &
      target_pids=($!)
      target_url="https://127.0.0.1:$haproxy_port$path"
      wait_port $haproxy_port ;;
    gw-*)
      target_pids=()
      if [ "$name" = gw-ratelimit-redis ]; then
        redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >/dev/null &
        target_pids+=($!)
        wait_port $redis_port
      fi
      "$bin" serve --config "$work/$name.toml" 2>>"$work/logs/$name.log" &
      target_pids+=($!)
      target_url="https://127.0.0.1:$gateway_port$path"
      wait_port $gateway_port ;;
    *) die "unknown target $name" ;;
  esac
  pids+=("${target_pids[@]}")
  [[ $name == *-1k-users ]] && target_tokens=$work/jwts.txt
  return 0
}
stop_target() {
  local p q running=()
  for p in "${target_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${target_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  # Forget them: the cleanup must not signal a reused pid.
  for q in "${pids[@]}"; do [[ " ${target_pids[*]} " == *" $q "* ]] || running+=("$q"); done
  pids=("${running[@]}")
  target_pids=()
}

# ---- correctness, before any timing
get() { # $1 = url, $2 = JWT; prints "<status> <body>"
  local status
  status=$(curl -sS --cacert "$work/certs/ca.crt" -H "Authorization: Bearer $2" -o "$work/body" \
    -w '%{http_code}' "$1") || die "curl $1 failed"
  echo "$status $(cat "$work/body")"
}
expect_same() { # $1 = what, $2 = gateway answer, $3 = HAProxy answer
  [ "$2" = "$3" ] && [ "${2%% *}" = 200 ] && return
  die "HAProxy ($variant) differs from the gateway for $1:
  gateway: ${2:0:300}
  HAProxy: ${3:0:300}"
}
expect_status() { # $1 = what, $2 = status, $3.. = answers
  local what=$1 want=$2 answer; shift 2
  for answer in "$@"; do
    [ "${answer%% *}" = "$want" ] || die "$what: expected $want, got: ${answer:0:300}"
  done
}
tls_of() { # $1 = port: what this machine's OpenSSL (wrk's) negotiates
  openssl s_client -connect "127.0.0.1:$1" -servername localhost -brief </dev/null 2>&1 |
    awk -F': ' '/^Protocol version|^Ciphersuite|^Server Temp Key/ {printf "%s%s", sep, $2; sep = ", "}'
}
echo "checking that HAProxy does the gateway's job"
start_target gw-miss
gateway_pids=("${target_pids[@]}")
gw_base="https://127.0.0.1:$gateway_port/koodrive/ose/v1/jobs"
hp_base="https://127.0.0.1:$haproxy_port/koodrive/ose/v1/jobs"
for variant in nocache cache; do
  start_target "haproxy-$variant"
  [ $variant = nocache ] && tls="gateway: $(tls_of $gateway_port); HAProxy: $(tls_of $haproxy_port)"
  for token in "$jwt" "$jwt_other"; do
    for query in "offset=0&limit=10" "offset=1&limit=3&type=2" "limit=100&offset=0&status=1"; do
      gw=$(get "$gw_base?$query" "$token")
      expect_same "a good request ($query)" "$gw" "$(get "$hp_base?$query" "$token")"
      # The cache's second answer (a hit) is the same, and per user.
      expect_same "a repeated request ($query)" "$gw" "$(get "$hp_base?$query" "$token")"
    done
  done
  for bad in "$jwt_bad_signature" "$jwt_expired" "not-a-jwt"; do
    expect_status "a bad JWT ($variant)" 401 "$(get "$gw_base?offset=0&limit=10" "$bad")" \
      "$(get "$hp_base?offset=0&limit=10" "$bad")"
  done
  for query in "offset=0&limit=101" "limit=10" "offset=0&limit=10&color=red" "offset=0&limit=10&limit=20" \
    "offset=x&limit=10" "offset=0&limit=10&type=8" "offset=0&limit=10&status=4"; do
    expect_status "a bad query ($query, $variant)" 400 "$(get "$gw_base?$query" "$jwt")" \
      "$(get "$hp_base?$query" "$jwt")"
  done
  stop_target
done
target_pids=("${gateway_pids[@]}")
# Its threads by name (tokio's workers, the main thread, helpers).
gateway_threads=$(cat /proc/"${target_pids[0]}"/task/*/comm | sort | uniq -c | awk '{printf "%s%d %s", sep, $1, $2; sep = ", "}')
stop_target
echo "  same status and body for good requests (2 users, 3 queries, cache miss and hit);"
echo "  401 for a bad signature, an expired token and garbage; 400 for 7 bad queries"

# ---- measurements
ticks=$(getconf CLK_TCK)
cpu_ticks() { # utime + stime of the processes and their children, in ticks
  local p total=0 t
  for p in "$@" $(for q in "$@"; do pgrep -P "$q" || true; done); do
    # Fields after the ")" closing the command name: utime and stime are 12 and 13.
    t=$(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')
    total=$((total + t))
  done
  echo $total
}
status_kib() { # $1 = VmHWM or VmRSS; the sum over the processes
  local key=$1 p total=0; shift
  for p in "$@" $(for q in "$@"; do pgrep -P "$q" || true; done); do
    total=$((total + $(awk -v k="$key:" '$1 == k {print $2}' "/proc/$p/status")))
  done
  echo $total
}
load() { # $1 = seconds; the rest = extra wrk arguments; prints the COMPARE line
  local d=$1; shift
  local out
  out=$(WRK_TOKENS=$target_tokens wrk -t"$wrk_threads" -c"$connections" -d"${d}s" --latency \
    -s bench/peers/wrk.lua "${target_headers[@]}" "$@" "$target_url" 2>&1) || true
  grep '^COMPARE' <<<"$out" || die "wrk failed against $target_url: $out"
}

targets=(direct haproxy-nocache haproxy-cache haproxy-cache-1k-users gw-hit gw-hit-verify-all gw-miss
  gw-miss-verify-all gw-1k-users gw-ratelimit)
command -v redis-server >/dev/null && targets+=(gw-ratelimit-redis)
targets+=(gw-audit)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "measuring: ${#targets[@]} targets x $rounds rounds x ${seconds} s, $connections connections, $wrk_threads wrk threads"
: >"$work/results"
for round in $(seq 1 "$rounds"); do
  n=${#targets[@]}
  for k in $(seq 0 $((n - 1))); do
    name=${targets[$(((k + (round - 1) * n / rounds) % n))]}
    start_target "$name"
    # A short load first: connections to the upstream, caches, allocator.
    load 1 >/dev/null
    before=$(cpu_ticks "${target_pids[@]}")
    line=$(load "$seconds")
    after=$(cpu_ticks "${target_pids[@]}")
    hwm=$(status_kib VmHWM "${target_pids[@]}")
    threads=$(for p in "${target_pids[@]}"; do ls "/proc/$p/task"; done | wc -l)
    stop_target
    eval "${line#COMPARE }" # requests errors duration_us p50_us p99_us p999_us
    awk -v n="$name" -v r="$requests" -v e="$errors" -v d="$duration_us" -v p50="$p50_us" -v p99="$p99_us" \
      -v p999="$p999_us" -v cpu=$((after - before)) -v hz="$ticks" -v hwm="$hwm" -v t="$threads" 'BEGIN {
        printf "%s %.0f %.2f %.2f %.2f %.4f %.1f %d %d\n", n, r / (d / 1e6), p50 / 1e3, p99 / 1e3, p999 / 1e3,
          cpu / hz / r * 1000, hwm / 1024, e, t }' >>"$work/results"
    printf '  round %d  %-24s %s\n' "$round" "$name" "$(tail -1 "$work/results" | cut -d' ' -f2-)"
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- idle keep-alive connections
idle_rows=()
measure_idle() { # $1 = label, $2 = port, $3 = stages; the target is started
  local out base line rss idle_pid last_n=0 last_rss
  base=$(status_kib VmRSS "${target_pids[@]}")
  coproc IDLE { python3 bench/peers/idle.py 127.0.0.1 "$2" "$work/certs/ca.crt" \
    "$path" "$jwt" $3 2>>"$work/logs/idle.log"; }
  idle_pid=$IDLE_PID
  out="$1: base $((base / 1024)) MiB"
  last_rss=$base
  for stage in $3; do
    read -r -t 600 line <&"${IDLE[0]}" || die "idle connections: no answer (see $work/logs/idle.log)"
    set -- $line # READY <open> <failed>
    sleep 2
    rss=$(status_kib VmRSS "${target_pids[@]}")
    # KiB a connection over the base, and over the previous stage.
    out+=$(awk -v n="$2" -v f="$3" -v r="$rss" -v b="$base" -v ln="$last_n" -v lr="$last_rss" 'BEGIN {
      printf "; %d open (%d failed): %.1f MiB, %.1f KiB each", n, f, r / 1024, (r - b) / n
      if (ln) printf " (%.1f KiB each of the last %d)", (r - lr) / (n - ln), n - ln }')
    last_n=$2 last_rss=$rss
    echo >&"${IDLE[1]}"
  done
  wait "$idle_pid" 2>/dev/null || true
  idle_rows+=("$out")
}
if [ -n "$idle_stages" ]; then
  echo "idle TLS keep-alive connections: $idle_stages"
  start_target gw-idle
  load 1 >/dev/null
  measure_idle "gateway (cache on)" $gateway_port "$idle_stages"
  stop_target
  # HAProxy reserves two descriptors a connection (client and server side)
  # and will not start with a maxconn the hard limit cannot cover: its
  # stages stop below that.
  most=$((($(ulimit -Hn) - 400) / 2 / 500 * 500))
  haproxy_stages=$(for stage in $idle_stages; do echo $((stage < most ? stage : most)); done | uniq | xargs)
  start_target haproxy-nocache $((most + 100)) 300s
  load 1 >/dev/null
  measure_idle "HAProxy (no cache)" $haproxy_port "$haproxy_stages"
  stop_target
fi

# ---- report
echo
echo "Gateway vs HAProxy, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
echo "$(haproxy -v | head -1 | cut -d' ' -f1-3), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), gateway $("$bin" --version | cut -d' ' -f2)"
echo "load: ${seconds} s x $rounds rounds, $connections connections, $wrk_threads wrk threads;" \
  "HAProxy nbthread $workers, gateway TOKIO_WORKER_THREADS=$workers (threads: $gateway_threads)"
echo "TLS $tls"
echo "load average (1, 5, 15 min) before: $load_before, after: $load_after"
echo
printf '%-24s %9s %6s %8s %8s %9s %12s %9s %7s %7s\n' target req/s spread "p50 ms" "p99 ms" "p99.9 ms" \
  "CPU s/1k req" "peak MiB" errors threads
for name in "${targets[@]}"; do
  awk -v n="$name" '$1 == n' "$work/results" | awk '
    { for (c = 2; c <= 9; c++) v[NR, c] = $c; name = $1 }
    END {
      # The median of each column on its own (insertion sort: mawk has no asort).
      for (c = 2; c <= 9; c++) {
        for (i = 1; i <= NR; i++) {
          x = v[i, c]; j = i - 1
          while (j > 0 && col[j] > x) { col[j + 1] = col[j]; j-- }
          col[j + 1] = x
        }
        m[c] = (NR % 2) ? col[(NR + 1) / 2] : (col[NR / 2] + col[NR / 2 + 1]) / 2
      }
      # The spread of req/s over the rounds, in % of the median: the noise.
      lo = hi = v[1, 2]; for (i = 2; i <= NR; i++) { if (v[i, 2] < lo) lo = v[i, 2]; if (v[i, 2] > hi) hi = v[i, 2] }
      printf "%-24s %9.0f %6.0f %8.2f %8.2f %9.2f %12.3f %9.1f %7d %7d\n", name, m[2], (hi - lo) / m[2] * 100,
        m[3], m[4], m[5], m[6], m[7], m[8], m[9]
    }'
done | tee "$work/medians"
echo
ratio() { # $1 = gateway target, $2 = HAProxy target
  awk -v g="$1" -v h="$2" '$1 == g {gr = $2; gc = $7; gm = $8} $1 == h {hr = $2; hc = $7; hm = $8}
    END { if (hr && gr) printf "%-20s / %-22s req/s %.2f   CPU per request %.2f   peak RSS %.2f\n", g, h, gr / hr, gc / hc, gm / hm }' \
    "$work/medians"
}
ratio gw-hit haproxy-cache
ratio gw-hit-verify-all haproxy-cache
ratio gw-miss haproxy-nocache
ratio gw-miss-verify-all haproxy-nocache
ratio gw-1k-users haproxy-cache-1k-users
if awk '$9 > 0 {bad = 1} END {exit !bad}' "$work/medians"; then
  echo "WARNING: some rows saw errors (non-2xx or socket errors): their numbers are not comparable"
fi
for row in "${idle_rows[@]}"; do echo "idle: $row"; done
