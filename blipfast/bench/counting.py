"""What a step costs, counted rather than timed: properties of the code, the same on any machine.

``count_step(step)`` runs ``step()`` (forward and backward) three times (operators and syncs, saved tensors, FLOPs:
no counter disturbs another) and returns a :class:`Cost`:

- ``flops``: floating-point operations (``torch.utils.flop_counter.FlopCounterMode``; blipfast's custom ops
  count with the formulas below: 2 FLOPs per multiply-add of the GEMMs the kernels do, dense over the tiles
  they visit, the backward of attention 2.5x its forward as in FlashAttention; the linear ops count the GEMMs
  they run, the recomputed ones included);
- ``saved_bytes``: bytes that autograd saves for the backward (``saved_tensors_hooks``), each storage once, not
  counting the storages of parameters and of the step's inputs (they exist anyway): the activation memory;
- ``ops``: operators dispatched (a ``TorchDispatchMode`` count of every aten and custom op, views included;
  a blipfast custom op counts as one);
- ``host_syncs``: operators that make the host wait for the device (``.item()``, ``nonzero``, boolean
  indexing, copies to the CPU, ...).

Counting the GPU path without a GPU: run the step on meta tensors inside ``counting_gpu_path()``, which installs
dispatch rules (``blipfast.ops._common.dispatch_rules``) under which meta tensors dispatch as CUDA tensors of a
machine with Triton and the compiled extension: every op takes the backend it takes on a CUDA device (Triton /
CUDA C++) and its fake implementation stands in for the kernel, so the same Python, the same custom ops and the
same saved tensors are counted as on a GPU. Outside it nothing of this is read: a normal run's dispatch looks at
the device only. PyTorch's SDPA on meta decomposes into its math path; ``blipfast.ops.sdpa`` (re-exported here)
calls the memory-efficient kernel that CUDA picks for a masked SDPA instead, so a baseline is counted as it runs
on a GPU.
On meta tensors ``.item()`` cannot run: the counter answers it with 0 (and counts the sync).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..ops import _common
from ..ops import sdpa  # noqa: F401  (re-exported for the baselines)

aten = torch.ops.aten

# operators whose result the host must wait for
_SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique2,
             aten.is_nonzero, aten.equal, aten.repeat_interleave}
for _name in ("item", "allclose"):
    if hasattr(aten, _name):
        _SYNC_OPS.add(getattr(aten, _name))


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ----------------------------------------------------------------------------------------------
# FLOP formulas of blipfast's custom ops (shapes in, FLOPs out; see the module doc)


def _attn_fwd(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    n, lq, h, d = q_shape
    return 4 * n * lq * k_shape[1] * h * d


def _attn_bwd(grad_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return int(2.5 * _attn_fwd(q_shape, k_shape))


def _itc_fwd(img_shape, txt_shape, img_all_shape, *args, out_shape=None, **kwargs) -> int:
    b, q, e = img_shape
    return 2 * 2 * b * img_all_shape[0] * q * e  # both directions, every query


def _itc_bwd(grad_shape, img_shape, txt_shape, img_all_shape, *args, out_shape=None, **kwargs) -> int:
    b, q, e = img_shape
    return 2 * b * img_all_shape[0] * e * (q + 1)  # d image feats over all queries, d text feats at the arg-max


def _lce_fwd(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # the logits, chunk by chunk


def _lce_bwd(grad_shape, x_shape, w_shape, b_shape, t_shape, lse_shape, count_shape, ls, chunk, need_x, need_weight,
             need_bias, *args, out_shape=None, **kwargs) -> int:
    return _lce_fwd(x_shape, w_shape) * (1 + need_x + need_weight)  # logits again, then d x and d weight


def _mlp_fwd(x_shape, w1_shape, b1_shape, w2_shape, *args, out_shape=None, **kwargs) -> int:
    r, (h, d), o = x_shape[0], w1_shape, w2_shape[0]
    return 2 * r * h * (d + o)


def _mlp_bwd(grad_shape, x_shape, u_shape, w1_shape, w2_shape, approximate, need_x, need_w1, need_w2, *args,
             out_shape=None, **kwargs) -> int:
    r, (h, d), o = x_shape[0], w1_shape, w2_shape[0]
    return 2 * r * h * (o * (1 + need_w2) + d * (need_x + need_w1))  # d u always, the others where needed


def _cat_fwd(x_shape, w_shapes, *args, out_shape=None, **kwargs) -> int:
    return 2 * _prod(x_shape) * sum(w[0] for w in w_shapes)


def _cat_bwd(grad_shape, x_shape, w_shapes, need_x, need_weights, *args, out_shape=None, **kwargs) -> int:
    return _cat_fwd(x_shape, w_shapes) * (need_x + need_weights)


def _custom_mapping() -> dict:
    from .. import ops  # noqa: F401  (registers torch.ops.blipfast.*)

    bf = torch.ops.blipfast
    return {bf.qformer_attention_fwd: _attn_fwd, bf.qformer_attention_bwd: _attn_bwd,
            bf.cross_attention_fwd: _attn_fwd, bf.cross_attention_bwd: _attn_bwd,
            bf.itc_loss_fwd: _itc_fwd, bf.itc_loss_bwd: _itc_bwd,
            bf.linear_cross_entropy_fwd: _lce_fwd, bf.linear_cross_entropy_bwd: _lce_bwd,
            bf.gelu_mlp_fwd: _mlp_fwd, bf.gelu_mlp_bwd: _mlp_bwd,
            bf.concat_linear_fwd: _cat_fwd, bf.concat_linear_bwd: _cat_bwd}


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Cost:
    flops: int
    saved_bytes: int
    ops: int
    host_syncs: int
    op_counts: dict = dataclasses.field(default_factory=dict, repr=False)

    def ratio(self, base: "Cost") -> dict:
        def r(a, b):
            return a / b if b else (0.0 if a == 0 else float("inf"))
        return {"flops": r(self.flops, base.flops), "saved_bytes": r(self.saved_bytes, base.saved_bytes),
                "ops": r(self.ops, base.ops), "host_syncs": r(self.host_syncs, base.host_syncs)}

    def as_dict(self) -> dict:
        return {"flops": self.flops, "saved_bytes": self.saved_bytes, "ops": self.ops, "host_syncs": self.host_syncs}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts[str(func.overloadpacket)] += 1
        to_cpu = func in (aten._to_copy.default, aten.to.device, aten.to.dtype_layout) and \
            str(kwargs.get("device", "")) == "cpu" and any(
                isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
        on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
        if (func.overloadpacket in _SYNC_OPS and on_device) or to_cpu:  # on CPU tensors nothing waits for a device
            self.syncs += 1
            if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
                return 0 if not args[0].is_floating_point() else 0.0
        return func(*args, **kwargs)


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return st._cdata, st.nbytes()
    except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
        return id(t), t.numel() * t.element_size()


def count_step(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> Cost:
    """Count ``step()`` (forward and backward; see the module doc). ``exclude``: tensors whose storages are not
    activations (parameters, inputs); they are left out of ``saved_bytes``. Their storages are held for the whole
    count: a step that replaces a parameter's storage (``p.data = ...``, as BLIP's momentum update does) would
    otherwise free it, and an activation allocated at the same address would be taken for the parameter."""
    exclude = list(exclude)
    alive = [t.untyped_storage() for t in exclude]  # noqa: F841 (held until the counts are done)
    skip = {_storage_key(t)[0] for t in exclude}
    saved: dict = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in skip:
            saved[key] = max(saved.get(key, 0), nbytes)
        return t

    # three runs, so that no counter disturbs another: saved-tensor hooks dispatch a detach per saved tensor,
    # FlopCounterMode decomposes the ops it has no formula for
    counter = _OpCounter()
    with counter:
        step()
    with _OpCounter(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    flop = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with flop, _OpCounter():  # the inner counter only answers .item() on meta tensors here
        step()
    return Cost(flops=int(flop.get_total_flops()), saved_bytes=int(sum(saved.values())),
                ops=int(sum(counter.counts.values())), host_syncs=counter.syncs, op_counts=dict(counter.counts))


def _meta_is_cuda(device: torch.device, *, default) -> bool:
    return device.type == "meta" or default(device)


def _runnable_on_meta(backend: str, device: torch.device, dtype=None, *, default) -> bool:
    """On meta tensors every backend runs that runs the dtype (a machine with Triton and blipfast._C)."""
    if device.type == "meta":
        return backend == "torch" or dtype is None or dtype in _common.FUSED_DTYPES
    return default(backend, device, dtype)


@contextlib.contextmanager
def counting_gpu_path():
    """Meta tensors take the GPU's dispatch decisions (see the module doc)."""
    with _common.dispatch_rules(_meta_is_cuda, _runnable_on_meta):
        yield


def format_cost_table(rows: list[tuple[str, Cost]], base: str) -> str:
    """A table of costs with each row's ratio against the row named ``base``."""
    ref = dict(rows)[base]
    head = f"{'impl':<34} {'GFLOP':>10} {'saved MiB':>10} {'ops':>8} {'syncs':>6}   {'FLOPs':>7} {'saved':>7} {'ops':>7}"
    lines = [head, "-" * len(head)]
    for name, c in rows:
        r = c.ratio(ref)
        # a ratio against nothing (e.g. saved bytes of an inference pass, where both are 0) prints as "-"
        x = {k: f"{r[k]:>5.3f}x" if getattr(ref, k) else f"{'-':>6}" for k in ("flops", "saved_bytes", "ops")}
        lines.append(f"{name[:34]:<34} {c.flops / 1e9:>10.1f} {c.saved_bytes / 2**20:>10.1f} {c.ops:>8d} "
                     f"{c.host_syncs:>6d}   {x['flops']} {x['saved_bytes']} {x['ops']}")
    return "\n".join(lines)
