"""NaN and inf in q, k or v: the Triton attention kernels give NaN exactly where the reference (PyTorch
semantics, backend="torch") does, in the output and in every gradient, and never an error.

PyTorch's semantics spread a non-finite input further than the allowed keys: a masked or dropped
probability is an exact 0 that still multiplies V (and dP, K, Q, dO) in the matrix products, and 0 * NaN
= 0 * inf = NaN. So NaN or inf in a padded key's V poisons every output row, a row whose allowed scores
are all -inf (inf in q or k) is NaN (softmax of all -inf), and a dropped NaN probability stays NaN. The
kernels must match that in every tiling: single key tile, online softmax over key blocks (with causal /
unimodal masks that hide whole blocks from a tile), stacked cross-attention row-sets, dropout on and off.
Rows with no allowed key and finite inputs stay exactly 0.

Runs under the Triton interpreter on CPU (tests/conftest.py), and compiled on a GPU where there is one
(the GPU's NaN-dropping max and fused arithmetic are what the rules must survive); small shapes.
"""
from __future__ import annotations

import math

import pytest
import torch

from blipfast import ops
from blipfast.kernels import attention as kern

from tests.helpers.runtime import HAS_CUDA
from tests.helpers.tolerance import assert_within_torch_error

# numpy (under the interpreter) warns about the NaN and inf these tests feed on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NAN, INF = float("nan"), float("inf")
MULTI = dict(BLOCK_M=16, BLOCK_N=16, HPP=1, num_warps=4, num_stages=1, DQ_BLOCK_M=16, DQ_BLOCK_N=16)
CONFIGS = [pytest.param(None, id="default"), pytest.param(MULTI, id="multiblock")]
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
SEED = torch.tensor([20240611], dtype=torch.int64, device=DEV)


def _poison(case: str, q, k, v, kpm):
    """Put a non-finite value where the case says (b = 0; kpm[0] pads the keys from position 12)."""
    q, k, v = q.clone(), k.clone(), v.clone()
    if case == "nan_q":
        q[0, 3, 0, 1] = NAN
    elif case == "inf_k":
        k[0, 4, 0, 2] = INF
    elif case == "nan_padded_k":  # a key no row may attend: its score is masked, but dQ sums 0 * k
        k[0, 14, 0, :] = NAN
    elif case == "inf_padded_v":  # 0 * inf in P @ V for every row
        v[0, 15, 0, 3] = INF
    elif case == "all_scores_minus_inf":  # row 9 scores -inf against every key: softmax of all -inf is NaN
        k[0, :, 0, 0] = k[0, :, 0, 0].abs() + 0.1
        q[0, 9, 0, 0] = -INF
    elif case == "minus_inf_last_v":  # -inf in the last key's V, hidden from the query rows by the causal mask
        v[0, -1, 0, 5] = -INF
    return q, k, v


def _run(fn, ins, do):
    leaves = [t.detach().clone().requires_grad_(True) for t in ins]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [t.grad for t in leaves]


def _same_nonfinite(fast, ref, names=("out", "dq", "dk", "dv")):
    """NaN exactly where the reference has NaN (and +-inf where it has +-inf); finite values held to the
    tolerance rule with the float64 reference replaced by the fp32 reference on the finite part."""
    for name, f, r in zip(names, fast, ref):
        fn, rn = torch.isnan(f), torch.isnan(r)
        assert torch.equal(fn, rn), (f"{name}: NaN where the reference is finite at {int((fn & ~rn).sum())}, finite "
                                     f"where it is NaN at {int((rn & ~fn).sum())} of {f.numel()} elements")
        assert torch.equal(torch.isposinf(f), torch.isposinf(r)) and torch.equal(torch.isneginf(f), torch.isneginf(r)), name
        fin = torch.isfinite(r)
        if fin.any():
            err = (f[fin] - r[fin]).abs().max().item()
            assert err <= 1e-4 * (1.0 + r[fin].abs().max().item()), f"{name}: finite part differs by {err:.3e}"


def _self_inputs(mode_rows=20):
    b, l, h, d = 2, mode_rows, 1, 16
    q, k, v = (torch.randn(b, l, h, d, device=DEV) for _ in range(3))
    kpm = torch.ones(b, l, dtype=torch.bool, device=DEV)
    kpm[0, 12:] = False
    kpm[1, 8:] = False
    return q, k, v, kpm, torch.randn(b, l, h, d, device=DEV)


def _self_both(q, k, v, kpm, do, mode, p, config):
    nq, d = 5, q.shape[-1]
    seed = SEED if p > 0 else None
    kw = dict(num_query=nq, mode=mode, key_padding_mask=kpm, dropout_p=p, seed=seed)
    ref = _run(lambda q, k, v: ops.qformer_attention(q, k, v, backend="torch", **kw), (q, k, v), do)
    if config is None:
        fast = _run(lambda q, k, v: ops.qformer_attention(q, k, v, backend="triton", **kw), (q, k, v), do)
    else:
        scale = 1.0 / math.sqrt(d)
        o, lse = kern.qformer_attention_fwd(q, k, v, kpm, seed, nq, mode, p, scale, config=config)
        fast = [o, *kern.qformer_attention_bwd(do, q, k, v, o, lse, kpm, seed, nq, mode, p, scale, config=config)]
    return fast, ref


SELF_CASES = ["nan_q", "inf_k", "nan_padded_k", "inf_padded_v", "all_scores_minus_inf", "minus_inf_last_v"]


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", SELF_CASES)
def test_self_attention_nonfinite_like_the_reference(case, config, p):
    q, k, v, kpm, do = _self_inputs()
    fast, ref = _self_both(*_poison(case, q, k, v, kpm), kpm, do, "causal", p, config)
    assert any(torch.isnan(r).any() for r in ref), "the case must produce NaN in the reference"
    _same_nonfinite(fast, ref)


@pytest.mark.parametrize("mode", ["bidirectional", "unimodal"])
@pytest.mark.parametrize("case", ["nan_q", "inf_padded_v", "all_scores_minus_inf"])
def test_self_attention_nonfinite_other_modes(mode, case):
    q, k, v, kpm, do = _self_inputs()
    _same_nonfinite(*_self_both(*_poison(case, q, k, v, kpm), kpm, do, mode, 0.3, MULTI))


@pytest.mark.parametrize("config", CONFIGS)
def test_rows_without_keys_stay_zero(config):
    """Finite input, every key of batch 0 padded: its rows output 0 and get zero gradients (no NaN of the
    kernels' own making), lse is -inf; batch 1 is untouched."""
    q, k, v, kpm, do = _self_inputs()
    kpm[0] = False
    fast, ref = _self_both(q, k, v, kpm, do, "unimodal", 0.2, config)
    for name, f in zip(("out", "dq", "dk", "dv"), fast):
        assert torch.isfinite(f).all(), name
    assert fast[0][0].abs().max() == 0 and fast[1][0].abs().max() == 0
    _same_nonfinite(fast, ref)
    _, lse = kern.qformer_attention_fwd(q, k, v, kpm, SEED, 5, "unimodal", 0.2, 0.25, config=config)
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


CROSS_CONFIGS = [pytest.param(None, id="default"), pytest.param(MULTI, id="stacked_multiblock"),
                 pytest.param(dict(BLOCK_M=16, BLOCK_N=64, HPP=2, num_warps=4, num_stages=1), id="fused_hpp2")]


CROSS_CASES = [(case, cfg, p) for case, combos in [
    ("nan_q", [(0, 0.3), (1, 0.3), (2, 0.0)]),
    ("inf_k", [(0, 0.0), (1, 0.3)]),
    ("nan_padded_v", [(0, 0.3), (1, 0.0), (2, 0.3)]),
    ("all_scores_minus_inf", [(0, 0.0), (1, 0.3), (2, 0.0)]),
] for cfg, p in combos]


@pytest.mark.parametrize("case,config,p", [
    pytest.param(case, CROSS_CONFIGS[c].values[0], p, id=f"{case}-{CROSS_CONFIGS[c].id}-p{p}")
    for case, c, p in CROSS_CASES])
def test_cross_attention_nonfinite_like_the_reference(case, config, p):
    """Shared image K/V (kv_index with repeats and an unused image): NaN in one image's K/V reaches exactly
    the row-sets of that image, and dK/dV of the images they share, as in the reference."""
    n, m, lq, lk, h, d = 5, 3, 6, 37, 2, 16
    q, k, v = torch.randn(n, lq, h, d, device=DEV), *(torch.randn(m, lk, h, d, device=DEV) for _ in range(2))
    idx = torch.tensor([2, 0, 2, 2, 0], device=DEV)  # image 1 unused
    kpm = torch.rand(m, lk, device=DEV) > 0.3
    kpm[2, 30:] = False
    if case == "nan_q":
        q[3, 2, 1, 4] = NAN
    elif case == "inf_k":
        k[0, 5, 0, 1] = INF
    elif case == "nan_padded_v":
        v[2, 33, 1, 2] = NAN
    else:
        k[2, :, 0, 0] = k[2, :, 0, 0].abs() + 0.1
        q[2, 4, 0, 0] = -INF  # row-set 2 uses image 2: every score of its row 4 is -inf
    do = torch.randn(n, lq, h, d, device=DEV)
    seed = SEED if p > 0 else None
    kw = dict(kv_index=idx, key_padding_mask=kpm, dropout_p=p, seed=seed)
    ref = _run(lambda q, k, v: ops.cross_attention(q, k, v, backend="torch", **kw), (q, k, v), do)
    if config is None:
        fast = _run(lambda q, k, v: ops.cross_attention(q, k, v, backend="triton", **kw), (q, k, v), do)
    else:
        scale = 1.0 / math.sqrt(d)
        o, lse = kern.cross_attention_fwd(q, k, v, idx, kpm, seed, p, scale, config=config)
        fast = [o, *kern.cross_attention_bwd(do, q, k, v, o, lse, idx, kpm, seed, p, scale, config=config)]
    assert any(torch.isnan(r).any() for r in ref)
    assert torch.isfinite(ref[0]).any(), "the case must leave some outputs finite"
    _same_nonfinite(fast, ref)


def test_finite_inputs_unchanged_by_the_nan_rules():
    """The -inf bookkeeping must not move finite results: the kernels against the float64 reference on
    large-magnitude scores (rows with a max far below 0), fp32, multi-block."""
    q, k, v, kpm, do = _self_inputs()
    q = q * 30.0
    k[0, :, 0, :] -= 5.0
    fast, ref32 = _self_both(q, k, v, kpm, do, "causal", 0.0, MULTI)
    ref64 = _run(lambda q, k, v: ops.qformer_attention(q, k, v, num_query=5, mode="causal", key_padding_mask=kpm,
                                                       backend="torch"), (q.double(), k.double(), v.double()),
                 do.double())
    # A recomputing backward (FlashAttention's, these kernels') rebuilds P = exp(S - lse) from scores it computes
    # again: a rounding of S (|S| * eps, with |S| ~ 150 here) moves a dominant P by that much relatively, where
    # PyTorch's softmax of one S is insensitive to it. Whether the two S roundings coincide depends on the matmul
    # (the interpreter's numpy on an AVX2 CPU: they differ, 10-30 x PyTorch's error on dK and dV). That term,
    # 2 * eps * max|S| of the tensor's scale, is added to the floor; a wrong mask or lse errs by O(|ref|).
    smax = (torch.einsum("blhd,bmhd->blhm", q.double(), k.double()).abs().max() / math.sqrt(q.shape[-1])).item()
    for name, f, r, l in zip(("out", "dq", "dk", "dv"), fast, ref64, ref32):
        assert_within_torch_error(f, r, l, name=name, magnitude=r.abs().max().item() * (1.0 + smax / 16.0))
