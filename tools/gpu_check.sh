#!/usr/bin/env bash
# The GPU check, to run first on any machine with an NVIDIA GPU (from the repository root or anywhere):
#
#   bash tools/gpu_check.sh OUT_DIR
#
# 1. environment: nvidia-smi, nvcc, onnxruntime's providers (CUDAExecutionProvider required: onnxruntime-gpu),
#    torch with CUDA (env.txt);
# 2. build: kernels/build.py with the CUDA kernel required (build.log);
# 3. tests: every test marked gpu (pytest -m gpu), none may be skipped (tests.log, tests.xml);
# 4. benchmark: lowbit per-IC/per-OC 4/3/2-bit against ONNX Runtime's CUDA MatMulNBits, its fp32 MatMul
#    and fp16 cuBLAS (torch) at M = 1..32, weights not resident in L2, % of the measured read bandwidth
#    (bench.md, bench.json, bench.log; python -m lowbit.tools.dev.bench_matmul_cuda).
#
# Everything goes into OUT_DIR, with summary.txt (each step, its time and its status). Each step has a time
# limit, so the whole check ends within 8 minutes; the first step that fails stops it with a non-zero exit
# status and a FAILED line naming the step and its log.
set -euo pipefail

out=${1:?usage: bash tools/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
unset LOWBIT_OPS_LIBRARY  # the library this check builds, next to kernels/build.py
: >"$out/summary.txt"
start=$SECONDS

# step NAME LIMIT_SECONDS LOG FUNCTION: runs FUNCTION (below) with its output in OUT_DIR/LOG, or stops the check.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (limit ${limit}s, log $log)" | tee -a "$out/summary.txt"
  local t0=$SECONDS status=0
  timeout "$limit" bash -c "set -euo pipefail; $*" >"$out/$log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    local why="exit status $status"
    [ "$status" -eq 124 ] && why="over its ${limit}s limit"
    echo "FAILED: $name ($why); the end of $out/$log:" | tee -a "$out/summary.txt" >&2
    tail -n 40 "$out/$log" >&2
    exit 1
  fi
  echo "   ok in $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}

environment() {
  date -u
  git -C "$repo" log -1 --oneline || true
  nvidia-smi
  nvcc --version || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version
  python - <<'EOF'
import onnxruntime as ort
import torch

print("onnxruntime", ort.__version__, ort.get_available_providers())
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if "CUDAExecutionProvider" not in ort.get_available_providers():
    raise SystemExit("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (same version as onnxruntime)")
if not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA device (a CPU-only torch build, or no GPU)")
print(torch.cuda.get_device_name(0))
EOF
}

build() {
  python - <<'EOF'
import sys

sys.path.insert(0, "kernels")
import build  # kernels/build.py

build.build(cuda=True, force=True)  # BuildError (no nvcc, a compile error) fails the step
EOF
}

tests() {
  python -m pytest -q -m gpu tests -p no:cacheprovider -rs --junitxml="$out/tests.xml"
  python - "$out/tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ElementTree

suite = ElementTree.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {key: int(suite.get(key, 0)) for key in ("tests", "skipped", "failures", "errors")}
print(counts)
if counts["tests"] == 0 or counts["skipped"] or counts["failures"] or counts["errors"]:
    raise SystemExit(f"every GPU test must run and pass: {counts}")
EOF
}

benchmark() {
  python -m lowbit.tools.dev.bench_matmul_cuda --json "$out/bench.json" | tee "$out/bench.md"
}

export out repo
export -f environment build tests benchmark  # step runs each in a bash under timeout
step environment 60 env.txt environment
step build 180 build.log build
step tests 120 tests.log tests
step benchmark 150 bench.log benchmark
echo "GPU check passed in $((SECONDS - start))s: $out" | tee -a "$out/summary.txt"
