#!/usr/bin/env bash
''':'
# Launch a riemann-zero recipe. This file is valid bash AND valid Python:
#   bash launch/run.sh [LAUNCHER ARGS] RECIPE.yaml [dotted.key=value ...]
#       starts DeepSpeed's launcher (or torchrun for `engine: fsdp2` recipes) on this file, one
#       process per GPU, or on CPU one per core (NPROC=N to choose), one thread each.
#   deepspeed [--num_gpus N | --hostfile FILE] launch/run.sh RECIPE.yaml [key=value ...]
#       DeepSpeed's launcher runs `python -u launch/run.sh --local_rank=R ...`: the Python part
#       below then starts the training driver (python -m riemann_zero.train).
# Launcher args before the recipe are passed on, e.g. --hostfile hosts --master_addr node0.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
LAUNCH_ARGS=()
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do
  LAUNCH_ARGS+=("$1")
  case "$1" in  # the launchers' options without a value (DeepSpeed's runner, torchrun)
    *=*|--no_ssh|--no_ssh_check|--force_multi|--module|--no_python|--no_local_rank|--save_pid|\
    --bind_cores_to_rank|--quiet|--standalone|--no-python|--run-path) ;;
    *) if [ $# -gt 1 ]; then LAUNCH_ARGS+=("$2"); shift; fi ;;
  esac
  shift
done
if [ $# -eq 0 ]; then
  echo "usage: bash launch/run.sh [launcher args] RECIPE.yaml [dotted.key=value ...]" >&2
  exit 2
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ "$NGPU" -gt 0 ]; then
  NPROC="${NPROC:-$NGPU}"
else
  export DS_ACCELERATOR=cpu
  NPROC="${NPROC:-$(nproc)}"
  # Ranks share the cores; oversubscribed ranks run an order of magnitude slower.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
fi
ENGINE="$(grep -E '^engine:' "$1" 2>/dev/null | awk '{print $2}' || true)"
for arg in "$@"; do [[ "$arg" == engine=* ]] && ENGINE="${arg#engine=}"; done
cd "$REPO"
if [ "$ENGINE" = "fsdp2" ]; then
  exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" "${LAUNCH_ARGS[@]}" \
    -m riemann_zero.train "$@"
fi
HAS_LAYOUT=0
for arg in "${LAUNCH_ARGS[@]}"; do
  case "$arg" in --hostfile*|--num_gpus*|--num_nodes*|--include*|--exclude*) HAS_LAYOUT=1 ;; esac
done
if [ "$HAS_LAYOUT" -eq 0 ]; then LAUNCH_ARGS+=(--num_gpus "$NPROC"); fi
if [[ " ${LAUNCH_ARGS[*]} " != *" --master_port"* ]]; then  # 29500 may be taken by another run
  LAUNCH_ARGS+=(--master_port "$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")")
fi
exec "$PY" -m deepspeed.launcher.runner "${LAUNCH_ARGS[@]}" "$REPO/launch/run.sh" "$@"
'''
# Python part: what each rank runs (`python -u launch/run.sh --local_rank=R RECIPE [k=v ...]`).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from riemann_zero.train.cli import cli  # noqa: E402

sys.exit(cli(sys.argv[1:]))
# ' <- closes, for bash -n, the quote that the triple quote above opens in bash
