#!/usr/bin/env bash
# The first run on a GPU machine: what proves the most in under 10 minutes, with no network.
#
#   OUT=/tmp/out bash bench/gpu-check.sh          # on one NVIDIA GPU (wheels as for bench/gpu.sh)
#   OUT=/tmp/out bash bench/gpu-check.sh --cpu    # the same code paths on the CPU (a smoke test of this script)
#
# Checks, in order, each under its own time limit and each writing $OUT/NN-<check>.md as soon as it ends (so a
# time-out of the whole still leaves what finished); $OUT/summary.md gets one line per check as it goes:
#   env         driver, torch and CUDA, native bf16, onnxruntime's providers and the libraries they lack
#   train       `kiln train` on digits, fp16 with gradient clipping, compiled (CUDA measurements, TensorRT int8)
#   resume-gpu  that run's checkpoint resumed on the GPU
#   resume-cpu  a checkpoint written on the CPU resumed with fp16 on the GPU
#   variants    every variant (and the TensorRT graph) loaded on the CPU and on CUDA, fallback off
#   nccl        world-size-1 NCCL all-reduce, and the gloo groups kiln runs beside it
#   serve       `kiln serve --providers cuda,cpu` on fp16 and int8-static: provider reported, RSS
#   bench-gpu   bench/run.py --quick --only gpu within what is left
# Without a CUDA device every GPU check says "no CUDA device" and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON="${PYTHON:-python3}"
OUT="${OUT:-bench/results/gpu-check}"
TOTAL="${KILN_GPU_CHECK_SECONDS:-570}"   # leaves half a minute of a 10-minute slot for starting and copying
DEVICE=cuda
SCALE=1   # the CPU smoke test trains on fewer images but is still slower: its checks get longer limits
if [[ "${1:-}" == "--cpu" ]]; then
  DEVICE=cpu SCALE=3
  export KILN_GPU_CHECK_SMOKE=1
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/trainer:$PWD/serving:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kiln-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
summary="$OUT/summary.md"
{
  echo "# kiln GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE)"
  echo
  echo "| # | check | status | seconds |"
  echo "|---:|---|---|---:|"
} >"$summary"

number=0
failed=0
# check NAME LIMIT COMMAND...: run it within LIMIT seconds (or what is left of TOTAL), write $OUT/NN-NAME.md.
check() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  number=$((number + 1))
  local file started code status left
  file="$OUT/$(printf '%02d' "$number")-$name.md"
  left=$((TOTAL - SECONDS))
  if ((left < 20)); then
    echo "not run: the check's ${TOTAL} s were spent" >"$file"
    echo "| $number | $name | not run (time spent) | 0 |" >>"$summary"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most $limit s)"
  started=$SECONDS
  {
    echo "## $name"
    echo
  } >"$file"
  timeout --kill-after=10 "$limit" "$@" >>"$file" 2>&1
  code=$?
  case $code in
    0) status=passed ;;
    3) status="no CUDA device" ;;
    124 | 137) status="timed out after $limit s" ;;
    *) status="failed (exit $code)" ;;
  esac
  if [[ $code != 0 && $code != 3 ]]; then
    failed=$((failed + 1))
  fi
  echo "| $number | $name | $status | $((SECONDS - started)) |" >>"$summary"
  echo "   $status"
}

gpu_check=("$PYTHON" bench/gpu_check.py --work "$WORK" --device "$DEVICE")
check env 60 "${gpu_check[@]}" env
check train 150 "${gpu_check[@]}" train
check resume-gpu 60 "${gpu_check[@]}" resume-gpu
check resume-cpu 90 "${gpu_check[@]}" resume-cpu
check variants 60 "${gpu_check[@]}" variants
check nccl 45 "${gpu_check[@]}" nccl
check serve 90 "${gpu_check[@]}" serve
# The GPU table last, with what is left: run.py's own --budget keeps it inside and still writes its report.
budget=$((TOTAL - SECONDS - 15))
check bench-gpu "$(((budget + 15) / SCALE))" "${gpu_check[@]}" --budget "$budget" --report "$OUT/bench-gpu-report.md" bench-gpu

echo "gpu-check: $failed check(s) failed; results in $OUT"
cat "$summary"
exit $((failed > 0))
