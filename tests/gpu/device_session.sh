#!/usr/bin/env bash
# The GPU work of issues 2-4 in two device calls (each well under the device tool's 10-minute limit):
#   bash tests/gpu/device_session.sh test    build for sm_90a, GPU tests of every op, compute-sanitizer
#   bash tests/gpu/device_session.sh bench   pytest-benchmark suites + `blipfast bench`, JSON/plots to $OUT
# Logs and results land in $OUT (the device tool brings them back); copy the JSONs to benchmarks/results/.
# The device image has torch, triton, transformers and pytest-benchmark but no network: --no-deps.
set -uo pipefail
OUT=${OUT:-/tmp/blipfast-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} BLIPFAST_CUDA_ARCHS=${BLIPFAST_CUDA_ARCHS:-90a}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

build() {
  BLIPFAST_BUILD_CUDA=1 python -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -5
  python -c 'import blipfast, json; print(json.dumps(blipfast.build_info()))' | tee "$OUT/build_info.json"
}

case "${1:-test}" in
  test)
    build
    python -m pytest -q -m gpu tests -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" | tail -30
    python -m pytest -q tests/test_attention_triton.py tests/test_attention_nan.py tests/test_attention_index_range.py \
      tests/test_attention_autotune.py tests/test_itc_triton.py tests/test_itc_nonfinite.py -p no:cacheprovider 2>&1 \
      | tee "$OUT/pytest-kernels-on-cuda.log" | tail -5
    bash tests/gpu/run_sanitizer_attention.sh 2>&1 | tee "$OUT/sanitizer-attention.log" | tail -10
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" python -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_layernorm_epilogue.py tests/test_hard_negatives_cuda.py -k "raw_op_matches or philox_matches or backward_is_deterministic or index_for_index" 2>&1 \
        | tee "$OUT/sanitizer-$tool-cuda.log" | tail -5
    done
    ;;
  bench)
    build
    python -m pytest benchmarks/ --benchmark -p no:cacheprovider \
      --benchmark-json="$OUT/pytest-benchmark.json" 2>&1 | tee "$OUT/pytest-benchmark.log" | tail -60
    blipfast bench --out "$OUT" 2>&1 | tee "$OUT/blipfast-bench.log" | tail -60
    ;;
  *) echo "usage: $0 test|bench"; exit 2 ;;
esac
