#!/usr/bin/env bash
# Makes sure RabbitMQ runs for the AMQP tests, on a fresh Debian machine or a warm one:
#   - installed (Debian's rabbitmq-server) if missing,
#   - listening on 127.0.0.1:5672 (amqp, guest/guest) and 127.0.0.1:5671 (amqps),
#   - the amqps listener using a throwaway test CA made here with openssl, into
#     $CHANLAYER_TLS_DIR (default /var/lib/chanlayer-tests/tls), which the TLS tests read.
# A no-op (a second or two) when all of that is already true. Needs root (apt-get, /etc).
set -euo pipefail

TLS_DIR=${CHANLAYER_TLS_DIR:-/var/lib/chanlayer-tests/tls}
CONF=/etc/rabbitmq/rabbitmq.conf
ENV_CONF=/etc/rabbitmq/rabbitmq-env.conf
WAIT=90   # seconds any one wait may take

say() { printf 'rabbitmq: %s\n' "$*"; }
die() { printf 'rabbitmq: ERROR: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

tls_ok() {
  [ -f "$TLS_DIR/ca_certificate.pem" ] || return 1
  openssl s_client -connect 127.0.0.1:5671 -servername localhost \
    -CAfile "$TLS_DIR/ca_certificate.pem" -verify_return_error </dev/null 2>/dev/null |
    grep -q 'Verify return code: 0 (ok)'
}

node_running() { rabbitmqctl -q status >/dev/null 2>&1; }

wait_for() { # wait_for DESCRIPTION COMMAND...: polls until COMMAND succeeds, at most $WAIT s
  local what=$1; shift
  local deadline=$(( $(date +%s) + WAIT ))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${WAIT}s waiting for $what"
    sleep 0.5
  done
}

# Fast path: everything is up already.
if command -v rabbitmqctl >/dev/null 2>&1 && port_open 5672 && tls_ok; then
  say "up on 127.0.0.1:5672 (amqp) and 127.0.0.1:5671 (amqps, CA $TLS_DIR/ca_certificate.pem)"
  exit 0
fi

# 1. Install.
if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
  say "installing Debian's rabbitmq-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq rabbitmq-server openssl >/dev/null
  # The package may start a node through its init script; we manage it ourselves below.
fi

# 2. The test CA and the broker's certificate (once; shared with kafka.sh).
# shellcheck source=../lib/test-ca.sh
. "$(dirname "$0")/../lib/test-ca.sh"
ensure_test_ca

# 3. Configuration: our block between markers, the rest of the file kept.
mkdir -p /etc/rabbitmq
block="# BEGIN chanlayer-tests (scripts/brokers/rabbitmq.sh)
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $TLS_DIR/ca_certificate.pem
ssl_options.certfile = $TLS_DIR/server_certificate.pem
ssl_options.keyfile = $TLS_DIR/server_key.pem
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
# END chanlayer-tests"
touch "$CONF"
old=$(cat "$CONF")
rest=$(printf '%s\n' "$old" | sed '/^# BEGIN chanlayer-tests/,/^# END chanlayer-tests/d')
if ! printf '%s\n' "$rest" | grep -q '^listeners\.tcp\.'; then
  rest=$(printf '%s\n%s' "$rest" "listeners.tcp.local = 127.0.0.1:5672")
fi
new=$(printf '%s\n%s\n' "$rest" "$block" | sed '/./,$!d')
changed=0
if [ "$new" != "$old" ]; then
  printf '%s\n' "$new" >"$CONF"
  changed=1
  say "wrote the TLS listener into $CONF"
fi
if [ ! -f "$ENV_CONF" ]; then
  # Keep the node (and its Erlang distribution port) on loopback, named rabbit@localhost.
  printf 'NODENAME=rabbit@localhost\nERL_EPMD_ADDRESS=127.0.0.1\n' >"$ENV_CONF"
fi

# 4. Start, or restart so the node reads the configuration (it does only at boot).
if node_running && { [ "$changed" = 1 ] || ! tls_ok; }; then
  say "restarting the node to load its configuration"
  rabbitmqctl -q stop >/dev/null 2>&1 || true
  wait_for "the old node to stop" bash -c '! rabbitmqctl -q status >/dev/null 2>&1'
fi
if ! node_running; then
  say "starting rabbitmq-server"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for "the node to boot" node_running
  rabbitmqctl -q await_startup --timeout "$WAIT" >/dev/null || die "the node did not finish starting"
fi

# 5. Check what the tests rely on.
wait_for "127.0.0.1:5672 to accept connections" port_open 5672
wait_for "a verified TLS handshake on 127.0.0.1:5671" tls_ok
rabbitmqctl -q authenticate_user guest guest >/dev/null 2>&1 ||
  die "user guest/guest cannot log in (the tests connect as guest on loopback)"
say "up on 127.0.0.1:5672 (amqp) and 127.0.0.1:5671 (amqps, CA $TLS_DIR/ca_certificate.pem)"
