#!/usr/bin/env bash
# Apache Kafka (KRaft) for the Kafka tests, on a fresh machine or a warm one.
#
#   scripts/brokers/kafka.sh                 the tests' broker (what scripts/test runs)
#   scripts/brokers/kafka.sh nodes DIR PORT N   format (once) and start N KRaft nodes in DIR
#   scripts/brokers/kafka.sh start DIR ID    start node ID of DIR again (same log directory)
#   scripts/brokers/kafka.sh stop DIR        stop every node of DIR (SIGTERM, then SIGKILL)
#
# 1. Fetches the broker once: org.apache.kafka:kafka_2.13 ($KAFKA_VERSION) and its runtime
#    dependencies from Maven Central, with Maven (kafka-pom.xml next to this script), into
#    $CHANLAYER_KAFKA_HOME/libs (default ~/.cache/chanlayer/kafka-$KAFKA_VERSION), outside
#    the clone. Nothing is fetched when it is there.
# 2. With no arguments: one combined broker+controller in $CHANLAYER_STATE_DIR/kafka
#    (default /var/lib/chanlayer-tests/kafka), formatted once, listening on
#      127.0.0.1:$PORT     PLAINTEXT              (PORT = $CHANLAYER_KAFKA_PORT, default 9092)
#      127.0.0.1:$PORT+1   the KRaft controller
#      127.0.0.1:$PORT+2   SASL_SSL, SCRAM-SHA-512, user $KAFKA_SASL_USERNAME (made at format)
#      127.0.0.1:$PORT+3   SSL (TLS only)
#    with the throwaway test CA of scripts/lib/test-ca.sh ($CHANLAYER_TLS_DIR). A no-op
#    (well under a second) when it answers already. With KAFKA_BOOTSTRAP set, the suite's
#    tests use that cluster instead; the broker is fetched all the same (the restart and
#    cluster tests start their own nodes with `nodes`).
# 3. `nodes DIR PORT N`: N nodes, all voters, node i (1..N) on 127.0.0.1:PORT+i-1 (PLAINTEXT)
#    and its controller on 127.0.0.1:PORT+100+i-1; with N >= 3, internal topics have 3
#    replicas and min.insync.replicas is 2. Each node's pid is in DIR/n<i>/pid, its log in
#    DIR/n<i>/server.log. Prints the bootstrap list. The restart test and the 3-broker
#    cluster test use it; so can you (docs/backends/kafka.md).
# Needs Java 17+ and Maven (installed on these machines); the first fetch takes ~15 s.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
KAFKA_HOME=${CHANLAYER_KAFKA_HOME:-$HOME/.cache/chanlayer/kafka-$KAFKA_VERSION}
LIBS=$KAFKA_HOME/libs
PORT=${CHANLAYER_KAFKA_PORT:-9092}
STATE=${CHANLAYER_STATE_DIR:-/var/lib/chanlayer-tests}
TLS_DIR=${CHANLAYER_TLS_DIR:-$STATE/tls}
SASL_USER=${KAFKA_SASL_USERNAME:-chanlayer}
SASL_PASSWORD=${KAFKA_SASL_PASSWORD:-chanlayer-test-secret}
HEAP=${CHANLAYER_KAFKA_HEAP:--Xms256m -Xmx1g}
WAIT=${CHANLAYER_KAFKA_WAIT:-120}

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

# 1. The broker's jars.
ensure_libs() {
  local stamp="$KAFKA_HOME/.complete"
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "kafka_2.13 $KAFKA_VERSION" ] && return 0
  command -v mvn >/dev/null 2>&1 || die "Maven (mvn) is needed to fetch Apache Kafka from Maven Central"
  command -v java >/dev/null 2>&1 || die "Java 17+ (java) is needed to run Apache Kafka"
  say "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its dependencies into $LIBS (once)"
  rm -rf "$LIBS"
  mkdir -p "$LIBS"
  mvn -q -B -Dstyle.color=never -f "$HERE/kafka-pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS" ||
    die "mvn could not fetch Apache Kafka $KAFKA_VERSION (see above)"
  ls "$LIBS"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || die "no kafka_2.13 jar in $LIBS"
  echo "kafka_2.13 $KAFKA_VERSION" >"$stamp"
}

kafka_java() { # kafka_java LOG4J_CONFIG ARGS...: the JVM with the broker's class path
  local log4j=$1; shift
  java -Djava.awt.headless=true -Dlog4j2.configurationFile="$log4j" -cp "$LIBS/*" "$@"
}

# write_node DIR ID PORT CTRL VOTERS COUNT SECURE: DIR/n<ID>/{server.properties,log4j2.properties}
write_node() {
  local dir=$1 id=$2 port=$3 ctrl=$4 voters=$5 count=$6 secure=$7
  local nd="$dir/n$id" rf=1 isr=1
  [ "$count" -ge 3 ] && { rf=3; isr=2; }
  mkdir -p "$nd"
  local listeners="PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctrl"
  local advertised="PLAINTEXT://127.0.0.1:$port"
  local map="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  if [ "$secure" = 1 ]; then
    listeners="$listeners,SASL_SSL://127.0.0.1:$((port + 2)),SSL://127.0.0.1:$((port + 3))"
    advertised="$advertised,SASL_SSL://127.0.0.1:$((port + 2)),SSL://127.0.0.1:$((port + 3))"
    map="$map,SASL_SSL:SASL_SSL,SSL:SSL"
  fi
  cat >"$nd/server.properties" <<PROPS
# Written by scripts/brokers/kafka.sh
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$map
inter.broker.listener.name=PLAINTEXT
log.dirs=$nd/data
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
auto.create.topics.enable=false
delete.topic.enable=true
message.max.bytes=8388608
replica.fetch.max.bytes=8388608
log.segment.bytes=67108864
PROPS
  if [ "$secure" = 1 ]; then
    cat >>"$nd/server.properties" <<PROPS
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/kafka_keystore.pem
ssl.client.auth=none
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
PROPS
  fi
  cat >"$nd/log4j2.properties" <<PROPS
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $nd/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
PROPS
}

node_pid() { cat "$1/n$2/pid" 2>/dev/null || true; }
node_alive() { # a live process, not a zombie (a killed node nobody reaped)
  local p st
  p=$(node_pid "$1" "$2")
  [ -n "$p" ] || return 1
  st=$(ps -o stat= -p "$p" 2>/dev/null) || return 1
  case "$st" in Z*) return 1 ;; esac
}
node_port() { sed -n 's#^advertised.listeners=PLAINTEXT://127.0.0.1:\([0-9]*\).*#\1#p' "$1/n$2/server.properties"; }

start_node() { # start_node DIR ID: starts a formatted node in the background (no wait)
  local dir=$1 id=$2 nd="$1/n$2"
  [ -f "$nd/server.properties" ] || die "no node $id in $dir (make it with: kafka.sh nodes DIR PORT N)"
  node_alive "$dir" "$id" && return 0
  # A node killed a moment ago may still hold its ports while it dies.
  local port
  port=$(node_port "$dir" "$id")
  port_free() { ! port_open "$port"; }
  wait_for "127.0.0.1:$port to be free (a node of $dir still dying?)" port_free
  rm -f "$nd/pid"
  # The JVM writes its own pid (setsid forks when it leads a process group, so $! can be
  # the wrong process); its own session, so it outlives this script and its caller.
  # shellcheck disable=SC2016,SC2086
  setsid nohup bash -c 'echo $$ >"$1/pid"; shift; exec "$@"' _ "$nd" \
    java -Djava.awt.headless=true $HEAP -Dlog4j2.configurationFile="$nd/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$nd/server.properties" >"$nd/stdout.log" 2>&1 </dev/null &
  local deadline=$(( $(date +%s) + 10 ))
  until [ -s "$nd/pid" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "node $id of $dir did not start (log: $nd/stdout.log)"
    sleep 0.05
  done
}

wait_node() { # wait_node DIR ID: until its PLAINTEXT port answers (or the process died)
  local dir=$1 id=$2 port
  port=$(node_port "$dir" "$id")
  check() { port_open "$port" || { node_alive "$dir" "$id" || die "node $id of $dir exited (log: $dir/n$id/server.log, $dir/n$id/stdout.log)"; false; }; }
  wait_for "node $id on 127.0.0.1:$port (log: $dir/n$id/server.log)" check
}

# make_nodes DIR PORT COUNT SECURE: writes, formats (once) and starts COUNT nodes; waits for all.
make_nodes() {
  local dir=$1 port=$2 count=$3 secure=$4 voters="" i
  mkdir -p "$dir"
  for i in $(seq 1 "$count"); do
    voters="${voters:+$voters,}$i@127.0.0.1:$((port + 100 + i - 1))"
  done
  [ "$count" = 1 ] && [ "$secure" = 1 ] && voters="1@127.0.0.1:$((port + 1))"
  for i in $(seq 1 "$count"); do
    local ctrl=$((port + 100 + i - 1))
    [ "$count" = 1 ] && [ "$secure" = 1 ] && ctrl=$((port + 1))
    write_node "$dir" "$i" "$((port + i - 1))" "$ctrl" "$voters" "$count" "$secure"
  done
  if ! grep -Eq '^[A-Za-z0-9_-]{22}$' "$dir/cluster.id" 2>/dev/null; then
    kafka_java "$dir/n1/log4j2.properties" kafka.tools.StorageTool random-uuid 2>/dev/null |
      tail -n 1 >"$dir/cluster.id"
    grep -Eq '^[A-Za-z0-9_-]{22}$' "$dir/cluster.id" ||
      die "kafka.tools.StorageTool random-uuid gave no cluster id: $(cat "$dir/cluster.id")"
  fi
  for i in $(seq 1 "$count"); do
    if [ ! -f "$dir/n$i/data/meta.properties" ]; then
      local scram=()
      [ "$secure" = 1 ] && scram=(--add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]")
      kafka_java "$dir/n$i/log4j2.properties" kafka.tools.StorageTool format --ignore-formatted \
        -t "$(cat "$dir/cluster.id")" -c "$dir/n$i/server.properties" "${scram[@]}" >"$dir/n$i/format.log" 2>&1 ||
        die "formatting node $i failed: $(cat "$dir/n$i/format.log")"
    fi
  done
  for i in $(seq 1 "$count"); do start_node "$dir" "$i"; done
  for i in $(seq 1 "$count"); do wait_node "$dir" "$i"; done
}

stop_nodes() { # stop_nodes DIR: SIGTERM every node, SIGKILL what is left after $WAIT s
  local dir=$1 nd p
  for nd in "$dir"/n*; do
    p=$(cat "$nd/pid" 2>/dev/null || true)
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  for nd in "$dir"/n*; do
    p=$(cat "$nd/pid" 2>/dev/null || true)
    [ -n "$p" ] || continue
    local deadline=$(( $(date +%s) + WAIT ))
    while kill -0 "$p" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
    rm -f "$nd/pid"
  done
}

case "${1:-}" in
  nodes)
    [ $# = 4 ] || die "usage: kafka.sh nodes DIR PORT COUNT"
    ensure_libs
    make_nodes "$2" "$3" "$4" 0
    list=""
    for i in $(seq 1 "$4"); do list="${list:+$list,}127.0.0.1:$(( $3 + i - 1 ))"; done
    echo "$list"
    exit 0 ;;
  start)
    [ $# = 3 ] || die "usage: kafka.sh start DIR ID"
    ensure_libs
    start_node "$2" "$3"
    wait_node "$2" "$3"
    exit 0 ;;
  stop)
    [ $# = 2 ] || die "usage: kafka.sh stop DIR"
    stop_nodes "$2"
    exit 0 ;;
  "") ;;
  *) die "unknown command '$1' (nodes, start, stop, or none)" ;;
esac

# The tests' broker.
ensure_libs
if [ -n "${KAFKA_BOOTSTRAP:-}" ]; then
  say "the suite uses KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP; Apache Kafka $KAFKA_VERSION in $LIBS for the restart and cluster tests"
  exit 0
fi
DIR=$STATE/kafka
if node_alive "$DIR" 1 && port_open "$PORT" && port_open $((PORT + 2)) && port_open $((PORT + 3)); then
  say "up on 127.0.0.1:$PORT (PLAINTEXT), :$((PORT + 2)) (SASL_SSL, SCRAM-SHA-512), :$((PORT + 3)) (SSL)"
  exit 0
fi
port_open "$PORT" && die "something else listens on 127.0.0.1:$PORT (stop it, or set KAFKA_BOOTSTRAP to use it)"
# shellcheck source=../lib/test-ca.sh
. "$HERE/../lib/test-ca.sh"
ensure_test_ca
cat "$TLS_DIR/server_key.pem" "$TLS_DIR/server_certificate.pem" >"$TLS_DIR/kafka_keystore.pem.tmp"
mv "$TLS_DIR/kafka_keystore.pem.tmp" "$TLS_DIR/kafka_keystore.pem"
chmod 0644 "$TLS_DIR/kafka_keystore.pem"
say "starting Apache Kafka $KAFKA_VERSION (KRaft, one node) in $DIR"
make_nodes "$DIR" "$PORT" 1 1
wait_for "SASL_SSL on 127.0.0.1:$((PORT + 2))" port_open $((PORT + 2))
wait_for "SSL on 127.0.0.1:$((PORT + 3))" port_open $((PORT + 3))
say "up on 127.0.0.1:$PORT (PLAINTEXT), :$((PORT + 2)) (SASL_SSL, SCRAM-SHA-512 user $SASL_USER), :$((PORT + 3)) (SSL); log $DIR/n1/server.log"
