#!/usr/bin/env bash
# Property-based API test: schemathesis drives openapi.yaml against a live
# gateway (the debug binary on the demo config, with its embedded KooDrive
# emulator, on ephemeral loopback ports) and fails on any 5xx, any response
# that breaks the document (status, content type, body schema, headers) or
# any status it does not list.
#
#   .ci/schemathesis.sh [SEED...]    one run per seed (default: one fixed seed)
#
# Environment: SCHEMATHESIS_MAX_EXAMPLES (fuzzed cases, default 1000; the
# coverage phase adds its ~140 boundary cases), KOODRIVE_GATEWAY_BIN
# (default: the debug binary under the cargo target directory, built when
# missing), SCHEMATHESIS_EXTRA_ARGS (more `schemathesis run` options, e.g.
# `--report har`).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-1000}"
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(20261130)

bin="${KOODRIVE_GATEWAY_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/koodrive-gateway}"
if [ ! -x "$bin" ]; then
  cargo build --locked --bin koodrive-gateway
fi
# As a module: found whatever PATH holds (pyenv shims, ~/.local/bin).
schemathesis() { python3 -m schemathesis.cli "$@"; }
schemathesis --version >/dev/null 2>&1 || {
  echo "schemathesis is not installed (pip install schemathesis)" >&2
  exit 1
}

# A scratch working directory: the demo config, and the development CA,
# certificates and JWT key the gateway creates there on start.
work="$(mktemp -d)"
gateway_pid=""
cleanup() {
  if [ -n "$gateway_pid" ] && kill -0 "$gateway_pid" 2>/dev/null; then
    kill "$gateway_pid"
    wait "$gateway_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
cp -r "$repo/config" "$work/config"
cd "$work"

KOODRIVE_GATEWAY__SERVER__LISTEN=127.0.0.1:0 \
  KOODRIVE_GATEWAY__SERVER__ADMIN_LISTEN=127.0.0.1:0 \
  RUST_LOG=info \
  "$bin" serve >"$work/gateway.log" 2>&1 &
gateway_pid=$!

addr=""
for _ in $(seq 1 600); do
  addr="$(grep -o 'listening on https://[0-9.:]*' "$work/gateway.log" | head -n1 | sed 's|listening on https://||' || true)"
  [ -n "$addr" ] && break
  kill -0 "$gateway_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "the gateway did not start:" >&2
  cat "$work/gateway.log" >&2
  exit 1
fi
token="$("$bin" dev-token --user u-1001 --ttl 3600)"
echo "gateway on https://$addr"

# The contract's checks that no schema can state (X-Traceid kept, and
# equal to the error body's traceId).
export SCHEMATHESIS_HOOKS="$repo/.ci/schemathesis_hooks.py"
extra=()
read -r -a extra <<<"${SCHEMATHESIS_EXTRA_ARGS:-}"
status=0
for seed in "${seeds[@]}"; do
  echo "--- schemathesis, seed $seed, $max_examples examples"
  # Every check but the stateful ones (one operation, no links, no
  # resources) — not_a_server_error, status_code_conformance,
  # content_type_conformance, response_schema_conformance and
  # response_headers_conformance among them — and the hooks' own.
  schemathesis --config-file "$repo/.ci/schemathesis.toml" run "$repo/openapi.yaml" \
    --url "https://$addr" \
    --tls-verify "$work/certs/dev/ca.crt" \
    --header "Authorization: Bearer $token" \
    --checks all \
    --exclude-checks use_after_free,ensure_resource_availability \
    --phases examples,coverage,fuzzing \
    --max-examples "$max_examples" \
    --seed "$seed" \
    --workers 2 \
    --request-timeout 10 \
    --no-color \
    "${extra[@]}" || status=1
done

# Whatever schemathesis saw: the gateway is still up, and it never
# panicked, logged an error or answered a 5xx on its way.
if ! kill -0 "$gateway_pid" 2>/dev/null; then
  echo "the gateway exited during the run" >&2
  status=1
fi
if grep -E 'panicked| ERROR | status=5[0-9]{2} ' "$work/gateway.log" >&2; then
  echo "the gateway logged errors during the run (above)" >&2
  status=1
fi
exit "$status"
