#!/usr/bin/env bash
# Every GPU check of the project in one device call of under 10 minutes: build the extension, run the compiled
# tests (kernels, ops, the op library's opcheck, the compiled step with Triton ops + Inductor + CUDA graphs), then
# the benchmarks (kernels: device and host time; the training step: reference / strongest plain PyTorch / fast with
# MFU and a profile; the random walk). Results under $OUT.
#
#   OUT=/some/dir bash docs/benchmarks/run_gpu.sh [build|tests|bench|all]     (from the repo root)
#
# Every part runs under its own time limit (seconds; override with the environment variables below), so the whole
# script ends in time whatever hangs; a part cut off says so in summary.txt. The device tool brings back at most 8
# files: everything is packed into $OUT/results.tar.gz, with $OUT/summary.txt (the exit status and time of every
# part) and $OUT/bench_train.log (the training-step table) beside it.
#
# Works whether or not `pip install --no-build-isolation --no-deps -e .` has run: puzzlecam and
# puzzlecam.kernels are imported from this source tree through a throwaway package directory of
# symlinks (puzzlecam/* plus kernels/ as puzzlecam/kernels) put first on PYTHONPATH, with
# PYTHONSAFEPATH=1 so the repo root itself (whose puzzlecam/ has no kernels/) is not on sys.path.
#
# Environment: OUT (default ./gpu_out), PYTHON (default python), BUILD_EXT (default 1: build puzzlecam._C in place
# with the system compiler, docs/extension.md), limits T_BUILD (170), T_TESTS (150), T_KERNELS (70), T_TRAIN (210),
# T_RW (25), BENCH_DTYPE (bf16), TRAIN_ARCH (resnet50), PYTEST_ARGS (extra pytest flags).
set -uo pipefail

what=${1:-all}
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
PY=${PYTHON:-python}
WORK="$OUT/work"
mkdir -p "$WORK"
[ -f "$REPO/kernels/__init__.py" ] && [ -f "$REPO/puzzlecam/__init__.py" ] || { echo "run from the repo root" >&2; exit 2; }
START=$(date +%s)
: >"$OUT/summary.txt"

# part NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds, its output in $WORK/NAME.log; record the status.
rc=0
part() {
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local status=$?
  local note=""
  [ "$status" -eq 124 ] && note=" (cut off at ${limit}s)"
  echo "$name: exit $status, $(($(date +%s) - t0)) s$note" | tee -a "$OUT/summary.txt"
  tail -n 30 "$WORK/$name.log"
  [ "$status" -ne 0 ] && rc=$status
  return 0
}

if [ "${BUILD_EXT:-1}" = "1" ] && { [ "$what" = "build" ] || [ "$what" = "all" ]; }; then
  # The system compiler: an image whose default g++ mismatches the runtime libstdc++ builds a broken _C.
  part build_ext "${T_BUILD:-170}" env CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 "$PY" setup.py build_ext --inplace
fi

SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
mkdir "$SRC/puzzlecam"
for f in "$REPO"/puzzlecam/*; do ln -s "$f" "$SRC/puzzlecam/$(basename "$f")"; done
ln -s "$REPO/kernels" "$SRC/puzzlecam/kernels"
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1
unset TRITON_INTERPRET

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi -L || true
  "$PY" -c "import sys, torch, triton, puzzlecam, puzzlecam.kernels as k, puzzlecam.ops as ops, puzzlecam.library as lib
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)
print('puzzlecam from', puzzlecam.__file__, '| kernels from', k.__file__, '| interpreted:', k.INTERPRETED)
print('extension:', lib.available(), lib.load_error(), '| triton ops:', k.UNREGISTERED or 'registered')
print('backends on cuda:', {op: ops.available_backends(op, 'cuda') for op in ('reconstruction_loss', 'prepare_inputs', 'affinity_sums', 'random_walk')})"
} 2>&1 | tee "$OUT/env.txt"

if [ "$what" = "tests" ] || [ "$what" = "all" ]; then
  # The compiled kernels against the reference (default grid), the extension's CUDA ops, opcheck of every op, and
  # the compiled step on the GPU (Triton ops inside Inductor's graph, CUDA graphs) against the eager step.
  part tests "${T_TESTS:-150}" "$PY" -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -q -rs -x --durations=10 \
    "$REPO/tests/test_library.py" "$REPO/tests/test_kernels.py" "$REPO/tests/test_ops.py" "$REPO/tests/test_ext.py" \
    "$REPO/tests/test_affinity_ops.py" "$REPO/tests/test_affinity_triton.py" "$REPO/tests/test_compiled_step.py" \
    -m "gpu or not slow" -k "cuda or gpu or triton or library" --junitxml="$WORK/tests.xml" ${PYTEST_ARGS:-}
fi

if [ "$what" = "bench" ] || [ "$what" = "all" ]; then
  # Kernels: device time (CUDA-graph replay) and host time per call, the paper's and the large shape.
  part bench_kernels "${T_KERNELS:-70}" "$PY" -m puzzlecam.bench kernels --dtype "${BENCH_DTYPE:-bf16}" \
    --json "$WORK/bench_kernels.json"
  # The training step: reference / plain (reference ops, bf16, channels_last, torch.compile) / fast (fused ops in
  # the compiled step, CUDA graphs); MFU; a profile of each mode (the fused ops' share of the step).
  part bench_train "${T_TRAIN:-210}" "$PY" -m puzzlecam.bench train --device cuda --arch "${TRAIN_ARCH:-resnet50}" \
    --steps 10 --warmup 5 --profile "$WORK" --json "$WORK/bench_train.json"
  cp "$WORK/bench_train.log" "$OUT/bench_train.log" 2>/dev/null
  part bench_rw "${T_RW:-25}" "$PY" -m puzzlecam.bench rw --device cuda --json "$WORK/bench_rw.json"
fi

echo "total: $(($(date +%s) - START)) s, exit $rc" | tee -a "$OUT/summary.txt"
tar -czf "$OUT/results.tar.gz" -C "$OUT" work env.txt summary.txt 2>/dev/null
rm -rf "$WORK"
exit $rc
