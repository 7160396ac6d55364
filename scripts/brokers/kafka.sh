#!/usr/bin/env bash
# Makes sure a Kafka-protocol broker runs for the Kafka tests, on a fresh machine or a warm one.
#
# Apache Kafka is not in any registry these machines reach, so the tests use tansu
# (https://crates.io/crates/tansu), an Apache-Kafka-compatible broker written in Rust:
#   - built once with cargo into $CHANLAYER_TANSU (default ~/.cargo/bin/tansu), with the
#     storage features the tests use (dynostore: memory; libsql: SQLite, for the restart
#     test, whose data must survive the broker): about 20 minutes on 2 cores the first
#     time, nothing after that (a stamp file next to the binary records how it was built),
#   - started in the background on 127.0.0.1:${CHANLAYER_KAFKA_PORT:-9092} with in-memory
#     storage (log: $CHANLAYER_STATE_DIR/tansu.log, default /var/lib/chanlayer-tests).
# With KAFKA_BOOTSTRAP set, the tests use that broker instead (the restart test still runs
# its own tansu). A no-op (well under a second) when all is there.
set -euo pipefail

TANSU=${CHANLAYER_TANSU:-$HOME/.cargo/bin/tansu}
TANSU_VERSION=0.6.0
PORT=${CHANLAYER_KAFKA_PORT:-9092}
STATE=${CHANLAYER_STATE_DIR:-/var/lib/chanlayer-tests}
WAIT=60

say() { printf 'kafka: %s\n' "$*"; }
die() { printf 'kafka: ERROR: %s\n' "$*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # wait_for DESCRIPTION COMMAND...: polls until COMMAND succeeds, at most $WAIT s
  local what=$1; shift
  local deadline=$(( $(date +%s) + WAIT ))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${WAIT}s waiting for $what"
    sleep 0.2
  done
}

# 1. The tansu binary.
STAMP="$TANSU.chanlayer-build"
WANT="tansu $TANSU_VERSION features dynostore,libsql"
if [ ! -x "$TANSU" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  say "building $WANT into $TANSU (once; about 20 minutes on 2 cores)"
  root=$(dirname "$(dirname "$TANSU")")
  cargo install --locked --quiet --force tansu --version "$TANSU_VERSION" \
    --features dynostore,libsql --root "$root" ||
    die "cargo install tansu failed (see above)"
  [ -x "$TANSU" ] || die "tansu was installed but $TANSU is not there"
  echo "$WANT" >"$STAMP"
fi

# 2. The broker the tests use.
if [ -n "${KAFKA_BOOTSTRAP:-}" ]; then
  say "tests use KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP; tansu at $TANSU for the restart test"
  exit 0
fi
if port_open "$PORT"; then
  say "a broker is up on 127.0.0.1:$PORT; tansu at $TANSU"
  exit 0
fi
mkdir -p "$STATE"
say "starting tansu on 127.0.0.1:$PORT (memory storage; log $STATE/tansu.log)"
setsid nohup "$TANSU" broker \
  --listener-url "tcp://127.0.0.1:$PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$PORT" \
  --storage-engine memory://tansu/ >"$STATE/tansu.log" 2>&1 </dev/null &
echo $! >"$STATE/tansu.pid"
wait_for "tansu on 127.0.0.1:$PORT (log: $STATE/tansu.log)" port_open "$PORT"
say "up on 127.0.0.1:$PORT"
