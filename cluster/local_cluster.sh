#!/usr/bin/env bash
# A local multi-node Ray cluster on ONE machine, for trying slm-dist's Ray backend and `ray job submit`.
#
#   cluster/local_cluster.sh start [NUM_WORKER_NODES]   # head + N worker nodes (default 2)
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh env                        # the exports a shell needs to submit jobs
#   cluster/local_cluster.sh stop
#
# Everything it starts is its own: free ports picked at start (no clash with another Ray on the
# machine), its own temp folder, every node in its own session/process group (recorded in the
# cluster folder) and stopped by that group id. It never runs `ray stop`, which would stop every
# Ray instance on the machine, other people's included.
#
# Settings (environment):
#   SLM_CLUSTER_DIR   cluster folder (pids, ports, logs, Ray temp dir)   default /tmp/slm-dist-cluster-$UID
#   CPUS_PER_NODE     CPUs each node advertises                          default 1
#   OBJECT_STORE_MB   object store (shared memory) of each node            default 512
#   RAY_AUTH_MODE     disabled | token. The same value must reach every node, the job submitter and
#                     the job: this script exports it to the nodes and prints it in `env`. With token,
#                     a token is generated into the cluster folder (RAY_AUTH_TOKEN_PATH), not ~/.ray.
#                     Default: disabled (the dashboard and GCS listen on 127.0.0.1/this host only).
set -euo pipefail

CLUSTER_DIR=${SLM_CLUSTER_DIR:-/tmp/slm-dist-cluster-$(id -u)}
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
OBJECT_STORE_MB=${OBJECT_STORE_MB:-512}
# A running cluster keeps the mode it was started with (recorded in its folder).
if [[ -f "$CLUSTER_DIR/auth_mode" ]]; then
    RAY_AUTH_MODE=$(cat "$CLUSTER_DIR/auth_mode")
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_USAGE_STATS_ENABLED=0
TEMP_DIR="$CLUSTER_DIR/ray"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

auth_setup() {
    if [[ "$RAY_AUTH_MODE" == "token" ]]; then
        export RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"
        if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
            (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
        fi
    elif [[ "$RAY_AUTH_MODE" != "disabled" ]]; then
        echo "RAY_AUTH_MODE must be 'disabled' or 'token', got '$RAY_AUTH_MODE'" >&2
        exit 2
    fi
}

# Run one `ray start --block` in a new session: its pid is its process-group id, and every Ray
# process it spawns (GCS, raylet, dashboard, agents) shares that group.
start_node() {  # name, ray start arguments...
    local name=$1; shift
    setsid ray start --block --disable-usage-stats --temp-dir="$TEMP_DIR" --num-cpus="$CPUS_PER_NODE" \
        --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) "$@" \
        > "$CLUSTER_DIR/$name.log" 2>&1 < /dev/null &
    echo $! > "$CLUSTER_DIR/$name.pgid"
}

wait_for_nodes() {  # expected node count
    local want=$1
    for _ in $(seq 1 120); do
        local alive
        alive=$(RAY_ADDRESS="127.0.0.1:$(cat "$CLUSTER_DIR/gcs_port")" python3 - <<'EOF' 2>/dev/null || echo 0
import ray
ray.init(logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
)
        if [[ "$alive" -ge "$want" ]]; then
            return 0
        fi
        sleep 1
    done
    echo "only $alive of $want nodes came up; see $CLUSTER_DIR/*.log" >&2
    return 1
}

cmd_start() {
    local workers=${1:-2}
    if compgen -G "$CLUSTER_DIR/*.pgid" > /dev/null; then
        echo "a cluster is already recorded in $CLUSTER_DIR; run '$0 stop' first" >&2
        exit 2
    fi
    mkdir -p "$CLUSTER_DIR"
    auth_setup
    echo "$RAY_AUTH_MODE" > "$CLUSTER_DIR/auth_mode"
    local gcs dash client
    gcs=$(free_port); dash=$(free_port); client=$(free_port)
    echo "$gcs" > "$CLUSTER_DIR/gcs_port"
    echo "$dash" > "$CLUSTER_DIR/dashboard_port"
    echo "$client" > "$CLUSTER_DIR/client_port"
    start_node head --head --node-ip-address=127.0.0.1 --port="$gcs" --include-dashboard=true \
        --dashboard-host=127.0.0.1 --dashboard-port="$dash" --ray-client-server-port="$client" \
        --dashboard-agent-listen-port="$(free_port)" --resources='{"slm_node_0": 1}'
    # Workers register with the head's GCS: on a loaded machine a fixed pause was not enough (the
    # worker gave up with "No node info found for head node"), so wait until the head is up.
    wait_for_nodes 1
    for k in $(seq 1 "$workers"); do
        # Nodes on one machine share the host's ports: each agent gets its own listen port.
        start_node "worker$k" --address="127.0.0.1:$gcs" --node-ip-address=127.0.0.1 \
            --dashboard-agent-listen-port="$(free_port)" --resources="{\"slm_node_$k\": 1}"
    done
    wait_for_nodes $((workers + 1))
    echo "Ray cluster up: 1 head + $workers worker node(s), $CPUS_PER_NODE CPU(s) each"
    cmd_env
}

cmd_env() {
    local dash gcs
    dash=$(cat "$CLUSTER_DIR/dashboard_port"); gcs=$(cat "$CLUSTER_DIR/gcs_port")
    echo "# submit jobs from a shell with:"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ "$RAY_AUTH_MODE" == "token" ]]; then
        echo "export RAY_AUTH_TOKEN_PATH=$CLUSTER_DIR/auth_token"
    fi
    echo "export RAY_ADDRESS=http://127.0.0.1:$dash      # job server (dashboard)"
    echo "# drivers on this machine can also attach directly: ray.init(address='127.0.0.1:$gcs')"
}

cmd_status() {
    for f in "$CLUSTER_DIR"/*.pgid; do
        [[ -e "$f" ]] || { echo "no cluster recorded in $CLUSTER_DIR"; return 0; }
        local pgid name
        pgid=$(cat "$f"); name=$(basename "$f" .pgid)
        if kill -0 -- "-$pgid" 2>/dev/null; then echo "$name: running (process group $pgid)"
        else echo "$name: not running"; fi
    done
}

# SIGTERM each recorded group, give Ray up to 20 s to exit cleanly, then SIGKILL what is left
# (worker processes that Ray moved into their own groups stay in the node's session: sweep that too).
cmd_stop() {
    local pgids=()
    for f in "$CLUSTER_DIR"/*.pgid; do
        [[ -e "$f" ]] && pgids+=("$(cat "$f")")
    done
    if [[ ${#pgids[@]} -eq 0 ]]; then
        echo "no cluster recorded in $CLUSTER_DIR"
        return 0
    fi
    # Workers first, head last.
    for ((i = ${#pgids[@]} - 1; i >= 0; i--)); do
        kill -TERM -- "-${pgids[$i]}" 2>/dev/null || true
    done
    for _ in $(seq 1 20); do
        local alive=0
        for g in "${pgids[@]}"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 1
    done
    for g in "${pgids[@]}"; do
        kill -KILL -- "-$g" 2>/dev/null || true
        for pid in $(ps -o pid= -s "$g" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    done
    rm -f "$CLUSTER_DIR"/*.pgid "$CLUSTER_DIR/auth_mode"
    echo "stopped ${#pgids[@]} node(s); logs and Ray temp files stay in $CLUSTER_DIR"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) auth_setup; cmd_env ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
