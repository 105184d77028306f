"""What a step costs, counted rather than timed: properties of the code, the same on any machine (no GPU needed).

``count_step(step, exclude=())`` runs ``step()`` (forward and backward) three times, once per counter, so that no
counter disturbs another, and returns a :class:`Cost`:

- ``flops``: floating-point operations from ``torch.utils.flop_counter.FlopCounterMode``. blipfast's attention
  ops are custom ops whose kernels FlopCounterMode cannot see into; they count by formula: 2 FLOPs per
  multiply-add of QK^T and PV over every (row, key) pair (dense, as the kernels' tiles visit them), the backward
  2.5x the forward (it recomputes QK^T, as FlashAttention does). Elementwise work is not counted (FlopCounterMode
  counts matrix products only), on either side of a comparison.
- ``saved_bytes``: bytes autograd keeps for the backward (``saved_tensors_hooks``), each storage once, leaving
  out the storages given in ``exclude`` (parameters, the step's inputs: they exist anyway): the activation memory.
- ``ops``: operators dispatched (a ``TorchDispatchMode`` count of every aten and custom op, views included; a
  blipfast custom op counts as one: its kernel is one launch on a GPU).
- ``host_syncs``: dispatched operators that make the host wait for the device (``.item()``, ``nonzero``,
  boolean indexing, ``equal``, copies to the CPU).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

# operators whose result the host must wait for
_SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique2,
             aten.is_nonzero, aten.equal, aten.repeat_interleave}


def _attn_fwd(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    n, lq, h, d = q_shape
    return 4 * n * lq * k_shape[1] * h * d


def _attn_bwd(grad_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return int(2.5 * _attn_fwd(q_shape, k_shape))


def _custom_mapping() -> dict:
    from .. import ops  # noqa: F401  (registers torch.ops.blipfast.*)

    bf = torch.ops.blipfast
    return {bf.qformer_attention_fwd: _attn_fwd, bf.qformer_attention_bwd: _attn_bwd,
            bf.cross_attention_fwd: _attn_fwd, bf.cross_attention_bwd: _attn_bwd}


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
        self.counts: collections.Counter = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts[str(func.overloadpacket)] += 1
        to_cpu = func in (aten._to_copy.default, aten.to.device, aten.to.dtype_layout) and \
            str(kwargs.get("device", "")) == "cpu" and any(
                isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
        if func.overloadpacket in _SYNC_OPS or to_cpu:
            self.syncs += 1
        return func(*args, **kwargs)


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return st._cdata, st.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return id(t), t.numel() * t.element_size()


def count_step(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> Cost:
    """Count ``step()`` (forward and backward; see the module doc). ``exclude``: tensors whose storages are not
    activations (parameters, inputs); they are left out of ``saved_bytes``."""
    skip = {_storage_key(t)[0] for t in exclude}
    saved: dict = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in skip:
            saved[key] = max(saved.get(key, 0), nbytes)
        return t

    counter = _OpCounter()
    with counter:
        step()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    flop = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with flop:
        step()
    return Cost(flops=int(flop.get_total_flops()), saved_bytes=int(sum(saved.values())),
                ops=int(sum(counter.counts.values())), host_syncs=counter.syncs, op_counts=dict(counter.counts))


def format_cost_table(rows: list[tuple[str, Cost]], base: str) -> str:
    """A table of costs with each row's ratio against the row named ``base``."""
    ref = dict(rows)[base]
    head = f"{'impl':<40} {'GFLOP':>9} {'saved MiB':>10} {'ops':>7} {'syncs':>6}   {'FLOPs':>6} {'saved':>6} {'ops':>6}"
    lines = [head, "-" * len(head)]
    for name, c in rows:
        r = c.ratio(ref)
        lines.append(f"{name[:40]:<40} {c.flops / 1e9:>9.2f} {c.saved_bytes / 2**20:>10.1f} {c.ops:>7d} "
                     f"{c.host_syncs:>6d}   {r['flops']:>5.2f}x {r['saved_bytes']:>5.2f}x {r['ops']:>5.2f}x")
    return "\n".join(lines)
