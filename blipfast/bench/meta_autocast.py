"""Counting a step under autocast on meta tensors, and HF's SDPA calls as a GPU runs them.

``torch.autocast`` has no meta device, and on meta tensors ``F.scaled_dot_product_attention`` decomposes into its
math path (materialised probabilities). :class:`meta_autocast` is a ``TorchFunctionMode`` for counting a training
step on meta tensors (blipfast/bench/counting.py) as it runs on a GPU under ``torch.autocast("cuda", dtype)``:

- it applies autocast's CUDA cast policy (``aten/src/ATen/autocast_mode.cpp``) to the functions it sees: the
  "lower precision" ones (``linear``, ``matmul``, ``conv2d``, ``bmm``, ``einsum``, SDPA, ...) get their float32
  tensor arguments cast to ``dtype``, the "fp32" ones (``layer_norm``, ``cross_entropy``, ``exp``, ``pow``, ...)
  their 16-bit ones cast to float32, and ``softmax`` / ``log_softmax`` / ``sum`` / ``cumsum`` of 16-bit tensors
  compute in float32. The casts are ordinary ``Tensor.to`` calls that autograd records, as autocast's own are:
  the same tensors are saved for the backward (bf16 copies of the fp32 weights of a GEMM included);
- ``F.scaled_dot_product_attention`` on meta tensors runs the memory-efficient kernel that CUDA picks for it
  (FlashAttention's saved set is the same: q, k, v, the output and the log-sum-exp), as blipfast's ``sdpa`` does;
- a mode sees Python-level calls, also inside ``autograd.Function.forward`` and under ``torch.utils.checkpoint``'s
  recomputation; an op called from C++ (the backward formulas) is not cast again, as under autocast, where a
  backward runs in the dtypes of its forward.

``policy="cpu"`` applies the CPU lists instead (no float32 ``layer_norm``), so that a test can hold the emulation
to PyTorch's real CPU autocast. Keep the mode on for forward and backward (checkpointing recomputes in the
backward and checks that the recomputed tensors match the saved ones).
"""
from __future__ import annotations

import torch
from torch.autograd.graph import _engine_run_backward
from torch.overrides import TorchFunctionMode

from ..ops import _common

_LOWER_COMMON = {"linear", "conv1d", "conv2d", "conv3d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm",
                 "baddbmm", "addbmm", "prelu", "scaled_dot_product_attention", "conv_transpose1d",
                 "conv_transpose2d", "conv_transpose3d"}
_POLICIES = {
    "cuda": dict(
        lower=_LOWER_COMMON | {"einsum", "mv", "addmv", "addr", "chain_matmul",
                               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"},
        fp32={"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
              "sinh", "tan", "pow", "__pow__", "softplus", "layer_norm", "native_layer_norm", "group_norm",
              "cosine_similarity", "nll_loss", "cross_entropy", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
              "mse_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp"},
        fp32_opt_dtype={"softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod"}),
    "cpu": dict(
        lower=_LOWER_COMMON,
        fp32={"nll_loss", "cross_entropy", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div",
              "binary_cross_entropy_with_logits", "cdist", "prod"},
        fp32_opt_dtype=set()),
}


def _name(func) -> str:
    return getattr(func, "__name__", "").split(".")[0]


def _cast(x, dtype: torch.dtype, device_type: str):
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and x.dtype != torch.float64 and x.dtype != dtype and x.device.type == device_type:
            return x.to(dtype)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype, device_type) for v in x)
    return x


def _efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention on meta tensors as CUDA's memory-efficient kernel runs it."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask,
                                                                                                  float("-inf"))
        bias = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, need_lse, dropout_p, is_causal,
                                                                  scale=scale)[0]


class meta_autocast(TorchFunctionMode):
    """Autocast's cast policy (``policy``: "cuda" or "cpu") in ``dtype`` for the float tensors on ``device_type``
    (meta: the tensors of a counted step), and CUDA's SDPA kernel for meta tensors; ``dtype=None`` only the
    latter. See the module doc."""

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16, *, policy: str = "cuda", device_type: str = "meta"):
        super().__init__()
        if policy not in _POLICIES:
            raise ValueError(f"meta_autocast: policy must be one of {sorted(_POLICIES)}, got {policy!r}")
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"meta_autocast: dtype must be torch.bfloat16, torch.float16 or None, got {dtype}")
        self.dtype, self.device_type = dtype, device_type
        self.policy = _POLICIES[policy]

    def __enter__(self):
        # blipfast's linear ops pick their GEMM dtype from autocast's state, which meta tensors lack: tell them
        # (a stack: the mode re-enters itself around the backward)
        rules = _common.dispatch_rules(autocast_dtype=self._autocast_dtype)
        rules.__enter__()
        self.__dict__.setdefault("_rules", []).append(rules)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._rules.pop().__exit__(*exc)

    def _autocast_dtype(self, device, *, default):
        return self.dtype if device.type == self.device_type else default(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        dev = self.device_type
        if self.dtype is not None:
            to = self.dtype if name in self.policy["lower"] else torch.float32 if name in self.policy["fp32"] else None
            if to is not None:
                args, kwargs = _cast(args, to, dev), {k: _cast(v, to, dev) for k, v in kwargs.items()}
            elif name in self.policy["fp32_opt_dtype"] and kwargs.get("dtype") is None and args and \
                    isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.bfloat16, torch.float16) and \
                    args[0].device.type == dev:
                kwargs = {**kwargs, "dtype": torch.float32}
        if func is torch.Tensor.backward and len(args) == 1 and not any(kwargs.values()) and args[0].numel() == 1:
            # ``loss.backward()``: a mode is off inside its own handler, and torch.autograd.backward would hand it
            # back here; run the engine with the mode on, so that checkpointing recomputes under it
            with self:
                _engine_run_backward((args[0],), (torch.ones_like(args[0]),), False, False, (),
                                     allow_unreachable=True, accumulate_grad=True)
            return None
        if name == "scaled_dot_product_attention" and args and isinstance(args[0], torch.Tensor) and \
                args[0].device.type == "meta":
            return _efficient_sdpa(*args, **kwargs)
        return func(*args, **kwargs)
