#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on loopback, for the AMQP high-availability test
# (crates/chanlayer-amqp/tests/cluster.rs, which runs `scripts/cluster/rabbitmq.sh start`).
#
#   scripts/cluster/rabbitmq.sh start    start the nodes and join them (a no-op, about a
#                                        second, when the cluster is whole already)
#   scripts/cluster/rabbitmq.sh stop     stop every node of the cluster
#   scripts/cluster/rabbitmq.sh status   each node's state, and the cluster's members
#
# Three nodes of Debian's rabbitmq-server, beside the main test node (rabbit@$(hostname),
# 127.0.0.1:5672, which this script never touches; they share epmd on 4369):
#
#   node                  AMQP             Erlang distribution
#   chanlayer-a@localhost 127.0.0.1:5681   25681
#   chanlayer-b@localhost 127.0.0.1:5682   25682
#   chanlayer-c@localhost 127.0.0.1:5683   25683
#
# Data, logs and configuration under $CHANLAYER_CLUSTER_DIR (default
# /var/lib/chanlayer-tests/rabbitmq-cluster); no plugins (no management); user guest/guest
# (loopback only, RabbitMQ's default). The nodes run as the rabbitmq user, like the main node,
# so they share its Erlang cookie (/var/lib/rabbitmq/.erlang.cookie). b and c join a with
# `rabbitmqctl stop_app; reset; join_cluster; start_app`.
#
# RabbitMQ must be installed (scripts/brokers/rabbitmq.sh installs it). Needs root.
# Every wait polls with a deadline ($WAIT seconds); nothing sleeps a fixed time.
set -euo pipefail

DIR=${CHANLAYER_CLUSTER_DIR:-/var/lib/chanlayer-tests/rabbitmq-cluster}
NODES=(a b c)
WAIT=120

say() { printf 'rabbitmq-cluster: %s\n' "$*"; }
die() { printf 'rabbitmq-cluster: ERROR: %s\n' "$*" >&2; exit 1; }

node() { printf 'chanlayer-%s@localhost' "$1"; }
amqp_port() { case $1 in a) echo 5681 ;; b) echo 5682 ;; c) echo 5683 ;; esac; }
dist_port() { echo $(( $(amqp_port "$1") + 20000 )); }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ctl() { # ctl NODE-LETTER ARGS...: rabbitmqctl against that node
  local n=$1; shift
  rabbitmqctl -q -n "$(node "$n")" "$@"
}

# The Erlang node answers (RabbitMQ itself may be stopped: stop_app).
erlang_up() { rabbitmq-diagnostics -q -n "$(node "$1")" ping >/dev/null 2>&1; }
# RabbitMQ runs on the node and takes AMQP connections.
app_up() { port_open "$(amqp_port "$1")"; }

wait_for() { # wait_for DESCRIPTION COMMAND...: polls until COMMAND succeeds, at most $WAIT s
  local what=$1; shift
  local deadline=$(( $(date +%s) + WAIT ))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${WAIT}s waiting for $what (logs: $DIR/log)"
    sleep 0.2
  done
}

# The running members of the cluster as node a sees them, one per line.
running_members() {
  ctl a cluster_status --formatter json 2>/dev/null |
    tr -d '\n ' | sed -n 's/.*"running_nodes":\[\([^]]*\)\].*/\1/p' | tr ',' '\n' | tr -d '"'
}
# The disc members (running or not), one per line.
members() {
  ctl a cluster_status --formatter json 2>/dev/null |
    tr -d '\n ' | sed -n 's/.*"disk_nodes":\[\([^]]*\)\].*/\1/p' | tr ',' '\n' | tr -d '"'
}

whole() {
  for n in "${NODES[@]}"; do app_up "$n" || return 1; done
  [ "$(running_members | grep -c '^chanlayer-')" = 3 ]
}

prepare() { # the node's directories, configuration and (empty) plugin list
  local n=$1 base="$DIR/$1"
  mkdir -p "$base/mnesia" "$DIR/log/$n"
  cat >"$base/rabbitmq.conf" <<CONF
# Written by scripts/cluster/rabbitmq.sh: node $(node "$n").
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
listeners.ssl = none
log.file.level = info
CONF
  echo '[].' >"$base/enabled_plugins"
  : >"$base/rabbitmq-env.conf"
  chown -R rabbitmq:rabbitmq "$DIR"
}

launch() { # starts node $1's Erlang VM and RabbitMQ in the background (as user rabbitmq)
  local n=$1 base="$DIR/$1"
  (
    export RABBITMQ_NODENAME RABBITMQ_NODE_IP_ADDRESS RABBITMQ_NODE_PORT RABBITMQ_DIST_PORT \
      RABBITMQ_MNESIA_BASE RABBITMQ_LOG_BASE RABBITMQ_CONFIG_FILE RABBITMQ_ADVANCED_CONFIG_FILE \
      RABBITMQ_ENABLED_PLUGINS_FILE RABBITMQ_CONF_ENV_FILE ERL_EPMD_ADDRESS
    RABBITMQ_NODENAME=$(node "$n")
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODE_PORT=$(amqp_port "$n")
    RABBITMQ_DIST_PORT=$(dist_port "$n")
    RABBITMQ_MNESIA_BASE=$base/mnesia
    RABBITMQ_LOG_BASE=$DIR/log/$n
    RABBITMQ_CONFIG_FILE=$base/rabbitmq.conf
    RABBITMQ_ADVANCED_CONFIG_FILE=$base/advanced.config
    RABBITMQ_ENABLED_PLUGINS_FILE=$base/enabled_plugins
    RABBITMQ_CONF_ENV_FILE=$base/rabbitmq-env.conf
    ERL_EPMD_ADDRESS=127.0.0.1
    # rabbitmq-server (Debian's wrapper) switches to the rabbitmq user and keeps this
    # environment; -detached returns once the VM is started.
    rabbitmq-server -detached >>"$DIR/log/$n/start.log" 2>&1
  ) || die "rabbitmq-server would not start node $(node "$n") (see $DIR/log/$n)"
}

start() {
  command -v rabbitmq-server >/dev/null 2>&1 && command -v rabbitmqctl >/dev/null 2>&1 ||
    die "RabbitMQ is not installed; run scripts/brokers/rabbitmq.sh first (it installs Debian's rabbitmq-server)"
  if whole; then
    say "up: $(node a) 127.0.0.1:5681, $(node b) 127.0.0.1:5682, $(node c) 127.0.0.1:5683"
    return 0
  fi
  # 1. Erlang VMs: start every node that is down (never started, stopped, or killed), all
  #    at once (a stopped cluster's nodes wait for each other at boot).
  local launched=""
  for n in "${NODES[@]}"; do
    if ! erlang_up "$n"; then
      prepare "$n"
      say "starting $(node "$n")"
      launch "$n"
      launched="$launched $n"
    fi
  done
  for n in "${NODES[@]}"; do
    wait_for "$(node "$n") to answer" erlang_up "$n"
  done
  # 2. RabbitMQ on each: a node that was up with RabbitMQ stopped (rabbitmqctl stop_app)
  #    is started again; one launched above boots by itself.
  for n in "${NODES[@]}"; do
    case " $launched " in *" $n "*) continue ;; esac
    if ! app_up "$n"; then
      say "starting RabbitMQ on $(node "$n") (start_app)"
      ctl "$n" start_app >/dev/null || die "rabbitmqctl -n $(node "$n") start_app failed"
    fi
  done
  for n in "${NODES[@]}"; do
    wait_for "RabbitMQ on $(node "$n") (127.0.0.1:$(amqp_port "$n"))" app_up "$n"
  done
  # 3. Join b and c to a, once.
  for n in b c; do
    if ! members | grep -qx "$(node "$n")"; then
      say "joining $(node "$n") to $(node a)"
      {
        ctl "$n" stop_app &&
          ctl "$n" reset &&
          ctl "$n" join_cluster "$(node a)" &&
          ctl "$n" start_app
      } >>"$DIR/log/$n/join.log" 2>&1 || die "could not join $(node "$n") to $(node a) (see $DIR/log/$n/join.log)"
      wait_for "RabbitMQ on $(node "$n") after joining" app_up "$n"
    fi
  done
  wait_for "3 running members in the cluster" whole
  say "up: $(node a) 127.0.0.1:5681, $(node b) 127.0.0.1:5682, $(node c) 127.0.0.1:5683"
}

stop() {
  local n
  for n in c b a; do
    if erlang_up "$n"; then
      say "stopping $(node "$n")"
      ctl "$n" stop >/dev/null 2>&1 || true
    fi
  done
  for n in "${NODES[@]}"; do
    wait_for "$(node "$n") to stop" bash -c "! rabbitmq-diagnostics -q -n $(node "$n") ping >/dev/null 2>&1"
  done
  say "stopped"
}

status() {
  local n state
  for n in "${NODES[@]}"; do
    if app_up "$n"; then
      state="running, AMQP on 127.0.0.1:$(amqp_port "$n")"
    elif erlang_up "$n"; then
      state="Erlang node up, RabbitMQ stopped (stop_app)"
    else
      state="down"
    fi
    printf '%s: %s\n' "$(node "$n")" "$state"
  done
  if erlang_up a; then
    printf 'members: %s\n' "$(members | tr '\n' ' ')"
    printf 'running: %s\n' "$(running_members | tr '\n' ' ')"
  fi
  whole
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
