#!/usr/bin/env bash
# `pp1 bench` on a GPU host, in one command, from a copy of the repository (no network needed):
#
#   bash scripts/device_bench.sh
#
# 1. installs the wheels in .whl/ (if any) into /tmp/site (pydantic, transitions, ...; torch is the host's);
# 2. makes `pp1` importable from this checkout without pip (a symlink shim in /tmp/pp1-shim that maps the
#    top-level folders to pp1.* as pyproject.toml does);
# 3. checks the GPUs (`nvidia-smi -L`);
# 4. runs `pp1 bench --device cuda` for krea-14b-shape (bf16), then wan-1.3b-shape, over the configurations
#    the GPU count allows (PP1 front + TP=M needs M+1 GPUs, pure TP=M needs M), most telling first; each
#    preset writes bench-<gpu>x<count>-<preset>.json/.md into $OUT (default bench-out/) after every
#    configuration, so a run cut short keeps what it measured.
#
# HOP=1: `pp1 bench --hop` instead (the protocol hop against the raw transport, one row per preset; default
# presets "tiny krea-14b-shape"; DEVICE=cpu runs it on this host's CPUs over gloo, DEVICE=cuda needs 2 GPUs);
# label hop-<gpu>x<count> (hop-cpu-<cores>c on the CPU). SRC: the checkout the shim maps (default this one; a
# copy of an older tree measures "before" with this script).
#
# Knobs (environment): OUT, PRESETS ("krea-14b-shape wan-1.3b-shape"), CONFIGS (e.g. "pp1:3,tp:4,tp:1";
# default: all that fit), CHUNKS (10 measured), WARMUP (2 dropped), DTYPE (bfloat16), RECOMPUTE_EVERY (1),
# BUDGET_S (whole script, 540: later configurations are skipped), CONFIG_TIMEOUT_S (300 per job),
# PYTHON (python3), DEVICE (cuda; "cpu" is a local smoke test of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)

export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}  # one host: the control plane stays on loopback
export PYTHONUNBUFFERED=1

PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
HOP=${HOP:-0}
if [ "$HOP" = 1 ]; then PRESETS=${PRESETS:-tiny krea-14b-shape}; else PRESETS=${PRESETS:-krea-14b-shape wan-1.3b-shape}; fi
SRC=$(cd "${SRC:-$ROOT}" && pwd)
CHUNKS=${CHUNKS:-10}
WARMUP=${WARMUP:-2}
DTYPE=${DTYPE:-$([ "$DEVICE" = cuda ] && echo bfloat16 || echo float32)}
RECOMPUTE_EVERY=${RECOMPUTE_EVERY:-1}
BUDGET_S=${BUDGET_S:-540}
CONFIG_TIMEOUT_S=${CONFIG_TIMEOUT_S:-300}
OUT_DIR=${OUT:-$ROOT/bench-out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
say() { echo "device_bench: $*" >&2; }

# -- 1. wheels --------------------------------------------------------------------------------------------
SITE=${SITE:-/tmp/site}
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  mkdir -p "$SITE"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" "${wheels[@]}"; then
      say "installing the wheels together failed; trying one by one (a wheel for another Python is skipped)"
      for w in "${wheels[@]}"; do
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" "$w" \
          || say "skipped $w"
      done
    fi
  else
    say "no pip for $PY: unpacking the wheels into $SITE"
    for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE" || say "could not unpack $w"; done
  fi
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# -- 2. pp1 from this checkout, no pip: /tmp/pp1-shim/pp1/{cli.py,...,protocol -> ../protocol, ...} --------
SHIM=${SHIM:-/tmp/pp1-shim}
rm -rf "$SHIM"
mkdir -p "$SHIM/pp1"
for f in "$SRC"/pp1/*; do ln -s "$f" "$SHIM/pp1/"; done
for sub in protocol fsm pipelines adapters server testing; do  # [tool.setuptools.package-dir] in pyproject.toml
  [ -d "$SRC/$sub" ] && ln -s "$SRC/$sub" "$SHIM/pp1/$sub"
done
export PYTHONPATH="$SHIM:$PYTHONPATH"
# Python puts the working directory first on sys.path: from the repository root, its pp1/ (the CLI folder
# alone) would shadow the shim. Everything below (and the ranks, which inherit it) runs from the shim.
cd "$SHIM"
if ! "$PY" - <<'EOF'
import pp1, pp1.adapters.launch.bench, pp1.adapters.roles.main, pp1.pipelines.reference, pydantic, transitions, torch
print(f"device_bench: pp1 from {pp1.__path__[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"pydantic {pydantic.VERSION}, transitions {transitions.__version__}")
EOF
then
  say "pp1 or a dependency does not import (PYTHONPATH=$PYTHONPATH); see above"
  exit 2
fi

# -- 3. GPUs ----------------------------------------------------------------------------------------------
GPUS=0
GPU_TAG=cpu
if [ "$DEVICE" = cuda ]; then
  if ! timeout 60 nvidia-smi -L; then say "nvidia-smi -L failed: no usable GPU"; exit 2; fi
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  if [ "${GPUS:-0}" -lt 1 ]; then say "torch sees no GPU (torch.cuda.device_count() = $GPUS)"; exit 2; fi
  GPU_TAG=$(timeout 60 nvidia-smi -L | head -n1 | sed -E 's/^GPU [0-9]+: (NVIDIA )?([A-Za-z0-9]+).*/\2/' | tr 'A-Z' 'a-z')
  GPU_TAG="${GPU_TAG:-gpu}x$GPUS"
  say "$GPUS GPU(s) visible to torch; NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST"
fi

# -- 4. the bench, preset by preset, inside the budget ---------------------------------------------------
status=0
if [ "$HOP" = 1 ]; then
  tag=$([ "$DEVICE" = cuda ] && echo "$GPU_TAG" || echo "cpu-$(nproc)c")
  label="${LABEL:-hop-$tag}"
  say "hop: presets $PRESETS on $DEVICE -> $OUT_DIR/bench-$label.json/.md"
  timeout -k 60 "$BUDGET_S" "$PY" -m pp1 bench --hop --device "$DEVICE" --hop-presets "$(echo $PRESETS | tr ' ' ',')" \
    --out "$OUT_DIR" --label "$label" ${DTYPE:+--dtype "$DTYPE"}
  rc=$?
  say "hop done in $(( $(date +%s) - T0 )) s (exit $rc); results in $OUT_DIR"
  exit $rc
fi
set -- $PRESETS
while [ $# -gt 0 ]; do
  preset=$1
  shift
  left=$(( BUDGET_S - ($(date +%s) - T0) ))
  share=$(( $# > 0 ? left * 2 / 3 : left ))  # the first preset (the big one) gets two thirds
  if [ "$share" -lt 60 ]; then say "skipping $preset: ${left} s of the budget left"; status=1; continue; fi
  label="$GPU_TAG-$preset"
  say "preset $preset: budget ${share} s -> $OUT_DIR/bench-$label.json/.md"
  args=(bench --device "$DEVICE" --preset "$preset" --dtype "$DTYPE" --chunks "$CHUNKS" --warmup-chunks "$WARMUP"
        --recompute-every "$RECOMPUTE_EVERY" --out "$OUT_DIR" --label "$label" --budget-s "$share"
        --timeout-s "$CONFIG_TIMEOUT_S" --heartbeat-s 2 --watchdog-s 30 --deadline-floor-s 120)
  [ -n "${CONFIGS:-}" ] && args+=(--configs "$CONFIGS")
  # pp1 bench bounds itself (budget); `timeout` is the backstop: SIGTERM makes it drain its job (<= 60 s) and stop.
  timeout -k 90 $(( share + 60 )) "$PY" -m pp1 "${args[@]}"
  rc=$?
  [ $rc -ne 0 ] && { say "pp1 bench for $preset exited $rc"; status=1; }
  if [ "$DEVICE" = cuda ]; then
    left_over=$(timeout 60 nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null)
    [ -n "$left_over" ] && say "processes still on the GPUs after $preset: $left_over"
  fi
done
say "done in $(( $(date +%s) - T0 )) s; results in $OUT_DIR"
ls -l "$OUT_DIR"/bench-*.md 2>/dev/null >&2
exit $status
