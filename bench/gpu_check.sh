#!/usr/bin/env bash
# The GPU check in one script: a pre-flight launch, the CUDA tests, the kernel benchmark, a
# captured training step against an uncaptured one and the GPU-sized suite, each under a timeout:
# 7.5 minutes at most in all (the steps' limits, 450 s), leaving 2.5 minutes of the device tool's
# 10-minute command for start-up, nvidia-smi and the copy back. It has not yet run on a GPU: the
# limits are estimates; the kernel and graph benchmarks write their results as they go, so a step
# stopped by its limit keeps what it measured.
#
# Usage: bash bench/gpu_check.sh [--dry-run] OUTDIR      (from any directory)
#
# It installs nothing: it runs `python3 -m ...` in the repository root, which imports the checkout
# (revtriton/kernels is a symlink to kernels/). OUTDIR gets gpu_check.log (every step's output)
# and the results in the form bench/results/ keeps: kernels-cuda-DATE.{json,md},
# graphs-cuda-DATE.{json,md} and cuda-gpu-DATE.{json,md,png}. --dry-run does, on a machine without
# a GPU, everything but the GPU work: the imports, collecting the CUDA tests, compiling every kernel
# ahead of time for sm_90, a tiny CPU run of the kernel benchmark's code, and building the models of
# the graph benchmark and of the GPU preset; it exits 0 when all of that passes. Set PYTHON to use
# another interpreter than python3.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:?usage: bash bench/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute before the cd below
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python3}
log="$out/gpu_check.log"
: >"$log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: run it, append its output to the log, keep going on failure
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s): $(head -n 1 <<<"$*")" | tee -a "$log"
  timeout "$limit" "$@" >"$out/step.log" 2>&1
  local rc=$?
  cat "$out/step.log" >>"$log"
  tail -n 3 "$out/step.log"
  rm -f "$out/step.log"
  echo "-- $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
  [ $rc -eq 0 ] || status=1
  return $rc
}

step import 30 "$python" -c "
import os, sys, torch, triton, revtriton, revtriton.kernels
here = os.path.join(os.getcwd(), 'revtriton', 'kernels')
assert os.path.dirname(revtriton.kernels.__file__) == here, f'revtriton.kernels from {revtriton.kernels.__file__}, not {here}'
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, revtriton from {os.getcwd()}')
" || exit 1

if [ $dry -eq 1 ]; then
  step collect 120 "$python" -m pytest --collect-only -q -m cuda -p no:cacheprovider tests
  step compile 600 "$python" -m bench compiled --target sm_90 --out "$out"
  step kernels-smoke 120 "$python" -m bench kernels --preset tiny --out "$out"
  step graph-models 120 "$python" -m bench graphs --build-only
  step models 300 "$python" -m bench --preset gpu --build-only
  exit $status
fi

# pre-flight: Triton builds its launcher with a C compiler on the first launch; find out now
step preflight 40 "$python" -c "
import torch, revtriton
print(torch.cuda.get_device_name())
a, b = torch.zeros(4096, device='cuda'), torch.ones(4096, device='cuda')
torch.ops.revtriton.coupling_forward(a, b)
torch.cuda.synchronize()
assert a.eq(1).all(), 'the Triton kernel ran but computed wrong values'
print('pre-flight: a Triton kernel compiled, launched and computed')
" || exit 1
nvidia-smi >>"$log" 2>&1
step tests 145 "$python" -m pytest -q -rs -m cuda -p no:cacheprovider tests
if grep -q "^SKIPPED" "$log"; then  # every CUDA test must run on a GPU machine
  echo "!! tests: CUDA tests were skipped on a GPU machine" | tee -a "$log"
  status=1
fi
step kernels 75 "$python" -m bench kernels --out "$out"
step graphs 35 "$python" -m bench graphs --out "$out"
step suite 125 "$python" -m bench --preset gpu --out "$out"
exit $status
