#!/usr/bin/env bash
# A real Flink standalone session cluster on loopback, with no Docker, for running the project's
# Beam jobs on Flink:
#   scripts/flink_local.sh up [--taskmanagers N] [--slots S]   start it (N=2 TaskManagers, S=2 slots each)
#   scripts/flink_local.sh flags     the Beam flags that put a job on it, on one line
#   scripts/flink_local.sh status    one JSON object: the PIDs, flink_master, job_endpoint, web UI
#   scripts/flink_local.sh down      stop it; no process is left behind
#   scripts/flink_local.sh fetch     only fetch the jars (Maven Central, PyPI) into the cache
#
# One JobManager; N TaskManagers, each a separate JVM on its own loopback address (127.0.0.1N) with
# its own Beam Python worker pool (scripts/beam_worker_pool.py, the project's .venv) listening
# there; Beam's Flink job server, which turns a Beam pipeline into a Flink job. Each TaskManager's
# JVM resolves "localhost" to its own address (jdk.net.hosts.file), so `--environment_config=
# localhost:PORT` reaches the TaskManager's own pool, as a sidecar pool per TaskManager pod does on
# Kubernetes. Versions: scripts/flink_versions.env. Jars: fetched on first use into
# $EDJE_FLINK_CACHE (default ~/.cache/edje-flink). Cluster state, configuration and logs:
# $EDJE_FLINK_STATE (default .flink/ in the repository). Ports are picked free at `up`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/flink_versions.env"
CACHE=${EDJE_FLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edje-flink}/beam-$BEAM_JOB_SERVER_VERSION-flink-$FLINK_VERSION
STATE=${EDJE_FLINK_STATE:-$ROOT/.flink}
VENV=${EDJE_VENV:-$ROOT/.venv}
JAVA=${JAVA:-java}
PY3=${PYTHON:-python3}

log() { echo "[flink_local] $*" >&2; }
die() { echo "[flink_local] error: $*" >&2; exit 1; }

# Flink 1.19 on Java 17 needs these modules opened (as Flink's own default configuration does).
JAVA_OPENS="--add-exports=java.base/sun.net.util=ALL-UNNAMED --add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED
 --add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED --add-opens=java.base/java.lang=ALL-UNNAMED
 --add-opens=java.base/java.net=ALL-UNNAMED --add-opens=java.base/java.io=ALL-UNNAMED
 --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
 --add-opens=java.base/java.lang.reflect=ALL-UNNAMED --add-opens=java.base/java.text=ALL-UNNAMED
 --add-opens=java.base/java.time=ALL-UNNAMED --add-opens=java.base/java.util=ALL-UNNAMED
 --add-opens=java.base/java.util.concurrent=ALL-UNNAMED --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
 --add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED --add-opens=java.base/java.lang.invoke=ALL-UNNAMED"

fetch() {
  mkdir -p "$CACHE"
  if [ ! -f "$CACHE/jobserver/.complete" ]; then
    log "fetching Beam's Flink runner $BEAM_JOB_SERVER_VERSION (beam-runners-flink-$FLINK_MINOR) and its dependencies from Maven"
    local pom; pom=$(mktemp -d)
    cat > "$pom/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>edje.local</groupId><artifactId>flink-job-server</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.beam</groupId><artifactId>beam-runners-flink-$FLINK_MINOR</artifactId>
      <version>$BEAM_JOB_SERVER_VERSION</version></dependency>
  </dependencies>
</project>
EOF
    rm -rf "$CACHE/jobserver.part"
    mvn -q -B -f "$pom/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$CACHE/jobserver.part" >&2 || die "Maven could not fetch beam-runners-flink-$FLINK_MINOR:$BEAM_JOB_SERVER_VERSION"
    rm -rf "$pom" "$CACHE/jobserver"
    touch "$CACHE/jobserver.part/.complete"
    mv "$CACHE/jobserver.part" "$CACHE/jobserver"
  fi
  if [ ! -f "$CACHE/flink/.complete" ]; then
    # flink-dist is not on Maven Central; PyPI's apache-flink-libraries carries Flink's lib/.
    log "fetching Flink $FLINK_VERSION's lib/ (apache-flink-libraries from PyPI, about 230 MB)"
    local dl; dl=$(mktemp -d)
    "$PY3" -m pip download --quiet --no-deps --no-binary :all: "apache-flink-libraries==$FLINK_VERSION" -d "$dl" >&2 \
      || die "pip could not fetch apache-flink-libraries==$FLINK_VERSION"
    rm -rf "$CACHE/flink.part" "$CACHE/flink"; mkdir -p "$CACHE/flink.part"
    local top="apache-flink-libraries-$FLINK_VERSION/deps"
    tar -xzf "$dl"/apache-flink-libraries-*.tar.gz -C "$CACHE/flink.part" --strip-components=2 \
      --wildcards "$top/lib/flink-dist-*" "$top/lib/log4j-*" "$top/bin/bash-java-utils.jar"
    rm -rf "$dl"
    touch "$CACHE/flink.part/.complete"
    mv "$CACHE/flink.part" "$CACHE/flink"
  fi
}

free_ports() {  # N ports free on loopback now
  "$PY3" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local limit=$1 until=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $until ] || die "$what did not come up within ${limit}s; logs in $STATE/logs"
    sleep 0.5
  done
}

rest() { curl -sf --max-time 5 "http://127.0.0.1:$REST_PORT$1"; }
taskmanagers_registered() { [ "$(rest /taskmanagers | "$PY3" -c 'import json,sys; print(len(json.load(sys.stdin)["taskmanagers"]))')" = "$1" ]; }
port_open() { "$PY3" -c "import socket,sys; socket.create_connection(('$1', $2), 1)"; }

start() {  # start NAME LOGFILE COMMAND... : a process of its own group, its PID recorded under pids/
  local name=$1 logfile=$2; shift 2
  setsid "$@" > "$logfile" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name"
}

up() {
  local tms=2 slots=2
  while [ $# -gt 0 ]; do
    case "$1" in
      --taskmanagers) tms=$2; shift 2 ;;
      --slots) slots=$2; shift 2 ;;
      *) die "unknown flag for up: $1" ;;
    esac
  done
  [[ "$tms" =~ ^[1-9]$ ]] || die "--taskmanagers takes 1 to 9"
  if [ -d "$STATE/pids" ] && [ -n "$(ls "$STATE/pids")" ]; then
    for f in "$STATE"/pids/*; do alive "$(cat "$f")" && die "a cluster is already up ($STATE); run: $0 down"; done
  fi
  [ -x "$VENV/bin/python" ] || die "no $VENV: run ./run_local.sh first (the worker pools run the project's .venv)"
  command -v "$JAVA" >/dev/null || die "no java on PATH (Java 17 is needed)"
  fetch
  rm -rf "$STATE"; mkdir -p "$STATE/conf" "$STATE/logs" "$STATE/pids" "$STATE/tmp"
  read -r RPC_PORT REST_PORT BLOB_PORT JOB_PORT ARTIFACT_PORT EXPANSION_PORT POOL_PORT <<< "$(free_ports 7)"
  local parallelism=$((tms * slots)); [ $parallelism -gt 2 ] && parallelism=2
  cat > "$STATE/conf/flink-conf.yaml" <<EOF
jobmanager.rpc.address: 127.0.0.1
jobmanager.rpc.port: $RPC_PORT
jobmanager.bind-host: 127.0.0.1
jobmanager.memory.process.size: 1024m
rest.address: 127.0.0.1
rest.bind-address: 127.0.0.1
rest.port: $REST_PORT
blob.server.port: $BLOB_PORT
taskmanager.bind-host: 127.0.0.1
taskmanager.memory.process.size: 1536m
taskmanager.numberOfTaskSlots: $slots
cluster.evenly-spread-out-slots: true
parallelism.default: $parallelism
io.tmp.dirs: $STATE/tmp
heartbeat.interval: 2000
heartbeat.timeout: 15000
restart-strategy.type: fixed-delay
restart-strategy.fixed-delay.attempts: 3
restart-strategy.fixed-delay.delay: 5 s
EOF
  cp "$ROOT/scripts/flink_log4j.properties" "$STATE/conf/log4j.properties"
  local flink_cp="$CACHE/flink/lib/*" logconf="-Dlog4j.configurationFile=file:$STATE/conf/log4j.properties"
  log "starting the JobManager (web UI http://127.0.0.1:$REST_PORT)"
  # shellcheck disable=SC2086
  start jobmanager "$STATE/logs/jobmanager.out" "$JAVA" -Xmx512m $JAVA_OPENS "$logconf" \
    -Dlog.file="$STATE/logs/jobmanager.log" -cp "$flink_cp" \
    org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint --configDir "$STATE/conf"
  wait_for 90 "the JobManager" rest /overview

  # The TaskManager's JVM sizes, as Flink's own taskmanager.sh computes them.
  local params; params=$("$JAVA" -cp "$CACHE/flink/bin/bash-java-utils.jar:$flink_cp" \
    org.apache.flink.runtime.util.bash.BashJavaUtils GET_TM_RESOURCE_PARAMS --configDir "$STATE/conf" 2>/dev/null \
    | sed -n 's/^BASH_JAVA_UTILS_EXEC_RESULT://p')
  local jvm_args dyn_args; jvm_args=$(sed -n 1p <<< "$params"); dyn_args=$(sed -n 2p <<< "$params")
  [ -n "$jvm_args" ] || die "could not size the TaskManagers (BashJavaUtils printed nothing)"

  for i in $(seq 1 "$tms"); do
    local ip="127.0.0.$((10 + i))"
    printf '%s localhost\n' "$ip" > "$STATE/conf/hosts.tm$i"
    log "starting TaskManager $i on $ip, with its worker pool at $ip:$POOL_PORT"
    # The pool runs under a loop that restarts it when it dies, as Kubernetes restarts a sidecar;
    # pids/pool$i is the pool's own PID, pids/supervisor$i the loop's (the group leader).
    start "supervisor$i" "$STATE/logs/pool$i.log" env PATH="$VENV/bin:$PATH" bash -c '
      while :; do
        python "$0" --address "$1" & echo $! > "$2"; wait $!
        echo "[flink_local] worker pool exited ($?); restarting it"; sleep 1
      done' "$ROOT/scripts/beam_worker_pool.py" "$ip:$POOL_PORT" "$STATE/pids/pool$i"
    # shellcheck disable=SC2086
    start "taskmanager$i" "$STATE/logs/taskmanager$i.out" "$JAVA" $jvm_args $JAVA_OPENS "$logconf" \
      -Djdk.net.hosts.file="$STATE/conf/hosts.tm$i" -Dlog.file="$STATE/logs/taskmanager$i.log" -cp "$flink_cp" \
      org.apache.flink.runtime.taskexecutor.TaskManagerRunner --configDir "$STATE/conf" $dyn_args \
      -D taskmanager.host="$ip" -D taskmanager.bind-host="$ip" -D taskmanager.resource-id="tm$i"
    wait_for 30 "worker pool $i" port_open "$ip" "$POOL_PORT"
  done
  wait_for 90 "$tms TaskManagers" taskmanagers_registered "$tms"

  log "starting Beam's Flink job server $BEAM_JOB_SERVER_VERSION"
  start jobserver "$STATE/logs/jobserver.log" "$JAVA" -Xmx512m $JAVA_OPENS -cp "$CACHE/jobserver/*" \
    org.apache.beam.runners.flink.FlinkJobServerDriver --flink-master="127.0.0.1:$REST_PORT" \
    --job-host=localhost --job-port="$JOB_PORT" --artifact-port="$ARTIFACT_PORT" --expansion-port="$EXPANSION_PORT"
  wait_for 90 "the job server" port_open 127.0.0.1 "$JOB_PORT"

  cat > "$STATE/cluster.env" <<EOF
REST_PORT=$REST_PORT
JOB_PORT=$JOB_PORT
POOL_PORT=$POOL_PORT
PARALLELISM=$parallelism
EOF
  log "up: $tms TaskManagers x $slots slots; run a job with \$($0 flags)"
  status
}

load_state() {
  [ -f "$STATE/cluster.env" ] || die "no cluster is up ($STATE/cluster.env missing); run: $0 up"
  . "$STATE/cluster.env"
}

flags() {
  load_state
  echo "--runner=FlinkRunner --flink_master=127.0.0.1:$REST_PORT --job_endpoint=localhost:$JOB_PORT" \
       "--environment_type=EXTERNAL --environment_config=localhost:$POOL_PORT --parallelism=$PARALLELISM"
}

status() {
  load_state
  "$PY3" - "$STATE" <<'EOF'
import json, os, sys
state = sys.argv[1]
env = dict(line.strip().split("=", 1) for line in open(os.path.join(state, "cluster.env")) if "=" in line)

def pid(name):
    try:
        p = int(open(os.path.join(state, "pids", name)).read())
        os.kill(p, 0)
        return p
    except (OSError, ValueError):
        return None  # not started, or no longer alive

names = sorted(os.listdir(os.path.join(state, "pids")))
group = lambda prefix: [p for n in names if n.startswith(prefix) and (p := pid(n)) is not None]
print(json.dumps({
    "jobmanager": pid("jobmanager"),
    "taskmanagers": group("taskmanager"),
    "worker_pools": group("pool"),
    "job_server": pid("jobserver"),
    "flink_master": f"127.0.0.1:{env['REST_PORT']}",
    "job_endpoint": f"localhost:{env['JOB_PORT']}",
    "environment_config": f"localhost:{env['POOL_PORT']}",
    "web_ui": f"http://127.0.0.1:{env['REST_PORT']}",
}))
EOF
}

down() {
  [ -d "$STATE/pids" ] || { log "nothing to stop ($STATE)"; return 0; }
  local pgids=() f
  for f in "$STATE"/pids/*; do [ -f "$f" ] && pgids+=("$(cat "$f")"); done
  # Each recorded process leads its own group: a pool's SDK harnesses die with it, even if the
  # pool itself was killed before.
  for p in "${pgids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  local until=$((SECONDS + 15))
  while [ $SECONDS -lt $until ]; do
    local left=0
    for p in "${pgids[@]}"; do pgrep -g "$p" >/dev/null 2>&1 && left=1; done
    [ $left = 0 ] && break
    sleep 0.5
  done
  for p in "${pgids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
  rm -f "$STATE"/pids/* "$STATE/cluster.env"
  log "down"
}

cmd=${1:-}; [ $# -gt 0 ] && shift
case "$cmd" in
  up) up "$@" ;;
  flags) flags ;;
  status) status ;;
  down) down ;;
  fetch) fetch ;;
  *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
