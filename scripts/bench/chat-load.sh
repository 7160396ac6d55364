#!/usr/bin/env bash
# Load on the chat example: two chat server processes on one backend, a swarm of websocket
# clients spread over both (examples/chat/src/bin/swarm.rs), delivery latency p50/p99 and
# messages lost. Needs the brokers up (scripts/brokers/*.sh).
#
#   scripts/bench/chat-load.sh amqp|kafka|zmq|memory [CLIENTS] [ROOMS] [ROUNDS] [INTERVAL_MS]
#
# memory runs one server process (the in-memory layer does not cross processes).
# CHAT_LOAD_OPTIONS adds URL options (e.g. CHAT_LOAD_OPTIONS='kafka.fetch.wait.max.ms=10').
set -euo pipefail
cd "$(dirname "$0")/../.."
backend=${1:?usage: scripts/bench/chat-load.sh amqp|kafka|zmq|memory [CLIENTS] [ROOMS] [ROUNDS] [INTERVAL_MS]}
clients=${2:-500}
rooms=${3:-25}
rounds=${4:-40}
interval=${5:-100}
target=${CARGO_TARGET_DIR:-target}
cargo build -q --release -p chanlayer-chat -p chanlayer-cli
bin=$target/release
prefix=load$RANDOM$RANDOM
ulimit -n 8192 2>/dev/null || true

pids=()
logs=$(mktemp -d)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$logs"; }
trap cleanup EXIT

case $backend in
  amqp) url="amqp://guest:guest@127.0.0.1:5672/%2f?prefix=$prefix&queue_expires=600s" ;;
  kafka) url="kafka://127.0.0.1:9092?prefix=$prefix" ;;
  zmq)
    "$bin/chanlayer" zmq-proxy --pull tcp://127.0.0.1:7611 --pub tcp://127.0.0.1:7612 >"$logs/proxy" 2>&1 &
    pids+=($!)
    # Listening, or gone (e.g. the ports of a proxy that is still stopping): say why.
    for _ in $(seq 1 100); do
      grep -q listening "$logs/proxy" && break
      kill -0 "${pids[-1]}" 2>/dev/null || break
      sleep 0.1
    done
    grep -q listening "$logs/proxy" || { echo "the zmq proxy did not start:" >&2; cat "$logs/proxy" >&2; exit 1; }
    url="zmq://?pull=tcp://127.0.0.1:7611&pub=tcp://127.0.0.1:7612&prefix=$prefix" ;;
  memory) url="memory://" ;;
  *) echo "unknown backend $backend" >&2; exit 2 ;;
esac

if [ -n "${CHAT_LOAD_OPTIONS:-}" ]; then
  case $url in *\?*) url="$url&$CHAT_LOAD_OPTIONS" ;; *) url="$url?$CHAT_LOAD_OPTIONS" ;; esac
fi

ports=(8701 8702)
[ "$backend" = memory ] && ports=(8701)
servers=()
for port in "${ports[@]}"; do
  CHANLAYER_URL=$url "$bin/chat" --port "$port" >"$logs/chat-$port" 2>&1 &
  pids+=($!)
  servers+=("ws://127.0.0.1:$port/ws")
done
for port in "${ports[@]}"; do
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "chat server on $port not healthy:" >&2; tail -5 "$logs/chat-$port" >&2; exit 1; }
done
IFS=,; list="${servers[*]}"; unset IFS
"$bin/chat-swarm" --servers "$list" --clients "$clients" --rooms "$rooms" --rounds "$rounds" --interval-ms "$interval" --label "$backend"
