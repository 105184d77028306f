"""The first-use check (blipfast/selftest/firstuse.py, docs/selftest.md#first-use) on CPU tensors: the CPU dispatches
as a CUDA device (tests.helpers.selftest.cpu_as_cuda) and the Triton kernels run under the interpreter. A wrong
kernel (tests.helpers.mutants) is disabled with one warning and the op falls back to the reference; verdicts are
cached, reused and invalidated with their key; strict mode raises, 0 skips; nothing of the check runs inside a
compiled step, under fake or meta tensors, or costs the counted step a host sync."""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import blipfast.ops as O
from blipfast import selftest
from blipfast.ops import _common as C
from blipfast.selftest import cache, firstuse
from tests.helpers.mutants import Mutant, outputs
from tests.helpers.selftest import cpu_as_cuda, isolated
from tests.helpers.tolerance import assert_close

triton = pytest.importorskip("triton")
from blipfast.kernels import attention as AK  # noqa: E402  (after the triton check)

F32 = torch.float32
KEY = ("qformer_attention", "triton", F32)
NAMES = ("out", "dq", "dk", "dv")


def _half_dq(monkeypatch):
    """A Triton attention backward that returns half of dQ (the mutation tests' first attention mutant)."""
    return Mutant(monkeypatch, AK, "qformer_attention_bwd", outputs(lambda dq, dk, dv: (dq / 2, dk, dv)))


def _attention(fn):
    """(out, dq, dk, dv) of ``fn`` (qformer_attention or its reference) on fixed inputs with padding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=g).requires_grad_() for _ in range(3))
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 6:] = False
    out = fn(q, k, v, num_query=4, mode="causal", key_padding_mask=kpm)
    return (out.detach(), *torch.autograd.grad(out.pow(2).sum(), (q, k, v)))


def _selftest_warnings(record):
    return [w for w in record if issubclass(w.category, selftest.SelfTestWarning)]


def test_failing_kernel_is_disabled_with_one_warning_and_the_op_falls_back(monkeypatch, tmp_path):
    isolated(monkeypatch, tmp_path)
    m = _half_dq(monkeypatch)
    with cpu_as_cuda(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = _attention(O.qformer_attention)
        checked = m.calls
        second = _attention(O.qformer_attention)
    assert checked > 0, "the check did not run the kernel"
    assert m.calls == checked, "the disabled kernel was dispatched to"
    assert KEY in C.DISABLED
    (w,) = _selftest_warnings(record)
    text = str(w.message)
    assert "qformer_attention" in text and "float32" in text and "triton" in text and "dq" in text, text
    torch_backend = _attention(lambda *a, **k: O.qformer_attention(*a, backend="torch", **k))
    for a, b, c, r, name in zip(first, second, torch_backend, _attention(O.qformer_attention_ref), NAMES):
        assert torch.equal(a, c) and torch.equal(b, c), name  # the fallback, bit for bit
        assert_close(a, r, name=name)  # which is the reference (its backward analytic, hence not bit for bit)
    # another dtype is another verdict; the reference (float64) is never checked
    assert ("qformer_attention", "triton", torch.float16) not in C.DISABLED


def test_verdict_is_cached_reused_and_invalidated_by_a_new_version(monkeypatch, tmp_path):
    isolated(monkeypatch, tmp_path)
    m = _half_dq(monkeypatch)
    with cpu_as_cuda(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _attention(O.qformer_attention)
        ran = m.calls
        key = cache.device_key(torch.device("cpu"))
        verdict = cache.load(key, *KEY)
        assert verdict is not None and verdict["ok"] is False and "dq" in verdict["error"]
        assert (tmp_path / "selftest" / cache.key_id(key) / "key.json").exists()

        selftest.reset()  # a new process: the cached verdict decides, nothing runs
        _attention(O.qformer_attention)
        assert m.calls == ran and KEY in C.DISABLED
        assert len(_selftest_warnings(record)) == 2 and "cached verdict" in str(record[-1].message)

        selftest.reset()  # a new Triton: a new key, checked again
        monkeypatch.setattr(triton, "__version__", triton.__version__ + "-other")
        _attention(O.qformer_attention)
        assert m.calls > ran and KEY in C.DISABLED
    assert cache.device_key(torch.device("cpu")) != key
    assert len(list((tmp_path / "selftest").glob("*/key.json"))) == 2


def test_strict_mode_raises_at_every_dispatch(monkeypatch, tmp_path):
    isolated(monkeypatch, tmp_path, mode="strict")
    _half_dq(monkeypatch)
    with cpu_as_cuda():
        for _ in range(2):
            with pytest.raises(selftest.SelfTestError, match="qformer_attention.*float32"):
                _attention(O.qformer_attention)
    assert not C.DISABLED


def test_off_skips_the_check(monkeypatch, tmp_path):
    isolated(monkeypatch, tmp_path, mode="0")
    m = _half_dq(monkeypatch)
    with cpu_as_cuda():
        got = _attention(O.qformer_attention)
    assert m.calls == 1, "the op's own backward only: no check ran"
    assert torch.allclose(got[1] * 2, _attention(O.qformer_attention_ref)[1], atol=1e-5), "the kernel ran unchecked"
    assert not (tmp_path / "selftest").exists()
    monkeypatch.setenv("BLIPFAST_SELFTEST", "sometimes")
    with pytest.raises(ValueError, match="BLIPFAST_SELFTEST"):
        firstuse.mode()


def test_passing_kernel_is_trusted_once_and_cached(monkeypatch, tmp_path):
    """verify() runs the check of the real ITC kernel up front; the dispatch then takes Triton and checks nothing."""
    isolated(monkeypatch, tmp_path)
    with cpu_as_cuda():
        got = selftest.verify("cpu", dtypes=(F32,), ops=("itc_loss",))
        assert got == {("itc_loss", "triton", F32): True}
        assert cache.load(cache.device_key(torch.device("cpu")), "itc_loss", "triton", F32)["ok"] is True
        monkeypatch.setattr(firstuse, "check", lambda *a, **k: pytest.fail("checked twice"))
        assert C.resolve_backend("itc_loss", None, torch.device("cpu"), ("triton", "torch"), F32) == "triton"
        selftest.reset()  # a new process reads the cached pass
        assert C.resolve_backend("itc_loss", None, torch.device("cpu"), ("triton", "torch"), F32) == "triton"
    # without the seam a CPU tensor is not a CUDA device: the reference, and nothing checked
    assert C.resolve_backend("itc_loss", None, torch.device("cpu"), ("triton", "torch"), F32) == "torch"


# ----------------------------------------------------------------------------------------------
# nothing of the check inside a traced, captured or counted step


def _blipfast_calls(gm) -> Counter:
    return Counter((str(n.target).split(".")[1], n.args[-1]) for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("blipfast."))


def _traced_step_on_fake_cuda():
    """An ITC + attention step traced by torch.compile(fullgraph=True) on fake CUDA tensors (as a GPU traces it)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(img, txt, temp, q, k, v):
        loss = O.itc_loss(img, txt, temp)
        a = O.qformer_attention(q, k, v, num_query=4, mode="causal")
        return loss + a.float().pow(2).mean()

    torch._dynamo.reset()
    with FakeTensorMode():
        args = [torch.randn(4, 3, 8, device="cuda"), torch.randn(4, 8, device="cuda"),
                torch.tensor(0.07, device="cuda")] + [torch.randn(2, 9, 2, 16, device="cuda") for _ in range(3)]
        torch.compile(step, fullgraph=True, backend=capture)(*[a.requires_grad_() for a in args])
    assert len(graphs) == 1  # fullgraph=True: a graph break would have raised
    return _blipfast_calls(graphs[0])


@pytest.mark.skipif(not C.TRITON_OK, reason="needs Triton")
def test_compiled_step_traces_without_the_check_and_honours_disabled(monkeypatch, tmp_path):
    isolated(monkeypatch, tmp_path)
    calls = []
    monkeypatch.setattr(C, "FIRST_USE", lambda *a: calls.append(a) or True)
    got = _traced_step_on_fake_cuda()
    assert calls == [], "the first-use hook was called while compiling"
    assert got == Counter({("itc_loss_fwd", "triton"): 1, ("qformer_attention_fwd", "triton"): 1})
    C.DISABLED.add(("itc_loss", "triton", F32))  # a failed verdict: the traced dispatch falls back too
    got = _traced_step_on_fake_cuda()
    assert got == Counter({("itc_loss_fwd", "torch"): 1, ("qformer_attention_fwd", "triton"): 1})
    assert calls == []


def test_counted_step_has_no_host_sync_and_runs_no_check(monkeypatch, tmp_path):
    """On meta tensors with a GPU's dispatch (blipfast.bench.counting) the hook declines: the counted costs are
    those without it, with no host sync."""
    from blipfast.bench.counting import count_step, counting_gpu_path

    isolated(monkeypatch, tmp_path)
    monkeypatch.setattr(firstuse, "check", lambda *a, **k: pytest.fail("a check ran on meta tensors"))

    def step():
        img = torch.randn(4, 3, 8, device="meta", requires_grad=True)
        txt = torch.randn(4, 8, device="meta", requires_grad=True)
        q = torch.randn(2, 9, 2, 16, device="meta", requires_grad=True)
        loss = O.itc_loss(img, txt, torch.tensor(0.07, device="meta"))
        loss = loss + O.qformer_attention(q, q, q, num_query=4, mode="causal", dropout_p=0.1).float().sum()
        loss.backward()

    with counting_gpu_path():
        with_hook = count_step(step)
        monkeypatch.setattr(C, "FIRST_USE", None)
        without = count_step(step)
    assert with_hook.host_syncs == 0
    assert with_hook.as_dict() == without.as_dict()


def test_no_check_under_a_dispatch_mode(monkeypatch, tmp_path):
    """Under FakeTensorMode (eager) a CUDA tensor is not real: the hook trusts the backend and decides nothing."""
    isolated(monkeypatch, tmp_path)
    monkeypatch.setattr(firstuse, "check", lambda *a, **k: pytest.fail("a check ran on fake tensors"))
    with FakeTensorMode():
        assert firstuse.first_use(*KEY[:2], torch.device("cuda", 0), F32) is True
    assert firstuse._SEEN == {}


@pytest.mark.gpu
def test_on_cuda_the_first_eager_call_checks_and_capture_or_compile_check_nothing(monkeypatch, tmp_path):
    isolated(monkeypatch, tmp_path)
    dev, bf16 = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    q, k, v = (torch.randn(2, 40, 2, 64, device=dev, dtype=bf16) for _ in range(3))
    step = torch.compile(lambda q, k, v: O.qformer_attention(q, k, v, num_query=32, mode="causal"), fullgraph=True)
    O.qformer_attention(q, k, v, num_query=32, mode="causal")  # eager: the check runs here
    assert cache.load(cache.device_key(dev), "qformer_attention", "triton", bf16)["ok"] is True
    monkeypatch.setattr(firstuse, "check", lambda *a, **k: pytest.fail("a check ran after the first eager call"))
    step(q, k, v)  # compile (may synchronise while autotuning), then run without a host sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(q, k, v)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph, x = torch.cuda.CUDAGraph(), torch.zeros(1, device=dev)
    with torch.cuda.graph(graph):  # an op not yet checked, inside a capture: trusted, nothing runs
        trusted = firstuse.first_use("itc_loss", "triton", dev, torch.float16)
        x += 1
    assert trusted is True and ("itc_loss", "triton", torch.float16) + ("cuda", dev.index) not in firstuse._SEEN
