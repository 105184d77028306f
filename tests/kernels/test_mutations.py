"""Mutation tests: the checks of every kernel test file reject a deliberately wrong kernel.

A check that cannot fail proves nothing. Each test below replaces an entry point that a kernel test file
calls (monkeypatch) with a wrong kernel - half a gradient, a causal row that sees one key too many, a
dropped padding mask, a wrong temperature gradient, K/V gradients of shared images not summed, ... - runs
the very check function of that test file, and requires AssertionError. Wrong kernels are built from the
real one where the bug can be expressed through its arguments or outputs (dropped mask, wrong index,
halved gradient) and from the reference otherwise (a mask the kernel cannot be told to use). Each mutant
is wrong by an amount that matters and that the old absolute floor or ``scale=10`` slack partly let
through. Kernels that only run on a GPU (CUDA epilogue, CUDA sampler) are mutated on the CPU path that
their test files run (the torch implementation of the fused contract, the C++ sampler's CPU build or
the reference it must equal), and with the real CUDA kernels under ``-m gpu``.

Every check is called with the arguments of a test in its own file, which passes on the real kernel (the
exceptions, fp16 ITC on the interpreter and bf16 ITC on a GPU, run the real kernel first), so a rejection
is the mutant's.
Small shapes throughout: the Triton kernels run under the interpreter on CPU.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import blipfast
from blipfast.ops import layernorm_epilogue as LE
from blipfast.ops._attention_ref import attention_fwd_ref
from blipfast.ops.hard_negatives import sample_hard_negatives_ref
from blipfast.ops.qformer_attention import allowed_mask
from tests.helpers import hard_negatives as HN
from tests.helpers import integration as MI
from tests.helpers import layernorm as LN
from tests.helpers import linear_ops as LO
from tests.helpers.mutants import LN_BWD_MUTANTS, LN_FWD_MUTANTS, SAMPLER_MUTANTS, Mutant, outputs
from tests.helpers.runtime import DEV, count_calls
from tests.helpers.tolerance import FLOOR, assert_within_torch_error

triton = pytest.importorskip("triton")
from blipfast.kernels import attention as AK  # noqa: E402  (after the triton check)
from blipfast.kernels import itc as IK  # noqa: E402
from tests.helpers import attention as AT  # noqa: E402
from tests.helpers import itc as IT  # noqa: E402

# the modules of the linear ops (blipfast.ops.<name> is the op itself)
CL, GM, LCE = (importlib.import_module(f"blipfast.ops.{m}")
               for m in ("concat_linear", "gelu_mlp", "linear_cross_entropy"))


def assert_rejected(check, *mutants):
    """``check()`` raises AssertionError, and it did run the mutant(s)."""
    with pytest.raises(AssertionError):
        check()
    assert all(m.calls > 0 for m in mutants), "the check did not reach the mutated kernel"


# ----------------------------------------------------------------------------------------------
# the tolerance rule itself (tests/helpers/tolerance.py)


@pytest.mark.parametrize("magnitude", [1.3e-2, 1e-7, 1.0, 1e5])
def test_rule_rejects_half_a_gradient_at_any_scale(magnitude):
    """Issue 7's example: bf16 ITC gradients of max |g| 1.3e-2, where the old absolute floor
    (8e-3 * (1 + max|g|) = 8.1e-3) let a kernel returning half the gradient (error 6.5e-3) pass."""
    g64 = torch.randn(128, 256, dtype=torch.float64)
    g64 *= magnitude / g64.abs().max()
    torch_bf16 = g64.to(torch.bfloat16)
    assert_within_torch_error(torch_bf16, g64, torch_bf16)  # PyTorch's own result passes
    assert_within_torch_error((g64 * (1 + FLOOR[torch.bfloat16] / 4)).to(torch.bfloat16), g64, torch_bf16)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_torch_error((g64 / 2).to(torch.bfloat16), g64, torch_bf16)
    with pytest.raises(AssertionError, match="exceeds"):  # 3% off: four rounding units of bf16
        assert_within_torch_error((g64 * 1.03).to(torch.bfloat16), g64, torch_bf16)


def test_rule_on_an_all_zero_reference():
    zero = torch.zeros(5, dtype=torch.float64)
    assert_within_torch_error(torch.zeros(5), zero, torch.zeros(5))
    with pytest.raises(AssertionError):
        assert_within_torch_error(torch.full((5,), 1e-30), zero, torch.zeros(5))


# ----------------------------------------------------------------------------------------------
# tests/kernels/test_attention.py: qformer_attention / cross_attention Triton kernels


def _shifted_causal_fwd(original, q, k, v, kpm, seed, nq, mode, p, scale, **kw):
    """The causal mask off by one: text row i also sees key i + 1 (computed exactly otherwise)."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    allowed = allowed_mask(nq, mode, lq, lk, q.device)
    i = torch.arange(lk - lq, lk, device=q.device).view(lq, 1)
    j = torch.arange(lk, device=q.device).view(1, lk)
    allowed = (allowed | ((i >= nq) & (j == i + 1))).expand(b, lq, lk)
    if kpm is not None:
        allowed = allowed & kpm.bool()[:, None, :]
    out, lse = attention_fwd_ref(q, k, v, allowed, dropout_p=p, scale=scale, seed=seed)
    return out.contiguous(), lse.float()


def _self(pattern="ragged", mode="causal", **kw):
    return lambda: AT._self_case(3, 13, 13, 2, 16, 5, mode, pattern, **kw)


def _cross(pattern="ragged", **kw):
    return lambda: AT._cross_case(7, 5, 6, 37, 2, 16, torch.tensor(AT.IDX, device=DEV), pattern, **kw)


def test_attention_half_dq_is_rejected(monkeypatch):
    m = Mutant(monkeypatch, AK, "qformer_attention_bwd", outputs(lambda dq, dk, dv: (dq / 2, dk, dv)))
    assert_rejected(_self(), m)


def test_attention_half_dv_in_bf16_is_rejected(monkeypatch):
    m = Mutant(monkeypatch, AK, "qformer_attention_bwd", outputs(lambda dq, dk, dv: (dq, dk, dv / 2)))
    assert_rejected(lambda: AT._self_case(2, 12, 12, 2, 16, 5, "causal", "ragged", dtype=torch.bfloat16,
                                          lowp="lowp"), m)


def test_attention_causal_off_by_one_is_rejected(monkeypatch):
    m = Mutant(monkeypatch, AK, "qformer_attention_fwd", _shifted_causal_fwd)
    assert_rejected(_self(pattern="none"), m)


def test_attention_causal_off_by_one_multiblock_is_rejected(monkeypatch):
    """The direct-kernel check (forced tiles, lse too) rejects the same bug."""
    m = Mutant(monkeypatch, AK, "qformer_attention_fwd", _shifted_causal_fwd)
    assert_rejected(lambda: AT._direct_self(2, 21, 40, 2, 16, 8, "causal", "ragged",
                                            AT._cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16)), m)


def test_attention_dropped_padding_mask_is_rejected(monkeypatch):
    m = Mutant(monkeypatch, AK, "qformer_attention_fwd",
               lambda f, q, k, v, kpm, *a, **kw: f(q, k, v, None, *a, **kw))
    assert_rejected(_self(mode="bidirectional"), m)


def test_attention_empty_row_not_zero_is_rejected(monkeypatch):
    """A row with no allowed key (all-padding sequence) must output 0; the mutant averages V instead."""
    def wrong(f, q, k, v, kpm, seed, nq, mode, *a, **kw):
        out, lse = f(q, k, v, kpm, seed, nq, mode, *a, **kw)
        empty = ~allowed_mask(nq, mode, q.shape[1], k.shape[1], q.device, kpm).any(-1)  # [B, Lq]
        return torch.where(empty[..., None, None], v.mean(1, keepdim=True), out), lse

    m = Mutant(monkeypatch, AK, "qformer_attention_fwd", wrong)
    assert_rejected(_self(pattern="allpad", mode="bidirectional"), m)


def test_attention_softmax_scale_one_percent_off_is_rejected(monkeypatch):
    m = Mutant(monkeypatch, AK, "qformer_attention_fwd",
               lambda f, *a, **kw: f(*a[:-1], a[-1] * 1.01, **kw))
    assert_rejected(_self(mode="unimodal"), m)


def test_attention_lse_in_base_two_is_rejected(monkeypatch):
    """The saved log-sum-exp in base 2 (a classic exp2 kernel slip): the lse check and every gradient."""
    m = Mutant(monkeypatch, AK, "qformer_attention_fwd", outputs(lambda out, lse: (out, lse / math.log(2))))
    assert_rejected(lambda: AT._direct_self(2, 21, 40, 2, 16, 8, "causal", "ragged",
                                            AT._cfg(16, 16, DQ_BLOCK_M=16, DQ_BLOCK_N=16)), m)


def test_attention_dropout_without_rescale_is_rejected(monkeypatch):
    """Dropout that forgets the 1 / (1 - p) rescale in the forward."""
    seed = torch.tensor([31337], dtype=torch.int64, device=DEV)

    def wrong(f, q, k, v, kpm, s, nq, mode, p, scale, **kw):
        out, lse = f(q, k, v, kpm, s, nq, mode, p, scale, **kw)
        return out * (1 - p), lse

    m = Mutant(monkeypatch, AK, "qformer_attention_fwd", wrong)
    assert_rejected(lambda: AT._self_case(2, 9, 14, 2, 16, 4, "causal", "ragged", dropout_p=0.2, seed=seed), m)


def test_attention_backward_mask_from_another_seed_is_rejected(monkeypatch):
    """Backward regenerating the dropout mask from a different Philox stream than the forward."""
    seed = torch.tensor([31337], dtype=torch.int64, device=DEV)
    m = Mutant(monkeypatch, AK, "qformer_attention_bwd",
               lambda f, do, q, k, v, o, lse, kpm, s, *a, **kw: f(do, q, k, v, o, lse, kpm, s + 1, *a, **kw))
    assert_rejected(lambda: AT._self_case(2, 9, 14, 2, 16, 4, "causal", "ragged", dropout_p=0.2, seed=seed), m)


def test_cross_attention_wrong_image_is_rejected(monkeypatch):
    """kv_index read one image off (row-set n attends to image kv_index[n] + 1)."""
    def shift(idx, m):
        return None if idx is None else (idx + 1) % m

    mf = Mutant(monkeypatch, AK, "cross_attention_fwd",
                lambda f, q, k, v, idx, *a, **kw: f(q, k, v, shift(idx, k.shape[0]), *a, **kw))
    assert_rejected(_cross(pattern="none"), mf)


def test_cross_attention_dropped_padding_mask_is_rejected(monkeypatch):
    mf = Mutant(monkeypatch, AK, "cross_attention_fwd",
                lambda f, q, k, v, idx, kpm, *a, **kw: f(q, k, v, idx, None, *a, **kw))
    assert_rejected(_cross(), mf)


def test_cross_attention_dkdv_not_summed_over_rowsets_is_rejected(monkeypatch):
    """Shared image K/V whose gradient keeps one row-set's contribution (an overwrite instead of a sum)."""
    def wrong(f, do, q, k, v, out, lse, idx, *a, **kw):
        dq, dk, dv = f(do, q, k, v, out, lse, idx, *a, **kw)
        first = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        first[[idx.tolist().index(i) for i in set(idx.tolist())]] = True
        do_first = do * first[:, None, None, None].to(do.dtype)
        _, dk1, dv1 = f(do_first, q, k, v, out, lse, idx, *a, **kw)
        return dq, dk1, dv1

    m = Mutant(monkeypatch, AK, "cross_attention_bwd", wrong)
    assert_rejected(_cross(pattern="none"), m)


def test_cross_attention_half_dk_with_forced_tiling_is_rejected(monkeypatch):
    m = Mutant(monkeypatch, AK, "cross_attention_bwd", outputs(lambda dq, dk, dv: (dq, dk / 2, dv)))
    cfg = AT._cfg(32, 16, DQ_BLOCK_M=32, DQ_BLOCK_N=32)
    assert_rejected(lambda: AT._cross_case(7, 5, 6, 37, 2, 16, torch.tensor(AT.IDX, device=DEV), "ragged",
                                           config=cfg), m)


# ----------------------------------------------------------------------------------------------
# tests/kernels/test_itc.py: the fused ITC loss


def _itc(ls=0.0, dtype=torch.float32):
    if ls:  # CASES of test_itc.py
        return lambda: IT._check_against_reference(3, 3, 2, 16, ls, True, dtype, DEV)
    return lambda: IT._check_against_reference(3, 4, 7, 40, ls, True, dtype, DEV)


@pytest.mark.parametrize("which", ["image_feats", "text_feats"])
def test_itc_half_feature_gradient_is_rejected(monkeypatch, which):
    half = (lambda di, dt, dtemp: (di / 2, dt, dtemp)) if which == "image_feats" else (
        lambda di, dt, dtemp: (di, dt / 2, dtemp))
    m = Mutant(monkeypatch, IK, "itc_loss_bwd", outputs(half))
    assert_rejected(_itc(), m)


def test_itc_half_gradient_in_fp16_is_rejected(monkeypatch):
    """Half precision on the interpreter (fp16: Triton's interpreter cannot run this kernel's bf16 dots; the
    bf16 case is test_gpu_itc_half_gradient_in_bf16_is_rejected): the real kernel passes, half of d
    image_feats fails."""
    _itc(dtype=torch.float16)()
    m = Mutant(monkeypatch, IK, "itc_loss_bwd", outputs(lambda di, dt, dtemp: (di / 2, dt, dtemp)))
    assert_rejected(_itc(dtype=torch.float16), m)


@pytest.mark.parametrize("factor", [2.0, -1.0, 1.05], ids=["double", "sign", "5pct"])
def test_itc_wrong_temperature_gradient_is_rejected(monkeypatch, factor):
    m = Mutant(monkeypatch, IK, "itc_loss_bwd", outputs(lambda di, dt, dtemp: (di, dt, dtemp * factor)))
    assert_rejected(_itc(), m)


def test_itc_positive_column_off_by_one_is_rejected(monkeypatch):
    """The own pair (rank * B + b) taken one column off, forward and backward."""
    roll = (lambda pos: pos.roll(1, dims=1))
    mf = Mutant(monkeypatch, IK, "itc_loss_fwd",
                lambda f, i, t, ia, ta, tp, pos, *a: f(i, t, ia, ta, tp, roll(pos), *a))
    mb = Mutant(monkeypatch, IK, "itc_loss_bwd",
                lambda f, g, i, t, ia, ta, tp, pos, *a: f(g, i, t, ia, ta, tp, roll(pos), *a))
    assert_rejected(_itc(), mf, mb)


def test_itc_label_smoothing_ignored_is_rejected(monkeypatch):
    mf = Mutant(monkeypatch, IK, "itc_loss_fwd", lambda f, *a: f(*a[:-1], 0.0))
    mb = Mutant(monkeypatch, IK, "itc_loss_bwd", lambda f, *a: f(*a[:-1], 0.0))
    assert_rejected(_itc(ls=0.3), mf, mb)


def test_itc_gradient_routed_to_the_wrong_query_is_rejected(monkeypatch):
    """d image_feats scattered to query (argmax + 1) % Q instead of the arg-max query."""
    def wrong(f, g, img, txt, ia, ta, tp, pos, s1, s2, a1, a2, *rest):
        q = img.shape[1]
        return f(g, img, txt, ia, ta, tp, pos, s1, s2, ((a1.long() + 1) % q).to(a1.dtype), a2, *rest)

    m = Mutant(monkeypatch, IK, "itc_loss_bwd", wrong)
    assert_rejected(_itc(), m)


def test_itc_public_op_check_rejects_half_gradient(monkeypatch):
    m = Mutant(monkeypatch, IK, "itc_loss_bwd", outputs(lambda di, dt, dtemp: (di, dt / 2, dtemp)))
    assert_rejected(lambda: IT.check_public_op(6, 4, 16, DEV), m)


# ----------------------------------------------------------------------------------------------
# tests/kernels/test_layernorm_epilogue.py: the post-LN epilogue (CUDA kernel; its test's CPU path is the torch
# implementation of the same fused contract, which the custom op's "torch" backend calls)


def _ln_check(dtype=torch.float32, p=0.2, shape=(2, 2, 2, 33)):
    """As test_nd_inputs_match_reference (dropout) and test_torch_backend_matches_reference (p = 0)."""
    inputs, dy = LN.make_inputs(shape, dtype)
    return lambda: LN.check_against_reference(inputs, dy, dtype, "torch", p, torch.tensor([99]) if p else None)




@pytest.mark.parametrize("name", list(LN_FWD_MUTANTS))
def test_epilogue_forward_mutants_are_rejected(monkeypatch, name):
    m = Mutant(monkeypatch, LE, "_fwd_torch", LN_FWD_MUTANTS[name])
    assert_rejected(_ln_check(), m)


@pytest.mark.parametrize("name", list(LN_BWD_MUTANTS))
def test_epilogue_backward_mutants_are_rejected(monkeypatch, name):
    m = Mutant(monkeypatch, LE, "_bwd_torch", LN_BWD_MUTANTS[name])
    assert_rejected(_ln_check(), m)


def test_epilogue_half_dweight_in_bf16_is_rejected(monkeypatch):
    m = Mutant(monkeypatch, LE, "_bwd_torch", LN_BWD_MUTANTS["half_dweight"])
    assert_rejected(_ln_check(dtype=torch.bfloat16, p=0.0, shape=(3, 768)), m)


@pytest.mark.parametrize("name", list(LN_FWD_MUTANTS) + list(LN_BWD_MUTANTS))
def test_epilogue_raw_op_check_rejects_mutants(monkeypatch, name):
    """check_raw_op (what the CUDA test runs on the kernel) rejects the same bugs in a stand-in kernel."""
    fwd, bwd = LE._fwd_torch, LE._bwd_torch
    if name in LN_FWD_MUTANTS:
        fwd = (lambda *a, _w=LN_FWD_MUTANTS[name]: _w(LE._fwd_torch, *a))
    else:
        bwd = (lambda *a, _w=LN_BWD_MUTANTS[name]: _w(LE._bwd_torch, *a))
    with pytest.raises(AssertionError):
        LN.check_raw_op(fwd, bwd, torch.float32, 130, "cpu")


# ----------------------------------------------------------------------------------------------
# tests/kernels/test_hard_negatives.py: the sampler (CUDA kernel; on CPU its C++ build when compiled,
# else the reference it must equal index for index)


def _sampler():
    op = HN._cpp_op()
    return op if op is not None else sample_hard_negatives_ref


def _chi(sampler):
    return lambda: HN._chi_square_check(lambda s1, s2, d, seed: sampler(s1, s2, d, seed, 0), "cpu")




@pytest.mark.parametrize("name,check", [(n, c) for n, (_, cs) in SAMPLER_MUTANTS.items() for c in cs])
def test_sampler_mutants_are_rejected(name, check):
    base = _sampler()
    calls = []

    def mutant(*a):
        calls.append(1)
        return SAMPLER_MUTANTS[name][0](base, *a)

    with pytest.raises(AssertionError):
        if check == "chi":
            _chi(mutant)()
        elif check == "rules":
            HN.check_draw_rules(mutant, "cpu")
        else:
            HN.check_matches_reference(mutant, "cpu")
    assert calls


def test_sampler_checks_accept_the_kernel():
    """The same checks pass on the unmutated sampler (the mutants above fail for their bug, not the check)."""
    op = _sampler()
    _chi(op)()
    HN.check_draw_rules(op, "cpu")
    HN.check_matches_reference(op, "cpu")


# ----------------------------------------------------------------------------------------------
# tests/models/test_integration.py: the model-level paths


def test_itm_index_path_wrong_image_is_rejected(monkeypatch):
    """cross_attention over shared image K/V reading the image of the next row-set."""
    def wrong(f, q, k, v, *, kv_index=None, **kw):
        return f(q, k, v, kv_index=None if kv_index is None else kv_index.roll(1), **kw)

    m = Mutant(monkeypatch, blipfast.ops, "cross_attention", wrong)
    assert_rejected(lambda: MI.check_itm_index_path(4, None), m)


def test_itm_index_path_kv_gradient_not_summed_is_rejected(monkeypatch):
    """Shared image K/V that get the gradient of only the first row-set using them."""
    def wrong(f, q, k, v, *, kv_index=None, key_padding_mask=None, **kw):
        if kv_index is None:
            return f(q, k, v, key_padding_mask=key_padding_mask, **kw)
        first = torch.zeros(kv_index.shape[0], dtype=torch.bool)
        first[[kv_index.tolist().index(i) for i in set(kv_index.tolist())]] = True
        sel = first[:, None, None, None]
        ke, ve = k[kv_index], v[kv_index]
        ke, ve = torch.where(sel, ke, ke.detach()), torch.where(sel, ve, ve.detach())
        kpm = None if key_padding_mask is None else key_padding_mask[kv_index]
        return f(q, ke, ve, key_padding_mask=kpm, **kw)

    m = Mutant(monkeypatch, blipfast.ops, "cross_attention", wrong)
    assert_rejected(lambda: MI.check_itm_index_path(4, None), m)


@pytest.mark.parametrize("mode_case,kernel", [("text-only", "padding"), ("queries+text", "half_dv_cross")])
def test_qformer_on_triton_mutants_are_rejected(monkeypatch, mode_case, kernel):
    if kernel == "padding":
        m = Mutant(monkeypatch, AK, "qformer_attention_fwd",
                   lambda f, q, k, v, kpm, *a, **kw: f(q, k, v, None, *a, **kw))
    else:
        m = Mutant(monkeypatch, AK, "cross_attention_bwd", outputs(lambda dq, dk, dv: (dq, dk, dv / 2)))
    calls = count_calls(monkeypatch, AK, "qformer_attention_fwd", "cross_attention_fwd")
    assert_rejected(lambda: MI.check_qformer_on_triton(monkeypatch, mode_case, DEV, calls), m)


# ----------------------------------------------------------------------------------------------
# tests/ops/test_linear_cross_entropy.py, test_gelu_mlp.py, test_concat_linear.py: the implementations that the
# custom ops run (_fwd_torch / _bwd_torch), replaced by wrong ones; each check passes on the real ones there


def _lce_fwd_tail_chunk_dropped(f, x, w, b, t, ls, chunk):
    t = t.clone()
    t[t.shape[0] - t.shape[0] % chunk:] = -100  # the loop stops before the short last chunk
    return f(x, w, b, t, ls, chunk)


def _lce_fwd_mean_over_all_rows(f, x, w, b, t, ls, chunk):
    loss, lse, count = f(x, w, b, t, ls, chunk)
    return loss * count / t.shape[0], lse, count


LCE_MUTANTS = {  # name: (module attribute, wrong implementation)
    "label smoothing dropped": ("_fwd_torch", lambda f, x, w, b, t, ls, chunk: f(x, w, b, t, 0.0, chunk)),
    "label smoothing dropped in the backward": ("_bwd_torch", lambda f, g, x, w, b, t, lse, n, ls, *a:
                                                f(g, x, w, b, t, lse, n, 0.0, *a)),
    "tail chunk dropped": ("_fwd_torch", _lce_fwd_tail_chunk_dropped),
    "mean over all rows": ("_fwd_torch", _lce_fwd_mean_over_all_rows),
    "backward reads the next chunk's lse": ("_bwd_torch", lambda f, g, x, w, b, t, lse, n, ls, chunk, *a:
                                            f(g, x, w, b, t, lse.roll(-chunk), n, ls, chunk, *a)),
    "ignored rows get a gradient": ("_bwd_torch", lambda f, g, x, w, b, t, *a: f(g, x, w, b, t.clamp_min(0), *a)),
    "bias gradient dropped": ("_bwd_torch", outputs(lambda gx, gw, gb: (gx, gw, torch.zeros_like(gb)))),
}


@pytest.mark.parametrize("name", list(LCE_MUTANTS))
def test_linear_cross_entropy_mutants_are_rejected(monkeypatch, name):
    attr, wrong = LCE_MUTANTS[name]
    m = Mutant(monkeypatch, LCE, attr, wrong)
    assert_rejected(lambda: LO.linear_cross_entropy_check(torch.float32, n=37, chunk=8, label_smoothing=0.1), m)


def _other_gelu(a):
    return "tanh" if a == "none" else "none"


GELU_MUTANTS = {
    "other GELU in the backward": ("_bwd_torch", lambda f, gy, x, u, w1, w2, a, *r:
                                   f(gy, x, u, w1, w2, _other_gelu(a), *r)),
    "other GELU in the forward": ("_fwd_torch", lambda f, x, w1, b1, w2, a: f(x, w1, b1, w2, _other_gelu(a))),
    "d w2 from the pre-activation": ("_bwd_torch", lambda f, gy, x, u, *r: (*f(gy, x, u, *r)[:3], gy.t() @ u)),
    "bias gradient dropped": ("_bwd_torch", outputs(lambda gx, gw1, gb1, gw2: (gx, gw1, torch.zeros_like(gb1), gw2))),
}


@pytest.mark.parametrize("name", list(GELU_MUTANTS))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_mlp_mutants_are_rejected(monkeypatch, name, approximate):
    attr, wrong = GELU_MUTANTS[name]
    m = Mutant(monkeypatch, GM, attr, wrong)
    assert_rejected(lambda: LO.gelu_mlp_check(torch.float32, approximate=approximate), m)


def _blocks_reversed(gw, rows):
    return torch.cat(gw.split(rows)[::-1])


CONCAT_MUTANTS = {
    "weight gradient not split per weight": ("_bwd_torch", lambda f, gy, x, ws, *r: (
        lambda gx, gw, gb: (gx, _blocks_reversed(gw, [w.shape[0] for w in ws]), gb))(*f(gy, x, ws, *r))),
    "d x from the weights in another order": ("_bwd_torch", lambda f, gy, x, ws, *r: (
        lambda gx, gw, gb: (f(gy, x, ws[::-1], *r)[0], gw, gb))(*f(gy, x, ws, *r))),
    "bias gradient dropped": ("_bwd_torch", outputs(lambda gx, gw, gb: (gx, gw, torch.zeros_like(gb)))),
    "bias gradient one row off": ("_bwd_torch", outputs(lambda gx, gw, gb: (gx, gw, gb.roll(1)))),
    "biases in another order": ("_fwd_torch", lambda f, x, ws, bs: f(x, ws, bs[::-1])),
}


@pytest.mark.parametrize("name", list(CONCAT_MUTANTS))
def test_concat_linear_mutants_are_rejected(monkeypatch, name):
    attr, wrong = CONCAT_MUTANTS[name]
    m = Mutant(monkeypatch, CL, attr, wrong)
    assert_rejected(lambda: LO.concat_linear_check(torch.float32, rows=(5, 12, 7)), m)


# ----------------------------------------------------------------------------------------------
# GPU: the real kernels, mutated


@pytest.mark.gpu
def test_gpu_itc_half_gradient_in_bf16_is_rejected(monkeypatch):
    """Issue 7's case: bf16 at the GPU test shape, where the old floor let half of d image_feats pass."""
    check = (lambda: IT._check_against_reference(128, 8, 32, 256, 0.1, False, torch.bfloat16, "cuda"))
    check()
    m = Mutant(monkeypatch, IK, "itc_loss_bwd", outputs(lambda di, dt, dtemp: (di / 2, dt, dtemp)))
    assert_rejected(check, m)


@pytest.mark.gpu
def test_gpu_epilogue_raw_check_rejects_mutated_cuda_kernel():
    fwd, bwd = torch.ops.blipfast_C.ln_epilogue_fwd, torch.ops.blipfast_C.ln_epilogue_bwd
    LN.check_raw_op(fwd, bwd, torch.bfloat16, 768, "cuda")  # the unmutated kernel passes
    for wrong in LN_BWD_MUTANTS.values():
        with pytest.raises(AssertionError):
            LN.check_raw_op(fwd, lambda *a, _w=wrong: _w(bwd, *a), torch.bfloat16, 768, "cuda")
    for wrong in LN_FWD_MUTANTS.values():
        with pytest.raises(AssertionError):
            LN.check_raw_op(lambda *a, _w=wrong: _w(fwd, *a), bwd, torch.float32, 768, "cuda")


@pytest.mark.gpu
def test_gpu_sampler_index_check_rejects_mutated_cuda_kernel():
    op = HN._cuda_op()
    for name, (wrong, checks) in SAMPLER_MUTANTS.items():
        if "exact" in checks:
            with pytest.raises(AssertionError):
                HN.check_matches_reference(lambda *a, _w=wrong: _w(op, *a), "cuda", (torch.float32,))
