#!/usr/bin/env bash
# The GPU check, one script: CUDA tests, the kernel benchmark and the GPU-sized suite.
# Usage: bash bench/gpu_check.sh OUTDIR   (from the repository root, on a machine with a GPU;
# about 6 minutes on an H200). Every log and result lands in OUTDIR.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUTDIR/NAME.log, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$out/$name.log"
  [ $rc -eq 0 ] || { echo "!! $name exited $rc"; status=1; }
}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" \
  | tee "$out/device.txt" || exit 1
nvidia-smi >>"$out/device.txt" 2>&1 || true
# offline machine: no build isolation, no dependencies (torch and triton are there already);
# revtriton.kernels only imports once the package is installed (package_dir mapping)
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
step tests 180 python3 -m pytest -q tests -k cuda -p no:cacheprovider  # the CPU suite is CI's
step kernels 150 python3 -m bench kernels --out "$out"  # sized for ~90 s on an H200 (estimated from its bytes; not yet run there)
step suite 240 python3 -m bench --preset gpu --out "$out"
exit $status
