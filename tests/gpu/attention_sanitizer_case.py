"""Minimal invocation of every Triton attention kernel for compute-sanitizer (run_sanitizer_attention.sh).

Small shapes that still take every path: self-attention single-tile (fused backward) and multi-block
(online softmax + separate dQ kernel), suffix rows, padding with an all-padded sequence, dropout;
cross-attention with kv_index (repeats, an unused image, stacked row-sets, the row-set table kernel)
and without. Exits non-zero if an output is not finite.
"""
import os
import sys

os.environ.setdefault("BLIPFAST_AUTOTUNE", "0")  # no timing loops under the sanitizer: heuristic configs only

import torch  # noqa: E402

from blipfast.kernels import attention as kern  # noqa: E402


def main() -> int:
    # a CPU dry run of this script works under TRITON_INTERPRET=1 (set before the import above)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    bf = torch.bfloat16
    seed = torch.tensor([123], dtype=torch.int64, device=dev)
    outs = []
    for (b, lq, lk, nq, d, mode, p) in [(3, 40, 40, 8, 64, "causal", 0.1), (2, 20, 36, 6, 88, "unimodal", 0.0),
                                        (2, 70, 200, 32, 64, "bidirectional", 0.1)]:
        q, k, v = (torch.randn(b, n, 4, d, device=dev, dtype=bf) for n in (lq, lk, lk))
        kpm = torch.rand(b, lk, device=dev) > 0.3
        kpm[0] = False
        s = seed if p > 0 else None
        o, lse = kern.qformer_attention_fwd(q, k, v, kpm, s, nq, mode, p, d ** -0.5)
        outs += [o, *kern.qformer_attention_bwd(torch.randn_like(o), q, k, v, o, lse, kpm, s, nq, mode, p, d ** -0.5)]
    for idx in (torch.tensor([3, 0, 3, 1, 3, 3, 0], device=dev), None):
        n = 7 if idx is not None else 5
        q = torch.randn(n, 32, 4, 64, device=dev, dtype=bf)
        k, v = (torch.randn(5, 257, 4, 64, device=dev, dtype=bf) for _ in range(2))
        kpm = torch.rand(5, 257, device=dev) > 0.2
        o, lse = kern.cross_attention_fwd(q, k, v, idx, kpm, seed, 0.1, 0.125)
        outs += [o, *kern.cross_attention_bwd(torch.randn_like(o), q, k, v, o, lse, idx, kpm, seed, 0.1, 0.125)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bad = [i for i, t in enumerate(outs) if not torch.isfinite(t).all()]
    print("attention sanitizer case:", "non-finite outputs " + str(bad) if bad else "all outputs finite")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
