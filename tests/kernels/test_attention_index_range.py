"""Out-of-range ``kv_index`` of cross_attention (and of QFormer's shared image K/V): a clear error naming
``kv_index`` on every backend, and no read or write out of bounds anywhere below the op.

CPU: the op raises ValueError (torch backend and the Triton backend under the interpreter); under
torch.compile the check is a ``torch._assert_async`` that traces without a graph break. Kernel level: the
row-set table builders (Triton kernel and torch ops) leave out-of-range row-sets out of every table and
write nothing outside their outputs (guard elements around them stay untouched), and the attention kernels
still give the reference result for the valid row-sets. GPU (`-m gpu`): the device assert fires without a
host sync, also inside a captured CUDA graph.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import blipfast
from blipfast import ops
from blipfast.kernels import _attention_common as common
from blipfast.kernels import attention as kern

from tests.helpers.runtime import HAS_CUDA
from tests.helpers.tolerance import assert_within_torch_error

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
M = 3
BAD = [M, -1, 1000, 2**40, -(2**40) + 1]  # 2**40 and 1 - 2**40 wrap to 0 and 1 when narrowed to int32
BAD_IDS = ["M", "minus1", "1000", "2pow40", "neg_wraps_to_1"]
BACKENDS = ["torch", "triton"]


def _qkv(n, m, lq=4, lk=7, h=2, d=16):
    return (torch.randn(n, lq, h, d, device=DEV), torch.randn(m, lk, h, d, device=DEV),
            torch.randn(m, lk, h, d, device=DEV))


# ----------------------------------------------------------------------------------------------
# the public op and QFormer


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_op_rejects_out_of_range_kv_index(backend, bad, dtype):
    if dtype == torch.int32 and abs(bad) >= 2**31:
        pytest.skip("not representable in int32")
    q, k, v = _qkv(5, M)
    idx = torch.tensor([0, 2, bad, 1, 2], dtype=dtype)
    with pytest.raises(ValueError, match=rf"cross_attention: kv_index values must be in \[0, {M}\).*got {bad} at "
                                         r"position 2"):
        ops.cross_attention(q.cpu(), k.cpu(), v.cpu(), kv_index=idx, backend=backend)


def test_op_rejects_any_index_without_images():
    q, k, v = _qkv(2, 0)
    with pytest.raises(ValueError, match=r"kv_index values must be in \[0, 0\)"):
        ops.cross_attention(q.cpu(), k.cpu(), v.cpu(), kv_index=torch.zeros(2, dtype=torch.int64), backend="torch")


@pytest.mark.parametrize("bad", [M, -1, 2**40], ids=["M", "minus1", "2pow40"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_qformer_rejects_out_of_range_kv_index(monkeypatch, backend, bad):
    monkeypatch.setenv("BLIPFAST_BACKEND", backend)
    cfg = blipfast.QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                 encoder_hidden_size=24, cross_attention_frequency=1)
    qf = blipfast.QFormer(cfg).eval()
    image = torch.randn(M, 5, 24)
    queries = torch.randn(4, 3, 32)
    good = torch.tensor([0, 2, 1, 2])
    qf(queries, encoder_kv=qf.image_kv(image), kv_index=good)  # valid baseline runs
    with pytest.raises(ValueError, match=rf"kv_index values must be in \[0, {M}\).*got {bad}"):
        qf(queries, encoder_kv=qf.image_kv(image), kv_index=torch.tensor([0, 2, bad, 2]))
    with pytest.raises(ValueError, match=r"kv_index values must be in \[0, 3\)"):
        qf(queries, encoder_hidden_states=image, kv_index=torch.tensor([bad, 0, 1, 2]))


def test_compiled_check_is_an_async_assert_without_graph_break():
    """Under torch.compile(fullgraph=True) the range check traces (no graph break) and still fails at run
    time with the message naming kv_index."""
    torch._dynamo.reset()
    q, k, v = _qkv(4, M)
    f = torch.compile(lambda q, k, v, i: ops.cross_attention(q, k, v, kv_index=i, backend="torch"), fullgraph=True,
                      backend="aot_eager")
    good = torch.tensor([2, 0, 1, 2], device=DEV)
    want = ops.cross_attention(q, k, v, kv_index=good, backend="torch")
    assert torch.equal(f(q, k, v, good), want)
    if DEV.type == "cpu":  # on CUDA the device assert would poison the context: see the gpu test below
        with pytest.raises(RuntimeError, match=rf"kv_index values must be in \[0, {M}\)"):
            f(q, k, v, torch.tensor([2, 0, M, 2]))


def test_check_takes_the_async_form_when_compiling(monkeypatch):
    """The device path: no ValueError with a host-side lookup of the bad value, a torch._assert_async."""
    calls = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: calls.append((bool(cond), msg)))
    from blipfast.ops._common import check_index_range

    check_index_range("cross_attention", "kv_index", torch.tensor([0, -1, 2]), M, "M images")
    check_index_range("cross_attention", "kv_index", torch.tensor([0, 1, 2]), M, "M images")
    check_index_range("cross_attention", "kv_index", torch.tensor([], dtype=torch.int64), 0, "M images")
    assert calls == [(False, "cross_attention: kv_index values must be in [0, 3) (M images)"),
                     (True, "cross_attention: kv_index values must be in [0, 3) (M images)")]


# ----------------------------------------------------------------------------------------------
# kernels: the row-set tables and the attention kernels never leave their buffers


def _expected_tables(idx: torch.Tensor, m: int, g: int):
    """PERM (stable sort, out-of-range row-sets last), IMGTAB and the real chunks of the valid row-sets."""
    ok = (idx >= 0) & (idx < m)
    key = torch.where(ok, idx, m)
    perm = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=m + 1)[:m]
    ends = torch.cumsum(counts, 0)
    imgtab = torch.stack([torch.where(counts > 0, ends - counts, 0), torch.where(counts > 0, ends, 0)], 1)
    chunks = []
    for img in range(m):
        ids = perm[(key[perm] == img)].tolist()
        chunks += [[img, len(ids[s:s + g])] + ids[s:s + g] + [0] * (g - len(ids[s:s + g])) for s in range(0, len(ids), g)]
    return perm, imgtab, torch.tensor(chunks, dtype=torch.int64).view(-1, g + 2)


def _check_tables(idx, m, g, perm, imgtab, chunks, p, exact_padding):
    want_perm, want_tab, want_chunks = _expected_tables(idx.cpu(), m, g)
    assert torch.equal(perm.long().cpu(), want_perm)
    assert torch.equal(imgtab.long().cpu(), want_tab)
    assert p == common.chunk_bound(idx.numel(), m, g) and chunks.shape == (p, g + 2)
    ch = chunks.long().cpu()
    real = ch[ch[:, 1] > 0]
    assert (ch[len(real):, 1] == 0).all(), "spare chunks must have count 0"
    if not exact_padding:  # the torch builder leaves unused id slots as they fall: compare the used ones
        real = torch.stack([torch.cat([r[:2 + r[1]], r.new_zeros(g - r[1])]) for r in real]) if len(real) else real
    assert torch.equal(real, want_chunks)


SENTINEL = -12345
GUARD = 64


def _guarded(shape, dtype=torch.int32):
    """A view of ``shape`` in the middle of a buffer whose GUARD elements on both sides hold SENTINEL."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype, device=DEV)
    return buf, buf[GUARD:GUARD + n].view(shape)


def _guards_intact(buf, n):
    return bool((buf[:GUARD] == SENTINEL).all()) and bool((buf[GUARD + n:] == SENTINEL).all())


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_table_kernel_stays_in_its_buffers(bad, g):
    """The Triton table kernel with out-of-range indices: every store lands in its outputs (guard elements
    untouched; an index of M used to write IMGTAB[M]) and the tables are those of the valid row-sets."""
    n, m = 11, M
    idx = torch.tensor([2, bad, 0, 2, 2, bad, 1, 0, 2, bad, 2], device=DEV)
    p = common.chunk_bound(n, m, g)
    bufs = dict(perm=_guarded((n,)), simg=_guarded((n,)), imgtab=_guarded((m, 2)), chunks=_guarded((max(p, 1), g + 2)))
    ibuf, iview = _guarded((n,), torch.int64)
    iview.copy_(idx)
    common._launch_table_kernel(iview, m, g, p, *(view for _, view in bufs.values()))
    for name, (buf, view) in bufs.items():
        assert _guards_intact(buf, view.numel()), f"{name}: the table kernel wrote outside its output"
    _check_tables(idx, m, g, bufs["perm"][1], bufs["imgtab"][1], bufs["chunks"][1][:p], p, exact_padding=True)


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_torch_tables_skip_out_of_range(bad):
    """The torch builder (large N) gives the same tables without an IndexError or a device assert of its own."""
    n, m, g = 9, M, 2
    idx = torch.tensor([bad, 2, 0, 2, bad, 1, 2, 0, bad], device=DEV)
    perm, imgtab, chunks, p = common.build_rowset_tables(idx, m, g, force_torch=True)
    _check_tables(idx, m, g, perm, imgtab, chunks, p, exact_padding=False)


@pytest.mark.parametrize("tables", ["triton", "torch"])
@pytest.mark.parametrize("config", [None, dict(BLOCK_M=16, BLOCK_N=16, HPP=1, num_warps=4, num_stages=1,
                                               DQ_BLOCK_M=16, DQ_BLOCK_N=16)], ids=["default", "g4_multiblock"])
def test_kernels_give_the_valid_rowsets_their_result(monkeypatch, tables, config):
    """Kernel entry points with out-of-range entries in kv_index (which the op would reject): the valid
    row-sets' outputs and dQ, and dK/dV (summed over the valid row-sets only), match the reference on the
    valid row-sets alone."""
    if tables == "torch":
        monkeypatch.setattr(common, "CSR_MAX_ROWSETS", 0)
    n, m, lq, lk, h, d = 8, M, 4, 21, 2, 16
    idx = torch.tensor([2, M, 0, -1, 2, 2**40, 1, 2], device=DEV)
    ok = (idx >= 0) & (idx < m)
    q, k, v = _qkv(n, m, lq, lk, h, d)
    kpm = torch.rand(m, lk, device=DEV) > 0.3
    do = torch.randn_like(q)
    scale = 1.0 / math.sqrt(d)
    out, lse = kern.cross_attention_fwd(q, k, v, idx, kpm, None, 0.0, scale, config=config)
    dq, dk, dv = kern.cross_attention_bwd(do, q, k, v, out, lse, idx, kpm, None, 0.0, scale, config=config)

    def ref(dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q[ok], k, v)]
        o = ops.cross_attention_ref(*leaves, kv_index=idx[ok], key_padding_mask=kpm)
        o.backward(do[ok].to(dtype))
        return [o.detach()] + [t.grad for t in leaves]

    r64, r32 = ref(torch.float64), ref(torch.float32)
    for name, fast, a, b in zip(("out", "dq", "dk", "dv"), (out[ok], dq[ok], dk, dv), r64, r32):
        assert_within_torch_error(fast, a, b, name=name)


# ----------------------------------------------------------------------------------------------
# GPU: the device assert, without a host sync, eager and inside a captured CUDA graph

_GPU_SCRIPT = r"""
import sys, torch
from blipfast import ops
where = sys.argv[1]
q = torch.randn(4, 8, 2, 16, device="cuda"); k = torch.randn(3, 20, 2, 16, device="cuda"); v = torch.randn_like(k)
idx = torch.tensor([0, 2, 1, 2], device="cuda")
bad = torch.tensor([0, 2, 3, 2], device="cuda")
ops.cross_attention(q, k, v, kv_index=idx)  # warm-up (tuning may sync)
torch.cuda.synchronize()
if where == "graph":
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.cuda.set_sync_debug_mode("error")  # the check itself must not sync (a sync would break capture too)
        out = ops.cross_attention(q, k, v, kv_index=idx)
        torch.cuda.set_sync_debug_mode(0)
    graph.replay(); torch.cuda.synchronize()  # valid indices: fine
    idx.copy_(bad)
    graph.replay()
else:
    torch.cuda.set_sync_debug_mode("error")
    out = ops.cross_attention(q, k, v, kv_index=bad)
    torch.cuda.set_sync_debug_mode(0)
print("launched without a host sync", flush=True)
torch.cuda.synchronize()
print("NO ERROR", flush=True)
"""


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["eager", "graph"])
def test_gpu_out_of_range_kv_index_is_a_device_assert(where):
    """A device-side assert kills the CUDA context, so it runs in a subprocess."""
    r = subprocess.run([sys.executable, "-c", _GPU_SCRIPT, where], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = r.stdout + r.stderr
    assert "launched without a host sync" in r.stdout, out[-3000:]
    assert "NO ERROR" not in r.stdout and r.returncode != 0, out[-3000:]
    assert "kv_index values must be in [0, 3)" in out or "device-side assert" in out, out[-3000:]
