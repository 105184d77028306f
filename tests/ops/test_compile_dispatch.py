"""torch.compile(fullgraph=True) and CUDA graphs with the backends a GPU picks automatically (backend=None).

Without a GPU, CUDA tensors are faked (FakeTensorMode): Dynamo traces the QFormer forward and the ITC/negatives
ops exactly as on a GPU (resolve_backend picks "triton" and "cuda"), the fake implementations of the custom ops
stand in for the kernels. The autograd engine cannot run on fake CUDA tensors without a device, so the backward
is compiled for real on the CPU here and on CUDA under ``-m gpu`` (with CUDA-graph capture and
``torch.cuda.set_sync_debug_mode("error")``).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import blipfast.ops as O
from blipfast import QFormer, QFormerConfig
from blipfast.ops import _common as C
from tests.helpers.runtime import replay_captured_step
from tests.helpers.tolerance import assert_within_torch_error

CFG = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, encoder_hidden_size=48,
           use_qformer_text_input=True)


def _blipfast_calls(gm) -> Counter:
    """(op, backend) of every blipfast custom op in a captured FX graph."""
    calls = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("blipfast."):
            calls[(str(node.target).split(".")[1], node.args[-1])] += 1
    return calls


def _compile_on_fake_cuda(fn, *args):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(fn, fullgraph=True, backend=capture)(*args)
    assert len(graphs) == 1
    return out, _blipfast_calls(graphs[0])


@pytest.mark.skipif(not C.TRITON_OK, reason="needs Triton")
@pytest.mark.extension  # skips without blipfast._C where no CUDA device is visible, fails where one is
def test_qformer_forward_traces_fullgraph_with_gpu_backends():
    """Before the fix, resolve_backend called an lru_cache'd importlib loader inside the traced code and Dynamo
    refused it (fullgraph=True failed on every GPU)."""
    model = QFormer(QFormerConfig(**CFG)).train()
    mode = FakeTensorMode()
    with mode:
        params = {n: mode.from_tensor(p).to("cuda").detach().requires_grad_() for n, p in model.named_parameters()}
        x = torch.randn(2, 8 + 5, 64, device="cuda")
        img = torch.randn(2, 7, 48, device="cuda")
        mask = torch.ones(2, 13, device="cuda", dtype=torch.long)

        def fwd(params, x, img, mask):
            out = torch.func.functional_call(model, params, (x,), dict(
                query_length=8, attention_mask=mask, encoder_hidden_states=img, mode="causal"))
            return out.last_hidden_state.float().pow(2).mean()

        loss, calls = _compile_on_fake_cuda(fwd, params, x, img, mask)
    assert loss.device.type == "cuda"
    # 2 layers: self-attention each, cross-attention in layer 0; epilogues: 2 self + 1 cross + 2 x 2 FFNs; the
    # linear ops (one backend): a QKV GEMM per layer + the image K/V of every cross layer in one, 2 x 2 GELU FFNs
    assert calls == Counter({("qformer_attention_fwd", "triton"): 2, ("cross_attention_fwd", "triton"): 1,
                             ("bias_dropout_add_layernorm_fwd", "cuda"): 7, ("concat_linear_fwd", "torch"): 3,
                             ("gelu_mlp_fwd", "torch"): 4})


@pytest.mark.skipif(not C.TRITON_OK, reason="needs Triton")
@pytest.mark.extension  # skips without blipfast._C where no CUDA device is visible, fails where one is
def test_itc_and_negatives_trace_fullgraph_with_gpu_backends():
    mode = FakeTensorMode()
    with mode:
        img = torch.randn(4, 3, 8, device="cuda").requires_grad_()
        txt = torch.randn(4, 8, device="cuda").requires_grad_()
        temp = torch.tensor(0.07, device="cuda").requires_grad_()

        def fwd(img, txt, temp):
            loss, s_i2t, s_t2i = O.itc_loss(img, txt, temp, return_logits=True)
            neg_t, neg_i = O.sample_hard_negatives(s_i2t, s_t2i, seed=7)
            return loss, neg_t, neg_i

        (loss, neg_t, neg_i), calls = _compile_on_fake_cuda(fwd, img, txt, temp)
    assert neg_t.shape == (4,) and neg_t.device.type == "cuda"
    assert calls == Counter({("itc_loss_fwd", "triton"): 1, ("sample_hard_negatives", "cuda"): 1})


def test_meta_dispatches_as_cuda_only_while_counting():
    """The benchmark's GPU path on meta tensors is a dispatch rule that blipfast.bench.counting installs while it
    counts; outside, a meta tensor dispatches as any non-CUDA tensor (the reference) and nothing else is read."""
    from blipfast.bench.counting import counting_gpu_path

    meta, sup = torch.device("meta"), ("cuda", "triton", "torch")
    default_rules = (C._is_cuda, C._runnable)
    assert C.resolve_backend("op", None, meta, sup, torch.float32) == "torch"
    assert O.dropout_seeds(2, meta) == (None, None)
    with pytest.raises(RuntimeError), counting_gpu_path():
        assert C.resolve_backend("op", None, meta, sup, torch.float32) == "cuda"
        assert C.resolve_backend("op", None, meta, ("triton", "torch"), torch.bfloat16) == "triton"
        assert C.resolve_backend("op", None, meta, sup, torch.float64) == "torch"  # fused kernels take no fp64
        assert C.resolve_backend("op", None, torch.device("cpu"), ("cuda", "torch"), torch.float32) == "torch"
        assert all(s is not None and s.device == meta for s in O.dropout_seeds(2, meta))
        raise RuntimeError("leaving the count by an exception restores the rules too")
    assert (C._is_cuda, C._runnable) == default_rules
    assert C.resolve_backend("op", None, meta, sup, torch.float32) == "torch"


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {a.device.type for a in torch.utils._pytree.tree_leaves((args, kwargs, out))
                   if isinstance(a, torch.Tensor)}
        self.ops.append((str(func), devices))
        return out


def test_integer_seed_is_made_on_the_device():
    """An int seed= used to become torch.tensor([seed], device=...): a host-to-device copy per call (a
    blocking copy from pageable memory, not capturable). It is now a fill kernel on the device."""
    with FakeTensorMode():
        with _Record() as rec:
            seed = C.check_seed("op", 1234, torch.device("cuda"))
    assert seed.device.type == "cuda" and seed.dtype == torch.int64 and seed.shape == (1,)
    assert rec.ops and all(devs == {"cuda"} for _, devs in rec.ops), rec.ops
    real = C.check_seed("op", -5, torch.device("cpu"))
    assert real.tolist() == [-5]


def _tiny_step(model, x, img, mask):
    out = model(x, query_length=8, attention_mask=mask, encoder_hidden_states=img, mode="causal")
    return out.last_hidden_state.float().pow(2).mean()


def test_qformer_forward_backward_compiles_fullgraph_on_cpu():
    """The CPU half of the story: the whole QFormer forward+backward under fullgraph=True with automatic
    dispatch (the reference backend), equal to eager."""
    torch._dynamo.reset()
    model = QFormer(QFormerConfig(**CFG)).eval()
    x, img = torch.randn(2, 13, 64), torch.randn(2, 7, 48)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 10:] = 0
    loss_e = _tiny_step(model, x, img, mask)
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    loss_c = torch.compile(_tiny_step, fullgraph=True, backend="aot_eager")(model, x, img, mask)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    # aot_eager runs the same aten ops as eager: identical results
    assert torch.equal(loss_c, loss_e)
    for (name, _), a, b in zip(model.named_parameters(), grads_c, grads_e):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# on a GPU: compile + CUDA graph capture of a training step, no host sync anywhere


def _gpu_model_and_inputs():
    torch.manual_seed(0)
    model = QFormer(QFormerConfig(**CFG)).cuda().train()
    x = torch.randn(4, 13, 64, device="cuda")
    img = torch.randn(4, 7, 48, device="cuda")
    mask = torch.ones(4, 13, dtype=torch.long, device="cuda")
    mask[1, 10:] = 0
    return model, x, img, mask


@pytest.mark.gpu
def test_qformer_compiled_fullgraph_on_cuda_without_sync():
    model, x, img, mask = _gpu_model_and_inputs()
    model.eval()
    step = torch.compile(_tiny_step, fullgraph=True)
    ref = _tiny_step(model, x, img, mask)
    step(model, x, img, mask)  # compile outside the sync check (autotuning may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(model, x, img, mask)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_within_torch_error(loss.detach().double(), ref.detach().double(), ref.detach().double(),
                              dtype=torch.float32, name="compiled loss")


@pytest.mark.gpu
def test_qformer_training_step_captures_in_a_cuda_graph():
    model, x, img, mask = _gpu_model_and_inputs()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)

    def train_step():
        opt.zero_grad(set_to_none=False)
        loss = _tiny_step(model, x, img, mask)
        loss.backward()
        opt.step()
        return loss.detach()

    before = []
    losses = replay_captured_step(train_step, 3, lambda: before.extend(p.detach().clone() for p in model.parameters()))
    assert all(torch.isfinite(v).all() for v in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "replay did not train"
