#!/usr/bin/env bash
# Local services for projector's demo and tests: Apache Kafka (KRaft, single node, official jars
# resolved by Maven), PostgreSQL and Redis (Debian packages). Loopback only, non-default ports,
# idempotent. Usage: dev/services.sh up|down|status|env
#
# Settings (environment):
#   PROJECTOR_DEV_STATE   where data and logs live        (default: <repo>/.dev)
#   PROJECTOR_DEV_CACHE   where the Kafka jars are cached (default: ~/.cache/projector-dev)
#   PROJECTOR_DEV_KAFKA_PORT / _PG_PORT / _REDIS_PORT     (default: 19092 / 15432 / 16379)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${PROJECTOR_DEV_STATE:-$ROOT/.dev}
CACHE=${PROJECTOR_DEV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/projector-dev}
KAFKA_PORT=${PROJECTOR_DEV_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=$((KAFKA_PORT + 1))
PG_PORT=${PROJECTOR_DEV_PG_PORT:-15432}
REDIS_PORT=${PROJECTOR_DEV_REDIS_PORT:-16379}
HOST=127.0.0.1
POM=$ROOT/dev/kafka/pom.xml

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Poll a condition every 0.2 s up to a limit; services start asynchronously and there is no
# event to wait on from bash.
wait_for() {
  local what=$1 limit=$2; shift 2
  local i
  for ((i = 0; i < limit * 5; i++)); do
    if "$@"; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up within ${limit}s"
}

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  command -v apt-get >/dev/null || die "install $* with your package manager"
  log "installing $* (Debian packages)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# ---------------------------------------------------------------- PostgreSQL
pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x $d/postgres ]] && { echo "$d"; return; }
  done
}

# PostgreSQL refuses to run as root; when we are root it runs as the `postgres` system user.
pg_user() { if [[ $(id -u) -eq 0 ]]; then echo postgres; else id -un; fi; }
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

pg_up() {
  if port_open "$PG_PORT"; then log "postgres already up on $HOST:$PG_PORT"; return; fi
  [[ -n $(pg_bindir) ]] || apt_install postgresql
  local bin data=$STATE/postgres
  bin=$(pg_bindir)
  mkdir -p "$data"
  [[ $(id -u) -eq 0 ]] && chown "$(pg_user)" "$data"
  chmod 700 "$data"
  if [[ ! -f $data/PG_VERSION ]]; then
    log "initdb in $data"
    as_pg "$bin/initdb" -D "$data" -U projector --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  as_pg "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
    -o "-p $PG_PORT -c listen_addresses=$HOST -c unix_socket_directories='' -c max_connections=300" \
    start >/dev/null
  if ! psql_q -d postgres -tAc "select 1 from pg_database where datname='projector'" | grep -q 1; then
    psql_q -d postgres -c "create database projector" >/dev/null
  fi
  log "postgres up on $HOST:$PG_PORT"
}

psql_q() { psql -h "$HOST" -p "$PG_PORT" -U projector -v ON_ERROR_STOP=1 -q "$@"; }

pg_down() {
  local bin data=$STATE/postgres
  bin=$(pg_bindir)
  if [[ -n $bin && -f $data/postmaster.pid ]]; then
    as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null || true
  fi
}

# --------------------------------------------------------------------- Redis
redis_up() {
  if port_open "$REDIS_PORT"; then log "redis already up on $HOST:$REDIS_PORT"; return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  local dir=$STATE/redis
  mkdir -p "$dir"
  # A view store must neither lose (persistence) nor evict what it holds.
  redis-server --bind "$HOST" --port "$REDIS_PORT" --dir "$dir" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    --appendonly yes --appendfsync everysec --maxmemory-policy noeviction --save ""
  wait_for redis 30 redis_ping
  log "redis up on $HOST:$REDIS_PORT"
}

redis_ping() { [[ $(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

redis_down() {
  if port_open "$REDIS_PORT"; then redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true; fi
}

# --------------------------------------------------------------------- Kafka
kafka_libs() {
  # Cache key: the pom's content, so a changed Kafka version resolves again and nothing else does.
  local key
  key=$(sha256sum "$POM" | cut -c1-16)
  echo "$CACHE/kafka-$key/libs"
}

kafka_resolve() {
  local libs
  libs=$(kafka_libs)
  [[ -f $libs/.complete ]] && return
  command -v mvn >/dev/null || apt_install maven
  command -v java >/dev/null || apt_install default-jre-headless
  log "resolving the Kafka broker jars with Maven into $libs"
  rm -rf "$libs" && mkdir -p "$libs"
  mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies -DoutputDirectory="$libs" >&2
  touch "$libs/.complete"
}

kafka_started() { grep -q "Kafka Server started" "$STATE/kafka/server.log" 2>/dev/null && port_open "$KAFKA_PORT"; }

kafka_up() {
  if port_open "$KAFKA_PORT"; then log "kafka already up on $HOST:$KAFKA_PORT"; return; fi
  kafka_resolve
  local dir=$STATE/kafka libs cp
  libs=$(kafka_libs)
  cp="$libs/*"
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  cat >"$dir/log4j.properties" <<EOF
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$dir/server.log
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
EOF
  if [[ ! -f $dir/data/meta.properties ]]; then
    local cluster_id
    cluster_id=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    log "formatting Kafka storage in $dir/data"
    java -Dlog4j.configuration="file:$dir/log4j.properties" -cp "$cp" kafka.tools.StorageTool format \
      -t "$cluster_id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; die "kafka storage format failed"; }
  fi
  : >"$dir/server.log"
  nohup java -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$dir/log4j.properties" \
    -cp "$cp" kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1 </dev/null &
  echo $! >"$dir/kafka.pid"
  wait_for kafka 90 kafka_started
  log "kafka up on $HOST:$KAFKA_PORT"
}

kafka_down() {
  local pidfile=$STATE/kafka/kafka.pid pid
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    local i
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# ------------------------------------------------------------------- commands
print_env() {
  cat <<EOF
export PROJECTOR_TEST_KAFKA=$HOST:$KAFKA_PORT
export PROJECTOR_TEST_PG_DSN=postgresql://projector@$HOST:$PG_PORT/projector
export PROJECTOR_TEST_REDIS_URL=redis://$HOST:$REDIS_PORT/0
EOF
}

status() {
  local rc=0 name port
  for name in kafka:$KAFKA_PORT postgres:$PG_PORT redis:$REDIS_PORT; do
    port=${name#*:}
    if port_open "$port"; then echo "${name%%:*}: up ($HOST:$port)"; else echo "${name%%:*}: down"; rc=1; fi
  done
  return $rc
}

case ${1:-} in
  up)
    mkdir -p "$STATE"
    pg_up
    redis_up
    kafka_up
    ;;
  down) kafka_down; redis_down; pg_down ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
