#!/usr/bin/env bash
# GPU benchmarks in a few minutes, on a machine with an NVIDIA GPU and no network (a copy of this repo).
#
#   bash bench/gpu.sh          # the GPU table (training with AMP, compiled inference, serving on CUDA)
#   bash bench/gpu.sh --all    # ... then the CPU tables that need no control plane (train, compile, serving)
#
# Packages: wheels in .whl/ (if the folder exists) are installed first, without the network and without their
# dependencies, into the interpreter that holds torch (python3, or $PYTHON). kiln itself is not installed: the
# repo folders go on PYTHONPATH. Then it says what is present and what is missing, and runs what it can:
# without torch+CUDA nothing runs; without kiln's dependencies (pydantic, onnx, onnxscript, onnxconverter-common)
# only a torch-only probe runs; without onnxruntime-gpu the onnxruntime CUDA/TensorRT columns and GPU
# `kiln serve` are left out; without starlette/uvicorn the serving section is. bench/README.md lists the wheels.
#
# The report goes to $OUT/gpu.md when OUT is set (a device machine's result folder), else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON="${PYTHON:-python3}"
LIMIT="${KILN_BENCH_GPU_SECONDS:-330}"   # the GPU table; --all adds up to three times as much for the CPU tables
# run.py keeps to --budget itself (it stops a table that would overrun and still writes its report); the outer
# timeout is only a backstop, a minute later, should the runner itself hang.
BACKSTOP=60
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/trainer:$PWD/serving:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"

echo "== machine"
nproc
grep -m1 "model name" /proc/cpuinfo || true
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
  echo "bench/gpu.sh: nvidia-smi found no GPU; nothing to measure here (use bench/run.py for the CPU tables)" >&2
  exit 1
fi

echo "== wheels"
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  # onnxruntime-gpu provides the same `onnxruntime` module: the CPU package must go first, never sit beside it.
  if compgen -G ".whl/onnxruntime_gpu-*.whl" >/dev/null; then
    "$PYTHON" -m pip uninstall -q -y onnxruntime || true
  fi
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${wheels[@]}"; then
    echo "bench/gpu.sh: installing .whl/ into $PYTHON failed; trying a side folder on PYTHONPATH" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kiln-bench-site \
      "${wheels[@]}" && export PYTHONPATH="/tmp/kiln-bench-site:$PYTHONPATH"
  fi
  echo "installed ${#wheels[@]} wheel(s) from .whl/"
else
  echo "no .whl/ folder: using what $PYTHON already has"
fi

echo "== packages"
"$PYTHON" - <<'EOF'
import importlib

for module in ("torch", "torchvision", "onnxruntime", "onnx", "onnxscript", "onnxconverter_common", "pydantic",
               "yaml", "sklearn", "starlette", "uvicorn", "multipart", "prometheus_client", "kiln.api"):
    try:
        found = importlib.import_module(module)
        print(f"  {module:22} {getattr(found, '__version__', 'ok')}")
    except Exception as err:
        print(f"  {module:22} MISSING ({type(err).__name__}: {err})")
try:
    import torch
    print(f"  torch CUDA: {torch.cuda.is_available()} ({torch.version.cuda}), native bf16: "
          f"{torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)}")
except Exception:
    pass
try:
    import onnxruntime
    print(f"  onnxruntime providers: {', '.join(onnxruntime.get_available_providers())}")
except Exception:
    pass
EOF

results="${OUT:-bench/results}"
mkdir -p "$results"
echo "== GPU table (at most ${LIMIT} s)"
timeout --kill-after=15 $((LIMIT + BACKSTOP)) "$PYTHON" bench/run.py --quick --only gpu --budget "$LIMIT" \
  --output "$results/gpu.md"
status=$?
timeout --kill-after=15 "$LIMIT" "$PYTHON" bench/gpu_cifar10.py --output "$results/gpu_cifar10.md" || status=$?
if [[ "${1:-}" == "--all" ]]; then
  echo "== CPU tables on this machine"
  timeout --kill-after=15 $((LIMIT * 3 + BACKSTOP)) "$PYTHON" bench/run.py --quick \
    --only train,compile,serving --budget $((LIMIT * 3)) --output "$results/cpu.md" || status=$?
fi
echo "bench/gpu.sh: reports in $results (exit $status)"
exit "$status"
