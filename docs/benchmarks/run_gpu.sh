#!/usr/bin/env bash
# Kernel tests (compiled, full grid; the affinity ops' too), the kernel, random-walk and training-step benches on a
# CUDA machine; results under $OUT.
#
#   OUT=/some/dir bash docs/benchmarks/run_gpu.sh [tests|bench|all]     (from the repo root)
#
# Each part takes a few minutes (the tests compile a few hundred kernel variants; the bench
# compiles the reference with torch.compile for every op and shape): run `tests` and `bench` as
# two commands where one command is limited to 10 minutes.
#
# Works whether or not `pip install --no-build-isolation --no-deps -e .` has run: puzzlecam and
# puzzlecam.kernels are imported from this source tree through a throwaway package directory of
# symlinks (puzzlecam/* plus kernels/ as puzzlecam/kernels) put first on PYTHONPATH, with
# PYTHONSAFEPATH=1 so the repo root itself (whose puzzlecam/ has no kernels/) is not on sys.path.
# The C++/CUDA extension is used when puzzlecam/_C*.so exists; BUILD_EXT=1 builds it in place first.
#
# Environment: OUT (default ./gpu_out), PYTHON (default python), BENCH_DTYPES (default "fp32"; e.g. "fp32 bf16"),
# BENCH_ARGS (extra flags for the kernel bench), TRAIN_ARCHS (archs of `bench train`, default resnet50
# resnest101), PYTEST_ARGS (extra flags for pytest).
set -uo pipefail

what=${1:-all}
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
[ -f "$REPO/kernels/__init__.py" ] && [ -f "$REPO/puzzlecam/__init__.py" ] || { echo "run from the repo root" >&2; exit 2; }

if [ "${BUILD_EXT:-0}" = "1" ]; then
  echo "== building puzzlecam._C in place" | tee -a "$OUT/build_ext.log"
  # CC/CXX: build with the system compiler where the default one mismatches the runtime libstdc++
  # (docs/extension.md, Troubleshooting).
  "$PY" setup.py build_ext --inplace >>"$OUT/build_ext.log" 2>&1 || echo "extension build failed (see build_ext.log); going on without it"
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
  "$PY" -c "import sys, torch, triton, puzzlecam, puzzlecam.kernels as k, puzzlecam.ops as ops
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)
print('puzzlecam from', puzzlecam.__file__, '| kernels from', k.__file__, '| interpreted:', k.INTERPRETED)
print('backends on cuda:', {op: ops.available_backends(op, 'cuda') for op in ('reconstruction_loss', 'prepare_inputs', 'multiscale_cam')})"
} 2>&1 | tee "$OUT/env.txt"

rc=0
if [ "$what" = "tests" ] || [ "$what" = "all" ]; then
  echo "== kernel tests (compiled, full grid)"
  PUZZLECAM_FULL_GRID=1 "$PY" -m pytest "$REPO/tests/test_kernels.py" "$REPO/tests/test_ops.py" \
    "$REPO/tests/test_affinity_ops.py" "$REPO/tests/test_affinity_triton.py" "$REPO/tests/test_segment.py" \
    -c "$REPO/pyproject.toml" --rootdir "$REPO" -q -rs --durations=15 --junitxml="$OUT/kernel_tests.xml" ${PYTEST_ARGS:-} \
    2>&1 | tee "$OUT/kernel_tests.log"
  test_rc=${PIPESTATUS[0]}
  [ "$test_rc" -ne 0 ] && rc=$test_rc
fi
if [ "$what" = "bench" ] || [ "$what" = "all" ]; then
  for dt in ${BENCH_DTYPES:-fp32}; do
    echo "== bench kernels ($dt)"
    "$PY" -m puzzlecam.bench kernels --dtype "$dt" --json "$OUT/bench_kernels_$dt.json" ${BENCH_ARGS:-} \
      2>&1 | tee "$OUT/bench_kernels_$dt.log"
    bench_rc=${PIPESTATUS[0]}
    [ "$bench_rc" -ne 0 ] && rc=$bench_rc
  done
  echo "== bench rw (random walk per backend vs the dense method on the same GPU; fused affinity loss at batch 32)"
  "$PY" -m puzzlecam.bench rw --device cuda --json "$OUT/bench_rw.json" 2>&1 | tee "$OUT/bench_rw.log"
  bench_rc=${PIPESTATUS[0]}
  [ "$bench_rc" -ne 0 ] && rc=$bench_rc
  echo "== bench segment (multi-scale + flip DeepLabv3+ inference)"
  "$PY" -m puzzlecam.bench segment --device cuda --json "$OUT/bench_segment.json" 2>&1 | tee "$OUT/bench_segment.log"
  bench_rc=${PIPESTATUS[0]}
  [ "$bench_rc" -ne 0 ] && rc=$bench_rc
  echo "== bench train --task segmentation (resnet50)"
  "$PY" -m puzzlecam.bench train --task segmentation --device cuda --arch resnet50 \
    --json "$OUT/bench_train_segmentation.json" 2>&1 | tee "$OUT/bench_train_segmentation.log"
  bench_rc=${PIPESTATUS[0]}
  [ "$bench_rc" -ne 0 ] && rc=$bench_rc
  for arch in ${TRAIN_ARCHS:-resnet50 resnest101}; do
    echo "== bench train ($arch)"
    "$PY" -m puzzlecam.bench train --device cuda --arch "$arch" --json "$OUT/bench_train_$arch.json" \
      2>&1 | tee "$OUT/bench_train_$arch.log"
    bench_rc=${PIPESTATUS[0]}
    [ "$bench_rc" -ne 0 ] && rc=$bench_rc
  done
fi
echo "results in $OUT (exit $rc)"
exit $rc
