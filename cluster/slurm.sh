#!/usr/bin/env bash
# rlhf_dist on Slurm: a Ray head on the first allocated node, a Ray worker on each of the
# others, then launch.py joins that cluster with --address. Submit from the project root:
#
#   sbatch cluster/slurm.sh                                   # configs/gpu-2node.yaml
#   CONFIG=configs/gpu-1node-8gpu.yaml sbatch --nodes=1 cluster/slurm.sh run.steps=50
#
# Arguments are launch.py overrides. Environment knobs (defaults in brackets): CONFIG
# [configs/gpu-2node.yaml], RUN_DIR [$PWD/runs/<job name>-<job id>: keep it on a filesystem every
# node mounts], PYTHON [python: an environment with the project installed, on every node],
# GPUS_PER_NODE [8], RAY_PORT [6379], DASHBOARD_PORT [8265], NODE_WAIT_S [300].
# Ray's token authentication is on: a fresh token per job, passed to every step in the
# environment. The Ray processes are stopped when the job ends (only this job's, never `ray stop`).
#SBATCH --job-name=rlhf-dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

CONFIG=${CONFIG:-configs/gpu-2node.yaml}
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
NODE_WAIT_S=${NODE_WAIT_S:-300}
JOB_ID=${SLURM_JOB_ID:?run this script with sbatch}
RUN_DIR=${RUN_DIR:-$PWD/runs/${SLURM_JOB_NAME:-rlhf-dist}-$JOB_ID}
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-$(nproc)}
RAY=("$PYTHON" -m ray.scripts.scripts)  # the `ray` CLI of that same environment

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NUM_NODES=${#NODES[@]}
HEAD=${NODES[0]}
# this script runs on the first node: the head
HEAD_IP=${HEAD_IP:-$(hostname -I | awk '{print $1}')}
ADDRESS="$HEAD_IP:$RAY_PORT"

RAY_AUTH_TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN RAY_USAGE_STATS_ENABLED=0
# a temp dir of this job's own on every node (unix socket paths must stay short)
RAY_TMP=${RAY_TMP:-/tmp/ray-$JOB_ID}

STEP_PIDS=()
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    # Ending the srun steps ends their `ray start --block`, which stops that node's Ray.
    if ((${#STEP_PIDS[@]})); then
        kill "${STEP_PIDS[@]}" 2>/dev/null || true
        wait "${STEP_PIDS[@]}" 2>/dev/null || true
    fi
}
trap cleanup EXIT

echo "ray head on $HEAD ($ADDRESS), $((NUM_NODES - 1)) worker node(s), run dir $RUN_DIR"
# Each step asks for its node's CPUs and GPUs (steps do not inherit them from sbatch).
srun --nodes=1 --ntasks=1 --nodelist="$HEAD" \
    --cpus-per-task="$CPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE" \
    "${RAY[@]}" start --head --block --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \
    --dashboard-host=0.0.0.0 --dashboard-port="$DASHBOARD_PORT" \
    --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --temp-dir="$RAY_TMP" \
    --disable-usage-stats &
STEP_PIDS+=("$!")

"$PYTHON" - "$ADDRESS" <<'PY'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
deadline = time.time() + 120
while True:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(f"the Ray head at {sys.argv[1]} did not come up within 120 s")
        time.sleep(2)
PY

if ((NUM_NODES > 1)); then
    srun --nodes=$((NUM_NODES - 1)) --ntasks=$((NUM_NODES - 1)) --ntasks-per-node=1 \
        --exclude="$HEAD" --cpus-per-task="$CPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE" \
        "${RAY[@]}" start --block --address="$ADDRESS" \
        --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --temp-dir="$RAY_TMP" \
        --disable-usage-stats &
    STEP_PIDS+=("$!")
fi

# Wait until every node has joined (a job placed on a partial cluster would wait for GPUs).
"$PYTHON" - "$ADDRESS" "$NUM_NODES" "$NODE_WAIT_S" <<'PY'
import sys, time
import ray
address, want, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.time() + wait_s
while (alive := sum(n["Alive"] for n in ray.nodes())) < want:
    if time.time() > deadline:
        sys.exit(f"only {alive} of {want} Ray nodes joined within {wait_s:.0f} s")
    time.sleep(5)
print(f"{alive} Ray nodes up: {ray.cluster_resources()}")
ray.shutdown()
PY

status=0
"$PYTHON" launch.py --address "$ADDRESS" --config "$CONFIG" "run.dir=$RUN_DIR" "$@" || status=$?
echo "launch.py exited with $status"
exit "$status"
