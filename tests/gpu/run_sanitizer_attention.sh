#!/usr/bin/env bash
# compute-sanitizer over the Triton attention kernels (issue 3). Run from the repository root on a GPU:
#     bash tests/gpu/run_sanitizer_attention.sh
# memcheck: out-of-bounds / misaligned global accesses; racecheck: shared-memory hazards; initcheck:
# reads of uninitialised global memory. PyTorch's caching allocator is switched off so that every tensor
# is its own allocation and an out-of-bounds access cannot land silently in a neighbouring tensor.
set -euo pipefail
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
CASE="tests/gpu/attention_sanitizer_case.py"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 BLIPFAST_AUTOTUNE=0
status=0
for tool in memcheck racecheck initcheck; do
    echo "== compute-sanitizer --tool ${tool}"
    # --error-exitcode makes any reported error fail the run. initcheck also watches torch's own kernels;
    # a report there that names no attn_* / _rowset_table kernel is not ours.
    extra=()
    [ "$tool" = "racecheck" ] && extra=(--racecheck-report all)
    if ! "$SAN" --tool "$tool" --error-exitcode 3 "${extra[@]}" python "$CASE"; then
        echo "!! ${tool} reported errors"; status=1
    fi
done
exit $status
