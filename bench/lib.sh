# Shared by the bench scripts (sourced, not run): the gateway's bench
# configuration, waiting for a port, and RS256 users with their JWTs.
#
# The scripts call start_work (which makes $work) and set gateway_port and
# emulator_port before calling the rest; optionally jwks_file (default: the
# dev JWKS that `dev-token` creates under $work/certs) and auth_keys (extra
# [auth] keys every configuration gets).

bench_issuer=https://idp.bench
bench_audience=koodrive-gateway

# gateway_config FILE [CACHE_TTL_MS] [SERVER_KEYS] [AUTH_KEYS] [SECTIONS]:
# the gateway over TLS (dev certificates under $work/certs) in front of the
# emulator on $emulator_port, static KooDrive tokens from
# $work/tokens.json, and any extra keys or sections.
gateway_config() {
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:$gateway_port"
tls_cert = "$work/certs/server.crt"
tls_key = "$work/certs/server.key"
dev_certs_dir = "$work/certs"
${3:-}
[upstream]
base_url = "http://127.0.0.1:$emulator_port"
[auth]
issuer = "$bench_issuer"
audience = "$bench_audience"
jwks_file = "${jwks_file:-$work/certs/jwks.json}"
${auth_keys:-}
${4:-}
[token]
mode = "static"
static_tokens_file = "$work/tokens.json"
[cache]
ttl_ms = ${2:-5000}
${5:-}
TOML
}

# wait_port PORT [SECONDS]: until something listens on 127.0.0.1:PORT.
wait_port() {
  local tries=$((${2:-10} * 10))
  for _ in $(seq 1 "$tries"); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done
  echo "port $1 did not open" >&2
  # What the processes said before giving up (bench scripts log to
  # $work/logs).
  tail -n 5 "${work:-/nonexistent}"/logs/*.log >&2 2>/dev/null || true
  exit 1
}

# bench_user N: the name of the Nth bench user.
bench_user() { printf 'bench-user-%04d' "$1"; }

# prepare_rs256 USERS: $work/tokens.json (a KooDrive token per user), an
# RS256 key and its JWKS under $work/rs256 (sets jwks_file and auth_keys
# to use them), and $work/jwts.txt (one JWT a line, valid 2 h, user 1
# first).
prepare_rs256() {
  local users=$1 i
  mkdir -p "$work/rs256"
  {
    echo "{"
    for i in $(seq 1 "$users"); do
      printf '"%s": "koodrive-token-%04d"%s\n' "$(bench_user "$i")" "$i" "$([ "$i" = "$users" ] || echo ,)"
    done
    echo "}"
  } >"$work/tokens.json"
  openssl genrsa -traditional -out "$work/rs256/key.pem" 2048 2>/dev/null
  openssl rsa -in "$work/rs256/key.pem" -traditional -outform DER -out "$work/rs256/key.der" 2>/dev/null
  python3 bench/peers/rs256.py jwks "$work/rs256/key.der" bench-rs256 >"$work/rs256/jwks.json"
  jwks_file=$work/rs256/jwks.json
  auth_keys='algorithms = ["RS256"]'
  local all=()
  for i in $(seq 1 "$users"); do all+=("$(bench_user "$i")"); done
  mint_rs256 7200 "${all[@]}" >"$work/jwts.txt"
}

# mint_rs256 TTL USER...: one JWT a line, signed with $work/rs256's key.
mint_rs256() {
  python3 bench/peers/rs256.py mint "$work/rs256/key.der" bench-rs256 "$bench_issuer" "$bench_audience" "$@"
}

# start_work: a scratch directory $work, with the processes' logs in
# $work/logs (apart from the files the gateway watches, so that writing
# them wakes no watcher), and the array $pids of what was started; on exit
# (or Ctrl-C) every one of them is stopped and the directory removed.
start_work() {
  work=$(mktemp -d)
  mkdir -p "$work/logs"
  pids=()
  trap stop_work EXIT
  trap 'exit 130' INT TERM
}

stop_work() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
