#!/usr/bin/env bash
# The whole GPU session in ONE device call (phases cut to a 540 s budget, build included; the device tool allows
# 10 minutes per command and 15 per session, so there is time to rerun it once):
#     bash tests/gpu/device_session.sh                            # from the repository root, on the GPU machine
#     bash tests/gpu/device_session.sh --with-pytest-benchmark    # a second call: the pytest-benchmark JSON too
# GPU correctness first, then every benchmark suite; each phase has its own time limit and writes its result under
# $OUT as it goes, so a phase that hangs or fails costs only its own slot. At most 8 files come back from $OUT:
#   session.log          phase timings and exit codes (+ nvidia-smi and build_info at the top, then the table of
#                        `blipfast selftest`: every fused kernel against its reference on this GPU, docs/selftest.md)
#   selftest.json        `blipfast selftest --full` (first call only; the second call runs --quick, table only)
#   pytest-gpu.log       `pytest -m gpu tests` (every CUDA/Triton kernel against its reference, the stage-1 step
#                        in a CUDA graph, compile without syncs, ...)
#   sanitizer.log        compute-sanitizer memcheck/racecheck/initcheck over the Triton attention kernels and
#                        memcheck over the CUDA epilogue and sampler
#   blipfast-bench.log   `blipfast bench` (every suite: counted stage-1 costs, timed stage-1 step, Q-Former,
#   blipfast-bench.json  attention, ITC, retrieval, training data path) and its plot; the BLIP (v1) pre-training
#   blipfast-bench.png   and CapFilt suite in a phase of its own (same log; blipfast-bench-blip.json, first call only)
#   pytest-benchmark.json  `pytest benchmarks/ --benchmark` (the same cases under pytest-benchmark)
#   pytest-benchmark.log
# Copy the JSONs to benchmarks/results/ and commit them. The device image has torch, triton, transformers and
# pytest-benchmark but no network: the package is installed with --no-deps.
set -uo pipefail
OUT=${OUT:-/tmp/blipfast-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} BLIPFAST_CUDA_ARCHS=${BLIPFAST_CUDA_ARCHS:-90a}
LOG="$OUT/session.log"
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-540}  # the whole script fits in 9 minutes: run it with timeout_s 590, rerun once if needed

phase() {  # phase NAME LIMIT_S LOGFILE COMMAND...: run with a time limit, append its timing to session.log
  local name=$1 limit=$2 log=$3
  shift 3
  local t=$(date +%s)
  local left=$(( BUDGET_S - (t - T0) ))  # every phase is cut to what is left of the session's budget
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t ))s (session $(( $(date +%s) - T0 ))s)" | tee -a "$LOG"
  return 0
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } >>"$LOG" 2>&1
phase "build (sm_${BLIPFAST_CUDA_ARCHS})" 150 "$LOG" \
  env BLIPFAST_BUILD_CUDA=1 python -m pip install -q -e . --no-build-isolation --no-deps
python -c 'import blipfast, json; print(json.dumps(blipfast.build_info()))' >>"$LOG" 2>&1

# 0. the self-test of every fused kernel on this GPU (its verdicts are cached: a kernel that fails is not used by
#    `blipfast bench` below; the tests force their backends), and a failure is the first thing to read
if [ "${1:-}" != "--with-pytest-benchmark" ]; then
  phase "blipfast selftest --full" 120 "$LOG" blipfast selftest --full --no-progress --json "$OUT/selftest.json"
else
  phase "blipfast selftest --quick" 60 "$LOG" blipfast selftest --quick --no-progress
fi

# 1. correctness on the GPU: every -m gpu test (kernels against their references in fp16/bf16/fp32, the stage-1
#    step against LAVIS' restatement, compile without syncs, the training step in a CUDA graph, ...)
phase "pytest -m gpu" 150 "$OUT/pytest-gpu.log" python -m pytest -q -m gpu tests -p no:cacheprovider -rfE
# the attention hardening suites (NaN/inf, out-of-range kv_index) take the device's tensors when there is one
phase "attention NaN + kv_index suites on CUDA" 60 "$OUT/pytest-gpu.log" python -m pytest -q -p no:cacheprovider -rfE \
  tests/kernels/test_attention_nan.py tests/kernels/test_attention_index_range.py

# 2. compute-sanitizer on the newest kernels: the Triton attention (itc_itg mode, masked kv_index tables) and
#    the CUDA epilogue (its statistics now one [2, R] buffer)
phase "sanitizer: attention" 60 "$OUT/sanitizer.log" bash tests/gpu/run_sanitizer_attention.sh
phase "sanitizer: memcheck CUDA epilogue + sampler" 40 "$OUT/sanitizer.log" \
  compute-sanitizer --tool memcheck --error-exitcode 3 python -m pytest -q -m gpu -p no:cacheprovider \
  tests/kernels/test_layernorm_epilogue.py tests/kernels/test_hard_negatives.py -k "raw_op_matches or index_for_index"

# 3. every benchmark suite (`blipfast bench` runs the cases of benchmarks/ too: `pytest benchmarks/ --benchmark`
#    times the same ones under pytest-benchmark, in a later call if time is left)
phase "blipfast bench" 180 "$OUT/blipfast-bench.log" blipfast bench --out "$OUT/bench" \
  --only stage1,qformer,attention,itc,retrieval,train_data
for f in "$OUT"/bench/*.json; do [ -e "$f" ] && cp "$f" "$OUT/blipfast-bench.json"; done
for f in "$OUT"/bench/*.png; do [ -e "$f" ] && cp "$f" "$OUT/blipfast-bench.png"; done
rm -rf "$OUT/bench"
if [ "${1:-}" != "--with-pytest-benchmark" ]; then
  # BLIP (v1) pre-training step and CapFilt (ViT-B models, torch.compile): a phase of its own, so that its compile
  # time cannot cost the other suites their results; its JSON as blipfast-bench-blip.json (8 files in this call,
  # selftest.json included)
  phase "blipfast bench --only blip_pretrain" 120 "$OUT/blipfast-bench.log" \
    blipfast bench --only blip_pretrain --out "$OUT/bench-blip"
  for f in "$OUT"/bench-blip/*.json; do [ -e "$f" ] && cp "$f" "$OUT/blipfast-bench-blip.json"; done
  rm -rf "$OUT/bench-blip"
fi
if [ "${1:-}" = "--with-pytest-benchmark" ]; then
  phase "pytest benchmarks/ --benchmark" 150 "$OUT/pytest-benchmark.log" \
    python -m pytest benchmarks/ --benchmark -p no:cacheprovider --benchmark-json="$OUT/pytest-benchmark.json"
fi

echo "=== done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
