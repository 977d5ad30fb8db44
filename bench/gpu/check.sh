#!/usr/bin/env bash
''':'
# The GPU kit in one command (bench/gpu/README.md): at most 8 minutes on one H100/H200.
#   bash bench/gpu/check.sh OUT_DIR             on the GPU machine, with .whl/ beside the tree
#   bash bench/gpu/check.sh --dry-run OUT_DIR   the same script on the CPU at tiny sizes (< 3 min)
# Parts, in order, each in its own process under its own time limit, so that one failing or
# running out of time leaves the others' results: install (the pinned wheels of .whl/, into a
# folder first on PYTHONPATH), env,
# correctness, driver, overhead_training, overhead_optimizer; then report.py writes summary.json
# and prints the summary and the BENCHMARKS.md "GPU" section. At most 8 files under OUT_DIR:
# env, correctness, driver, overhead_training, overhead_optimizer, summary (.json), check.log.
# The dry run skips the install, CUDA, NCCL and bf16 autocast and says so in its JSON.
# PYTHON chooses the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu/check.sh [--dry-run] OUT_DIR" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
cd "$REPO"
SITE=/tmp/gpu-kit-site  # the carried wheels go here, first on the path: the image stays as it is
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
exec > >(tee -a "$OUT/check.log") 2>&1
START=$SECONDS
PARTS=""

part() {  # part NAME LIMIT_SECONDS COMMAND...: run, time, record "name:status:seconds"
  local name="$1" limit=$(($2 * STRETCH)) t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit} s, $((SECONDS - START)) s into the run)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status=failed; fi
  echo "=== $name: $status in $((SECONDS - t0)) s"
  PARTS="$PARTS $name:$status:$((SECONDS - t0))"
}
skip() {  # skip NAME REASON
  echo "=== $1: skipped ($2)"
  PARTS="$PARTS $1:skipped:0"
}

# The limits fit the GPU machine's 8 minutes; the dry run gets twice as long, since shared CPU
# cores can slow it down that much (it takes 1-2 minutes).
STRETCH=1
if [ $DRY -eq 1 ]; then
  STRETCH=2
  FLAG=(--dry-run)
  DEV=cpu
  DRIVER=(--engines zero2)  # FSDP2 through the same function on the GPU, time allowing
  TRAIN=(--model-layers 2 --config hidden_size=64 intermediate_size=224 num_attention_heads=4
         num_key_value_heads=1 vocab_size=512 --train-ranks 2 4 --batches 2 --seq 16
         --steps 1 --repeats 1)
  OPTIM=(--ranks 2 --layers 1 --repeats 1)
  skip install "dry run: this environment already holds the pinned stack"
else
  FLAG=()
  DEV=cuda
  DRIVER=(--engines zero2 fsdp2)
  # The paper's protocol on the whole Llama-3-8B shape in bf16; batches 8 and 32 of 128 tokens
  # are what fits the time (the section states them with the numbers).
  TRAIN=(--model-layers 32 --train-ranks 4 8 16 --batches 8 32 --seq 128 --steps 2 --repeats 3)
  OPTIM=(--ranks 4 8 16 32 64 --layers 32 --repeats 3)
  if [ ! -f .whl/requirements.txt ]; then
    echo "no .whl/requirements.txt: run 'bash bench/gpu/wheels.sh' first and carry .whl" >&2
    PARTS="$PARTS install:failed:0"
  elif "$PY" bench/gpu/wheelset.py --missing .whl/requirements.txt; then
    skip install "every pinned version is already installed"
  else
    part install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" .whl/*.whl
  fi
fi

part env 15 "$PY" bench/gpu/environment.py --out "$OUT/env.json" "${FLAG[@]}"
part correctness 90 "$PY" bench/gpu/correctness.py --out "$OUT/correctness.json" "${FLAG[@]}"
part driver 130 "$PY" bench/gpu/driver.py --out "$OUT/driver.json" --budget 120 "${DRIVER[@]}" \
  "${FLAG[@]}"
part overhead_training 120 "$PY" bench/overhead.py --part training --device "$DEV" \
  --model llama3-8b "${TRAIN[@]}" --out "$OUT/overhead_training.json" --no-plot
part overhead_optimizer 50 "$PY" bench/overhead.py --part optimizer --device "$DEV" \
  "${OPTIM[@]}" --out "$OUT/overhead_optimizer.json" --no-plot
echo "=== total $((SECONDS - START)) s"
timeout 15 "$PY" bench/gpu/report.py "$OUT" --parts $PARTS --seconds $((SECONDS - START))
exit $?
'''
# Python reads everything above as one string: tests/test_architecture.py parses bench/*.sh
# as Python, so this file is valid bash and valid Python, like launch/run.sh.
# ' <- closes, for bash -n, the quote that the triple quote above opens in bash
