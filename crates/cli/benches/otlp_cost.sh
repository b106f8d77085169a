#!/bin/bash
# Command MB-otlp (BENCHMARKS.md): what metrics and exported spans cost routed reads and
# echo turns. `switchyard dev` runs as its own process, in turn plain, with --metrics-listen
# and --otlp-endpoint at a 10% sample, and with every trace exported, three rounds; each is
# driven by `switchyard bench --target`. The collector is examples/otlp_sink.
#
#   cargo build --release -p switchyard-cli --bins --example otlp_sink
#   crates/cli/benches/otlp_cost.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
BIN=target/release/switchyard
WORK=$(mktemp -d)
target/release/examples/otlp_sink 127.0.0.1:4399 2> "$WORK/sink.log" &
SINK=$!
trap 'kill $SINK 2>/dev/null; rm -rf "$WORK"' EXIT
run() { # label, then the dev flags
  local label=$1
  shift
  rm -rf "$WORK/data"
  "$BIN" dev --listen 127.0.0.1:50081 --data-dir "$WORK/data" "$@" > "$WORK/dev.out" 2> "$WORK/dev.err" &
  local dev=$!
  for _ in $(seq 1 100); do
    grep -q "Ctrl-C" "$WORK/dev.out" 2> /dev/null && break
    sleep 0.1
  done
  for scenario in get-context send-message; do
    "$BIN" bench --target http://127.0.0.1:50081 --scenario "$scenario" --concurrency 32 \
      --duration 8s --no-baseline 2> /dev/null | grep -E "^$scenario +[0-9]" | awk -v l="$label" '{print l, $1, $2, $3}'
  done
  kill -TERM "$dev"
  wait "$dev" || true
}
for round in 1 2 3; do
  echo "round $round"
  run off
  run sampled --metrics-listen 127.0.0.1:50091 --otlp-endpoint http://127.0.0.1:4399 --otlp-sample-ratio 0.1
  run every --metrics-listen 127.0.0.1:50091 --otlp-endpoint http://127.0.0.1:4399
done
tail -1 "$WORK/sink.log"
