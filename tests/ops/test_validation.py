"""Every public op of blipfast.ops rejects bad input with ValueError/TypeError whose message names the
offending argument (docs/design.md#the-op-contract: "Validation happens once, in Python")."""
from __future__ import annotations

import pytest
import torch

from blipfast.ops import (bias_dropout_add_layernorm, cross_attention, itc_loss, qformer_attention,
                          sample_hard_negatives)
import blipfast.ops as O
from blipfast.ops import _common as C


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def noncontig(*shape):
    """A tensor of ``shape`` whose last dimension has stride != 1."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)


# ----------------------------------------------------------------------------------------------
# qformer_attention: q [2, 5, 2, 8], k/v [2, 6, 2, 8]


def qa(**over):
    args = dict(q=r(2, 5, 2, 8), k=r(2, 6, 2, 8), v=r(2, 6, 2, 8), num_query=2, mode="causal")
    args.update(over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return lambda: qformer_attention(q, k, v, **args)


QA_CASES = [
    ("q-type", qa(q=[[1.0]]), TypeError, r"\bq must be a torch.Tensor"),
    ("q-ndim", qa(q=r(2, 5, 16)), ValueError, r"\bq must have 4 dimensions"),
    ("q-int", qa(q=torch.ones(2, 5, 2, 8, dtype=torch.int64)), TypeError, r"\bq must have dtype"),
    ("k-int", qa(k=torch.ones(2, 6, 2, 8, dtype=torch.int32)), TypeError, r"\bk must have dtype"),
    ("k-ndim", qa(k=r(2, 6, 16)), ValueError, r"\bk must have 4 dimensions"),
    ("v-type", qa(v=None), TypeError, r"\bv must be a torch.Tensor"),
    ("mixed-dtype", qa(k=r(2, 6, 2, 8, dtype=torch.float64)), TypeError, r"k=float64"),
    ("mixed-dtype-v", qa(v=r(2, 6, 2, 8, dtype=torch.float16)), TypeError, r"v=float16"),
    ("fp64-triton", qa(q=r(2, 5, 2, 8, dtype=torch.float64), k=r(2, 6, 2, 8, dtype=torch.float64),
                       v=r(2, 6, 2, 8, dtype=torch.float64), backend="triton"), ValueError, r"backend 'triton' takes"),
    ("k-batch", qa(k=r(3, 6, 2, 8)), ValueError, r"\bk must have shape"),
    ("k-heads", qa(k=r(2, 6, 3, 8)), ValueError, r"\bk must have shape"),
    ("k-dim", qa(k=r(2, 6, 2, 4)), ValueError, r"\bk must have shape"),
    ("v-len", qa(v=r(2, 7, 2, 8)), ValueError, r"\bv must have shape"),
    ("v-dim", qa(v=r(2, 6, 2, 4)), ValueError, r"\bv must have shape"),
    ("lq>lk", qa(q=r(2, 7, 2, 8)), ValueError, r"Lq=7.*Lk=6"),
    ("q-headdim-0", qa(q=r(2, 5, 2, 0), k=r(2, 6, 2, 0), v=r(2, 6, 2, 0)), ValueError, r"\bq must have a non-empty head"),
    ("k-device", qa(k=r(2, 6, 2, 8, device="meta")), ValueError, r"\bk is on meta"),
    ("nq-float", qa(num_query=2.0), TypeError, r"num_query must be an int"),
    ("nq-bool", qa(num_query=True), TypeError, r"num_query must be an int"),
    ("nq-none", qa(num_query=None), TypeError, r"num_query must be an int"),
    ("nq-neg", qa(num_query=-1), ValueError, r"num_query must be in \[0, Lk=6\]"),
    ("nq-big", qa(num_query=7), ValueError, r"num_query must be in \[0, Lk=6\]"),
    ("mode", qa(mode="full"), ValueError, r"mode must be one of"),
    ("mode-none", qa(mode=None), ValueError, r"mode must be one of"),
    ("p-one", qa(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("p-neg", qa(dropout_p=-0.1), ValueError, r"dropout_p must be in"),
    ("p-str", qa(dropout_p="0.1"), TypeError, r"dropout_p must be a float"),
    ("p-bool", qa(dropout_p=True), TypeError, r"dropout_p must be a float"),
    ("q-noncontig", qa(q=noncontig(2, 5, 2, 8)), ValueError, r"\bq must be contiguous in its last dimension"),
    ("k-noncontig", qa(k=noncontig(2, 6, 2, 8)), ValueError, r"\bk must be contiguous in its last dimension"),
    ("v-noncontig", qa(v=noncontig(2, 6, 2, 8)), ValueError, r"\bv must be contiguous in its last dimension"),
    ("kpm-shape", qa(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    ("kpm-ndim", qa(key_padding_mask=torch.ones(2, 1, 6, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    ("kpm-dtype", qa(key_padding_mask=torch.ones(2, 6, dtype=torch.complex64)), TypeError, r"key_padding_mask must be bool"),
    ("kpm-type", qa(key_padding_mask=[[1] * 6] * 2), TypeError, r"key_padding_mask must be a torch.Tensor"),
    ("kpm-device", qa(key_padding_mask=torch.ones(2, 6, dtype=torch.bool, device="meta")), ValueError,
     r"key_padding_mask is on meta"),
    ("scale-neg", qa(scale=-1.0), ValueError, r"scale must be a finite positive float"),
    ("scale-nan", qa(scale=float("nan")), ValueError, r"scale must be a finite positive float"),
    ("scale-str", qa(scale="1"), TypeError, r"scale must be a float"),
    ("seed-int32", qa(dropout_p=0.1, seed=torch.tensor([1], dtype=torch.int32)), TypeError, r"seed must have dtype"),
    ("seed-shape", qa(dropout_p=0.1, seed=torch.tensor([1, 2])), ValueError, r"seed must have exactly one element"),
    ("seed-float", qa(dropout_p=0.1, seed=1.5), TypeError, r"seed must be a torch.Tensor"),
    ("seed-huge", qa(dropout_p=0.1, seed=2**64), ValueError, r"seed must fit in int64"),
    ("seed-device", qa(seed=torch.tensor([1], device="meta")), ValueError, r"seed is on meta"),
    ("backend-unknown", qa(backend="cpu"), ValueError, r"backend must be one of"),
    ("backend-type", qa(backend=1), ValueError, r"backend must be one of"),
    ("backend-unsupported", qa(backend="cuda"), ValueError, r"backend 'cuda' is not implemented for this op"),
]


# ----------------------------------------------------------------------------------------------
# cross_attention: q [3, 4, 2, 8], k/v [2, 6, 2, 8], kv_index [3]


def ca(**over):
    args = dict(q=r(3, 4, 2, 8), k=r(2, 6, 2, 8), v=r(2, 6, 2, 8), kv_index=torch.tensor([0, 1, 1]))
    args.update(over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return lambda: cross_attention(q, k, v, **args)


CA_CASES = [
    ("q-type", ca(q=1.0), TypeError, r"\bq must be a torch.Tensor"),
    ("q-ndim", ca(q=r(3, 4, 16)), ValueError, r"\bq must have 4 dimensions"),
    ("q-int", ca(q=torch.ones(3, 4, 2, 8, dtype=torch.int64)), TypeError, r"\bq must have dtype"),
    ("v-ndim", ca(v=r(2, 6, 16)), ValueError, r"\bv must have 4 dimensions"),
    ("mixed-dtype", ca(v=r(2, 6, 2, 8, dtype=torch.bfloat16)), TypeError, r"v=bfloat16"),
    ("fp64-triton", ca(q=r(3, 4, 2, 8, dtype=torch.float64), k=r(2, 6, 2, 8, dtype=torch.float64),
                       v=r(2, 6, 2, 8, dtype=torch.float64), backend="triton"), ValueError, r"backend 'triton' takes"),
    ("k-heads", ca(k=r(2, 6, 3, 8)), ValueError, r"\bk must have shape"),
    ("q-headdim-0", ca(q=r(3, 4, 2, 0), k=r(2, 6, 2, 0), v=r(2, 6, 2, 0)), ValueError, r"\bq must have a non-empty head"),
    ("k-dim", ca(k=r(2, 6, 2, 4)), ValueError, r"\bk must have shape"),
    ("v-images", ca(v=r(3, 6, 2, 8)), ValueError, r"\bv must have shape"),
    ("v-len", ca(v=r(2, 5, 2, 8)), ValueError, r"\bv must have shape"),
    ("k-noncontig", ca(k=noncontig(2, 6, 2, 8)), ValueError, r"\bk must be contiguous in its last dimension"),
    ("q-noncontig", ca(q=noncontig(3, 4, 2, 8)), ValueError, r"\bq must be contiguous in its last dimension"),
    ("default-index-n!=m", ca(kv_index=None), ValueError, r"without kv_index.*N=3, M=2"),
    ("kv-dtype", ca(kv_index=torch.tensor([0.0, 1.0, 1.0])), TypeError, r"kv_index must have dtype"),
    ("kv-bool", ca(kv_index=torch.tensor([True, False, True])), TypeError, r"kv_index must have dtype"),
    ("kv-shape", ca(kv_index=torch.tensor([0, 1])), ValueError, r"kv_index must have shape \[3\]"),
    ("kv-ndim", ca(kv_index=torch.tensor([[0, 1, 1]])), ValueError, r"kv_index must have shape"),
    ("kv-type", ca(kv_index=[0, 1, 1]), TypeError, r"kv_index must be a torch.Tensor"),
    ("kv-device", ca(kv_index=torch.tensor([0, 1, 1], device="meta")), ValueError, r"kv_index is on meta"),
    ("kpm-rowsets", ca(key_padding_mask=torch.ones(3, 6, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[2, 6\]"),
    ("kpm-dtype", ca(key_padding_mask=torch.ones(2, 6, dtype=torch.complex64)), TypeError, r"key_padding_mask must be bool"),
    ("p", ca(dropout_p=1.5), ValueError, r"dropout_p"),
    ("scale", ca(scale=0), ValueError, r"scale"),
    ("seed", ca(dropout_p=0.1, seed=torch.ones(1, 1, 2, dtype=torch.int64)), ValueError, r"seed must have exactly one"),
    ("seed-dtype", ca(dropout_p=0.1, seed=torch.ones(1)), TypeError, r"seed must have dtype"),
    ("backend-unknown", ca(backend="gpu"), ValueError, r"backend must be one of"),
    ("backend-unsupported", ca(backend="cuda"), ValueError, r"backend 'cuda' is not implemented for this op"),
]


# ----------------------------------------------------------------------------------------------
# itc_loss: image_feats [3, 4, 8], text_feats [3, 8], temp 0-d


def itc(**over):
    args = dict(image_feats=r(3, 4, 8), text_feats=r(3, 8), temp=torch.tensor(0.07))
    args.update(over)
    a, b, c = args.pop("image_feats"), args.pop("text_feats"), args.pop("temp")
    return lambda: itc_loss(a, b, c, **args)


ITC_CASES = [
    ("img-type", itc(image_feats=None), TypeError, r"image_feats must be a torch.Tensor"),
    ("img-ndim", itc(image_feats=r(3, 8)), ValueError, r"image_feats must have 3 dimensions"),
    ("img-int", itc(image_feats=torch.ones(3, 4, 8, dtype=torch.int64)), TypeError, r"image_feats must have dtype"),
    ("img-empty", itc(image_feats=r(0, 4, 8), text_feats=r(0, 8)), ValueError, r"image_feats must be non-empty"),
    ("txt-ndim", itc(text_feats=r(3, 1, 8)), ValueError, r"text_feats must have 2 dimensions"),
    ("txt-batch", itc(text_feats=r(2, 8)), ValueError, r"text_feats must have shape \[3, 8\]"),
    ("txt-dim", itc(text_feats=r(3, 7)), ValueError, r"text_feats must have shape \[3, 8\]"),
    ("txt-device", itc(text_feats=r(3, 8, device="meta")), ValueError, r"text_feats is on meta"),
    ("mixed-dtype", itc(text_feats=r(3, 8, dtype=torch.float16)), TypeError, r"text_feats=float16"),
    ("fp64-triton", itc(image_feats=r(3, 4, 8, dtype=torch.float64), text_feats=r(3, 8, dtype=torch.float64),
                        backend="triton"), ValueError, r"backend 'triton' takes"),
    ("temp-float", itc(temp=0.07), TypeError, r"temp must be a torch.Tensor"),
    ("temp-shape", itc(temp=torch.tensor([0.07, 0.07])), ValueError, r"temp must be a 0-d tensor"),
    ("temp-2d", itc(temp=torch.tensor([[0.07]])), ValueError, r"temp must be a 0-d tensor"),
    ("temp-int", itc(temp=torch.tensor(1)), TypeError, r"temp must have dtype"),
    ("ls-str", itc(label_smoothing="0.1"), TypeError, r"label_smoothing must be a float"),
    ("ls-bool", itc(label_smoothing=False), TypeError, r"label_smoothing must be a float"),
    ("ls-big", itc(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    ("ls-neg", itc(label_smoothing=-0.1), ValueError, r"label_smoothing must be in"),
    ("ls-nan", itc(label_smoothing=float("nan")), ValueError, r"label_smoothing must be in"),
    ("ids-shape", itc(image_ids=torch.tensor([0, 1])), ValueError, r"image_ids must have shape \[3\]"),
    ("ids-dtype", itc(image_ids=torch.tensor([0.0, 1.0, 2.0])), TypeError, r"image_ids must have dtype"),
    ("ids-type", itc(image_ids=[0, 1, 2]), TypeError, r"image_ids must be a torch.Tensor"),
    ("backend-unknown", itc(backend="fast"), ValueError, r"backend must be one of"),
    ("backend-unsupported", itc(backend="cuda"), ValueError, r"backend 'cuda' is not implemented for this op"),
]


# ----------------------------------------------------------------------------------------------
# sample_hard_negatives: s_i2t, s_t2i [4, 4]


def shn(**over):
    args = dict(s_i2t=r(4, 4), s_t2i=r(4, 4))
    args.update(over)
    a, b = args.pop("s_i2t"), args.pop("s_t2i")
    return lambda: sample_hard_negatives(a, b, **args)


SHN_CASES = [
    ("s_i2t-type", shn(s_i2t=None), TypeError, r"s_i2t must be a torch.Tensor"),
    ("s_i2t-ndim", shn(s_i2t=r(16)), ValueError, r"s_i2t must have 2 dimensions"),
    ("s_i2t-int", shn(s_i2t=torch.ones(4, 4, dtype=torch.int64)), TypeError, r"s_i2t must have dtype"),
    ("s_i2t-empty", shn(s_i2t=r(0, 0), s_t2i=r(0, 0)), ValueError, r"s_i2t must have at least one row"),
    ("s_t2i-ndim", shn(s_t2i=r(4, 4, 1)), ValueError, r"s_t2i must have 2 dimensions"),
    ("s_t2i-shape", shn(s_t2i=r(4, 3)), ValueError, r"s_t2i must have shape \[4, 4\]"),
    ("s_t2i-device", shn(s_t2i=r(4, 4, device="meta")), ValueError, r"s_t2i is on meta"),
    ("s_t2i-dtype", shn(s_t2i=r(4, 4, dtype=torch.float64)), TypeError, r"s_t2i=float64"),
    ("not-BxBW", shn(s_i2t=r(4, 5), s_t2i=r(4, 5)), ValueError, r"s_i2t must be \[B, B \* world_size\]"),
    ("ids-shape", shn(image_ids=torch.arange(3)), ValueError, r"image_ids must have shape \[4\]"),
    ("ids-dtype", shn(image_ids=torch.arange(4.0)), TypeError, r"image_ids must have dtype"),
    ("generator-type", shn(generator=123), TypeError, r"generator must be a torch.Generator"),
    ("seed-dtype", shn(seed=torch.tensor([1.0])), TypeError, r"seed must have dtype"),
    ("seed-shape", shn(seed=torch.tensor([[1, 2]])), ValueError, r"seed must have exactly one element"),
    ("seed-bool", shn(seed=True), TypeError, r"seed must be a torch.Tensor"),
    ("fp64-cuda", shn(s_i2t=r(4, 4, dtype=torch.float64), s_t2i=r(4, 4, dtype=torch.float64), backend="cuda"),
     ValueError, r"backend 'cuda' takes"),
    ("backend-unknown", shn(backend="numpy"), ValueError, r"backend must be one of"),
    ("backend-unsupported", shn(backend="triton"), ValueError, r"backend 'triton' is not implemented for this op"),
    ("backend-cuda-on-cpu", shn(backend="cuda"), ValueError, r"backend 'cuda' cannot run on a cpu tensor"),
]


# ----------------------------------------------------------------------------------------------
# bias_dropout_add_layernorm: x, residual [2, 3, 8]; weight, ln_bias, bias [8]


def ln(**over):
    args = dict(x=r(2, 3, 8), bias=r(8), residual=r(2, 3, 8), weight=r(8), ln_bias=r(8))
    args.update(over)
    pos = [args.pop(n) for n in ("x", "bias", "residual", "weight", "ln_bias")]
    return lambda: bias_dropout_add_layernorm(*pos, **args)


LN_CASES = [
    ("x-type", ln(x=3.0), TypeError, r"\bx must be a torch.Tensor"),
    ("x-int", ln(x=torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, r"\bx must have dtype"),
    ("x-0d", ln(x=torch.tensor(1.0), residual=torch.tensor(1.0)), ValueError, r"\bx must have a non-empty last dimension"),
    ("x-empty-last", ln(x=r(2, 0), residual=r(2, 0)), ValueError, r"\bx must have a non-empty last dimension"),
    ("residual-shape", ln(residual=r(2, 4, 8)), ValueError, r"residual must have the shape of x"),
    ("residual-int", ln(residual=torch.ones(2, 3, 8, dtype=torch.int32)), TypeError, r"residual must have dtype"),
    ("residual-device", ln(residual=r(2, 3, 8, device="meta")), ValueError, r"residual is on meta"),
    ("weight-shape", ln(weight=r(7)), ValueError, r"weight must have shape \[8\]"),
    ("weight-type", ln(weight=None), TypeError, r"weight must be a torch.Tensor"),
    ("ln_bias-shape", ln(ln_bias=r(1, 8)), ValueError, r"ln_bias must have shape \[8\]"),
    ("ln_bias-int", ln(ln_bias=torch.ones(8, dtype=torch.int64)), TypeError, r"ln_bias must have dtype"),
    ("bias-shape", ln(bias=r(9)), ValueError, r"\bbias must have shape \[8\]"),
    ("eps-zero", ln(eps=0.0), ValueError, r"eps must be a finite positive float"),
    ("eps-none", ln(eps=None), TypeError, r"eps must be a float"),
    ("p", ln(dropout_p=1.0), ValueError, r"dropout_p must be in"),
    ("seed-dtype", ln(dropout_p=0.1, seed=torch.tensor([1], dtype=torch.int32)), TypeError, r"seed must have dtype"),
    ("seed-huge", ln(dropout_p=0.1, seed=-(2**63) - 1), ValueError, r"seed must fit in int64"),
    ("fp64-cuda", ln(x=r(2, 3, 8, dtype=torch.float64), residual=r(2, 3, 8, dtype=torch.float64), backend="cuda"),
     ValueError, r"backend 'cuda' takes"),
    ("backend-unknown", ln(backend="apex"), ValueError, r"backend must be one of"),
    ("backend-unsupported", ln(backend="triton"), ValueError, r"backend 'triton' is not implemented for this op"),
    ("backend-cuda-on-cpu", ln(backend="cuda"), ValueError, r"backend 'cuda' cannot run on a cpu tensor"),
]

# ----------------------------------------------------------------------------------------------
# the *_from_gathered variants (features/logits already gathered; rank says which rows are local)


def itc_g(**over):
    args = dict(image_feats=r(2, 4, 8), text_feats=r(2, 8), image_feats_all=r(6, 4, 8), text_feats_all=r(6, 8),
                temp=torch.tensor(0.07), rank=1)
    args.update(over)
    pos = [args.pop(n) for n in ("image_feats", "text_feats", "image_feats_all", "text_feats_all", "temp")]
    return lambda: O.itc_loss_from_gathered(*pos, **args)


def shn_g(**over):
    args = dict(s_i2t=r(2, 6), s_t2i=r(2, 6), rank=2)
    args.update(over)
    a, b = args.pop("s_i2t"), args.pop("s_t2i")
    return lambda: O.sample_hard_negatives_from_gathered(a, b, **args)


GATHERED_CASES = [
    ("itc-img-ndim", itc_g(image_feats=r(2, 8)), ValueError, r"image_feats must have 3 dimensions"),
    ("itc-all-shape", itc_g(image_feats_all=r(6, 3, 8)), ValueError, r"image_feats_all must have shape"),
    ("itc-txt-all-shape", itc_g(text_feats_all=r(5, 8)), ValueError, r"text_feats_all must have shape"),
    ("itc-all-dtype", itc_g(text_feats_all=r(6, 8, dtype=torch.float64)), TypeError, r"text_feats_all=float64"),
    ("itc-rank-range", itc_g(rank=3), ValueError, r"rank must be an int"),
    ("itc-rank-type", itc_g(rank=1.0), ValueError, r"rank must be an int"),
    ("itc-ids-alone", itc_g(image_ids=torch.arange(2)), ValueError, r"image_ids and image_ids_all together"),
    ("itc-ids-all-shape", itc_g(image_ids=torch.arange(2), image_ids_all=torch.arange(5)), ValueError,
     r"image_ids_all must have shape \[6\]"),
    ("itc-temp", itc_g(temp=torch.ones(2)), ValueError, r"temp must be a 0-d tensor"),
    ("shn-rank-range", shn_g(rank=3), ValueError, r"rank must be an int"),
    ("shn-rank-neg", shn_g(rank=-1), ValueError, r"rank must be an int"),
    ("shn-shape", shn_g(s_t2i=r(2, 5)), ValueError, r"s_t2i must have shape \[2, 6\]"),
    ("shn-empty", shn_g(s_i2t=r(0, 6), s_t2i=r(0, 6)), ValueError, r"s_i2t must have at least one row"),
    ("shn-ids-alone", shn_g(image_ids_all=torch.arange(6)), ValueError, r"image_ids and image_ids_all together"),
    ("shn-ids-all-dtype", shn_g(image_ids=torch.arange(2), image_ids_all=torch.arange(6.0)), TypeError,
     r"image_ids_all must have dtype"),
    ("shn-generator", shn_g(generator="g"), TypeError, r"generator must be a torch.Generator"),
    ("shn-backend", shn_g(backend="triton"), ValueError, r"backend 'triton' is not implemented for this op"),
]

ALL = ([("qformer_attention-" + c[0],) + c[1:] for c in QA_CASES]
       + [("cross_attention-" + c[0],) + c[1:] for c in CA_CASES]
       + [("itc_loss-" + c[0],) + c[1:] for c in ITC_CASES]
       + [("sample_hard_negatives-" + c[0],) + c[1:] for c in SHN_CASES]
       + [("bias_dropout_add_layernorm-" + c[0],) + c[1:] for c in LN_CASES]
       + [("from_gathered-" + c[0],) + c[1:] for c in GATHERED_CASES])


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in ALL], ids=[c[0] for c in ALL])
def test_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_valid_baselines_pass():
    """The fixtures above are valid apart from the one change each case makes (else the cases prove nothing)."""
    for make in (qa, ca, itc, shn, ln, itc_g, shn_g):
        make()()
    qa(dropout_p=0.1, seed=3, key_padding_mask=torch.ones(2, 6))()
    ca(key_padding_mask=torch.ones(2, 6, dtype=torch.int32), kv_index=torch.tensor([1, 1, 0], dtype=torch.int32))()
    ca(q=r(2, 4, 2, 8), kv_index=None)()
    itc(temp=torch.tensor([0.07]), image_ids=torch.tensor([1, 2, 1], dtype=torch.int32), label_smoothing=1)()
    shn(image_ids=torch.arange(4), generator=torch.Generator(), seed=2**63 - 1)()
    ln(bias=None, dropout_p=0.2, seed=torch.tensor(4))()
    ln(residual=r(2, 3, 8, dtype=torch.float64))()  # residual dtypes are promoted, not rejected


@pytest.mark.parametrize("make", [qa, ca])
def test_triton_backend_on_cpu_needs_the_interpreter(make, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on a cpu tensor.*TRITON_INTERPRET=1"):
        make(backend="triton")()
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on a cpu tensor"):
        itc(backend="triton")()


def test_resolve_backend_rules(monkeypatch):
    cpu = torch.device("cpu")
    sup = ("triton", "torch")
    monkeypatch.delenv("BLIPFAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if C.triton_available():
        assert C.resolve_backend("op", "triton", cpu, sup, torch.float32) == "triton"  # interpreter on CPU
    assert C.resolve_backend("op", None, cpu, sup, torch.float32) == "torch"  # automatic: never the interpreter
    assert C.resolve_backend("op", "torch", cpu, sup, torch.float64) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        C.resolve_backend("op", "triton", cpu, sup, torch.float32)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run"):
        C.resolve_backend("op", "cuda", cpu, ("cuda", "torch"), torch.float32)
    # the environment variable states a preference that falls back, but must be a known name
    monkeypatch.setenv("BLIPFAST_BACKEND", "cuda")
    assert C.resolve_backend("op", None, cpu, ("cuda", "torch"), torch.float32) == "torch"
    monkeypatch.setenv("BLIPFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="BLIPFAST_BACKEND"):
        qa()()
