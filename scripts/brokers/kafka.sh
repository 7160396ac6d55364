#!/usr/bin/env bash
# Makes sure a Kafka-protocol broker runs for the Kafka tests, on a fresh machine or a warm one.
#
# Apache Kafka is not in any registry these machines reach, so the tests use tansu
# (https://crates.io/crates/tansu), an Apache-Kafka-compatible broker written in Rust:
#   - built once with cargo into $CHANLAYER_TANSU (default ~/.cargo/bin/tansu): about 20
#     minutes on 2 cores the first time, nothing after that,
#   - started in the background on 127.0.0.1:${CHANLAYER_KAFKA_PORT:-9092} with in-memory
#     storage (log: $CHANLAYER_STATE_DIR/tansu.log, default /var/lib/chanlayer-tests),
#   - and a PostgreSQL database for the broker-restart test, where messages must survive the
#     broker: $CHANLAYER_TANSU_PG (default postgres://chanlayer:chanlayer@127.0.0.1/chanlayer_tansu),
#     made here if missing (PostgreSQL itself is installed and started if missing).
# With KAFKA_BOOTSTRAP set, the tests use that broker instead and only the tansu binary (for
# the restart test) is made sure of. A no-op (well under a second) when all is there.
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
if [ ! -x "$TANSU" ]; then
  say "building tansu $TANSU_VERSION into $TANSU (once; about 20 minutes on 2 cores)"
  root=$(dirname "$(dirname "$TANSU")")
  cargo install --locked --quiet tansu --version "$TANSU_VERSION" \
    --features dynostore,postgres --root "$root" ||
    die "cargo install tansu failed (see above)"
  [ -x "$TANSU" ] || die "tansu was installed but $TANSU is not there"
fi

# 2. PostgreSQL and the restart test's database.
PG_URL=${CHANLAYER_TANSU_PG:-postgres://chanlayer:chanlayer@127.0.0.1/chanlayer_tansu}
pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
as_postgres() { # runs psql as the postgres superuser: over TCP (trust) or via su (peer)
  psql -v ON_ERROR_STOP=1 -qtA -h 127.0.0.1 -U postgres -d postgres -c "$1" 2>/dev/null ||
    su postgres -c "psql -v ON_ERROR_STOP=1 -qtA -d postgres -c \"$1\""
}
if [ -z "${CHANLAYER_TANSU_PG:-}" ]; then
  if ! command -v pg_isready >/dev/null 2>&1; then
    say "installing PostgreSQL (Debian's postgresql)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null ||
      die "apt-get install postgresql failed"
  fi
  if ! pg_ready; then
    say "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start ||
      die "could not start PostgreSQL"
    wait_for "PostgreSQL on 127.0.0.1:5432" pg_ready
  fi
  if [ "$(as_postgres "select 1 from pg_roles where rolname = 'chanlayer'")" != 1 ]; then
    as_postgres "create role chanlayer login password 'chanlayer'" >/dev/null
  fi
  if [ "$(as_postgres "select 1 from pg_database where datname = 'chanlayer_tansu'")" != 1 ]; then
    as_postgres "create database chanlayer_tansu owner chanlayer" >/dev/null
  fi
fi

# 3. The broker the tests use.
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
