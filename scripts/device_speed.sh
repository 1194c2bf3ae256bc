#!/usr/bin/env bash
# The generator's speed on one GPU (`python -m pp1.pipelines.speed`), from a copy of the repository, in one command:
#
#   bash scripts/device_speed.sh                         # this checkout: eager, compiled, fp8 + float32 reference
#   BEFORE_ROOT=/path/to/older/checkout bash scripts/device_speed.sh   # the same tool on an older checkout first
#   PIPELINE=pp1.pipelines.krea:factory PRESET=krea-14b CHECKPOINT=/tmp/krea.safetensors bash scripts/device_speed.sh
#       # the Krea pipeline: CHECKPOINT is written first with random weights in the released layout if it
#       # does not exist (28.6 GB for krea-14b; ~40 s on an H200 host), then passed as its checkpoint option
#
# Like scripts/device_bench.sh: installs the wheels in .whl/ into /tmp/site, makes `pp1` importable through a
# symlink shim per checkout (no pip), then runs the tool; JSON lines and logs go to $OUT (default speed-out/).
# Knobs: PIPELINE (the reference), PRESET (krea-14b-shape), VARIANTS ("eager compiled fp8"), CHUNKS (6),
# REFERENCE (float32 | none), REFERENCE_CHUNKS (3), SAVE_DIR (keep each variant's latents there), CHECKPOINT (krea),
# PYTHON (python3), DEVICE (cuda); BENCH=1 then runs `pp1 bench --configs tp:1` too: this checkout with
# --compile (and with --compile --pipeline-option fp8_linears=true), and BEFORE_ROOT's eager, BENCH_CHUNKS (8).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PIPELINE=${PIPELINE:-pp1.pipelines.reference:factory}
PRESET=${PRESET:-krea-14b-shape}
VARIANTS=${VARIANTS:-eager compiled fp8}
CHUNKS=${CHUNKS:-6}
REFERENCE=${REFERENCE:-float32}
OUT_DIR=${OUT:-$ROOT/speed-out}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
SAVE=${SAVE_DIR:-$(mktemp -d /tmp/pp1-speed.XXXXXX)}  # each variant's latents (kept when SAVE_DIR is given)
mkdir -p "$SAVE"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

SITE=${SITE:-/tmp/site}
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}" || echo "device_speed: wheel install failed" >&2
fi

shim() {  # shim DIR ROOT: DIR/pp1 maps ROOT's top-level folders as pyproject.toml does
  rm -rf "$1" && mkdir -p "$1/pp1"
  for f in "$2"/pp1/*; do ln -s "$f" "$1/pp1/"; done
  for sub in protocol fsm pipelines adapters server; do [ -d "$2/$sub" ] && ln -s "$2/$sub" "$1/pp1/$sub"; done
}
args=(--pipeline "$PIPELINE" --preset "$PRESET" --device "$DEVICE" --chunks "$CHUNKS" --profile --save "$SAVE")
cd /tmp
if [ -n "${CHECKPOINT:-}" ]; then
  shim /tmp/pp1-shim-write "$ROOT"
  if [ ! -f "$CHECKPOINT" ]; then
    PYTHONPATH="/tmp/pp1-shim-write:$SITE" "$PY" -c "
import sys, time, torch
from pp1.pipelines.krea.config import get_model
from pp1.pipelines.krea.writer import write_random_checkpoint
t0 = time.perf_counter()
n = write_random_checkpoint(sys.argv[1], get_model(sys.argv[2]), dtype=torch.bfloat16, device=sys.argv[3])
print(f'device_speed: wrote {sys.argv[1]}: {n / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s', flush=True)
" "$CHECKPOINT" "$PRESET" "$DEVICE" 2>&1 | tee -a "$OUT_DIR/speed-after.log"
  fi
  args+=(--pipeline-option "checkpoint=$CHECKPOINT")
fi
if [ -n "${BEFORE_ROOT:-}" ]; then
  shim /tmp/pp1-shim-before "$(cd "$ROOT" && cd "$BEFORE_ROOT" && pwd)"
  echo "device_speed: before = $BEFORE_ROOT" >&2
  PYTHONPATH="/tmp/pp1-shim-before:$SITE" timeout 900 "$PY" "$ROOT/pipelines/speed.py" "${args[@]}" --variants eager \
    --tag before --json "$OUT_DIR/speed.jsonl" 2>&1 | grep -v "ActivityProfilerController\|USDT" | tee "$OUT_DIR/speed-before.log"
fi
shim /tmp/pp1-shim-after "$ROOT"
# shellcheck disable=SC2086
PYTHONPATH="/tmp/pp1-shim-after:$SITE" timeout 1500 "$PY" -m pp1.pipelines.speed "${args[@]}" --variants $VARIANTS \
  --reference "$REFERENCE" --reference-chunks "${REFERENCE_CHUNKS:-3}" --tag after --compare "$SAVE" --json "$OUT_DIR/speed.jsonl" 2>&1 \
  | grep -v "ActivityProfilerController\|USDT" | tee "$OUT_DIR/speed-after.log"
[ -n "${SAVE_DIR:-}" ] || rm -rf "$SAVE"

bench() {  # bench SHIM LABEL [extra pp1 bench args]: one TP=1 configuration, as scripts/device_bench.sh runs it
  local shim_dir=$1 label=$2
  shift 2
  echo "device_speed: pp1 bench $label $*" >&2
  GLOO_SOCKET_IFNAME=lo PYTHONPATH="$shim_dir:$SITE" timeout -k 30 400 "$PY" -m pp1 bench --device "$DEVICE" \
    --preset "$PRESET" --configs tp:1 --chunks "${BENCH_CHUNKS:-8}" --warmup-chunks 2 --recompute-every 1 \
    --out "$OUT_DIR" --label "$label" --budget-s 360 --timeout-s 300 --heartbeat-s 2 --watchdog-s 30 \
    --deadline-floor-s 120 "$@" 2>&1 | grep -E "^\||compiled|ready|failed|error" | tail -8
}
if [ "${BENCH:-0}" = 1 ]; then
  tag=$(nvidia-smi -L 2>/dev/null | head -n1 | sed -E 's/^GPU [0-9]+: (NVIDIA )?([A-Za-z0-9]+).*/\2/' | tr 'A-Z' 'a-z')
  tag="${tag:-$DEVICE}x1-$PRESET"
  bench /tmp/pp1-shim-after "$tag-compiled" --compile
  [ -n "${BEFORE_ROOT:-}" ] && bench /tmp/pp1-shim-before "$tag-eager-before"
  bench /tmp/pp1-shim-after "$tag-compiled-fp8" --compile --pipeline-option fp8_linears=true
fi
