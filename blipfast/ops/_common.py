"""Shared plumbing of the ops: backend resolution and argument validation.

Backends: "cuda" (CUDA C++ in blipfast._C), "triton" (blipfast.kernels) and "torch" (the pure-PyTorch
reference). ``backend=`` forces one and raises if the op or the device cannot run it; the environment
variable ``BLIPFAST_BACKEND`` states a preference that falls back to automatic dispatch when the op or
device cannot honour it; automatic dispatch takes the op's fastest backend for the device and the
reference everywhere else, so it never fails on a CPU. With ``TRITON_INTERPRET=1`` the Triton backend
also accepts CPU tensors (that is how CI tests the kernels).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterable, Sequence

import torch

BACKENDS = ("cuda", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# dtypes the fused (cuda/triton) kernels take; float64 runs on the reference only (tests use it as ground truth)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the ops accumulate in: fp64 for fp64 inputs (the references' ground truth), else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _probe_extension() -> bool:
    from .._ext import cuda_extension_available

    return cuda_extension_available()


# What is installed is decided once, at import: resolve_backend runs inside traced code (torch.compile with
# fullgraph=True, CUDA-graph capture) and must be plain Python over constants there (an import or an
# lru_cache'd loader would break the graph). Tests that need another answer monkeypatch these two names.
TRITON_OK: bool = _probe_triton()
EXTENSION_OK: bool = _probe_extension()


def triton_available() -> bool:
    return TRITON_OK


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _runnable(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    if backend == "torch":
        return True
    if dtype is not None and dtype not in FUSED_DTYPES:
        return False
    if backend == "triton":
        return TRITON_OK and (device.type == "cuda" or triton_interpret())
    if backend == "cuda":
        return device.type == "cuda" and EXTENSION_OK
    return False


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts to on ``device``, or None where autocast is off (or does not exist)."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class dispatch_rules:
    """Context manager: ``resolve_backend`` and ``dropout_seeds`` follow ``is_cuda(device)`` ("dispatch as on a
    CUDA device") and ``runnable(backend, device, dtype)`` ("can this backend run here"), and the linear ops'
    GEMM dtype follows ``autocast_dtype(device)`` ("autocast's dtype there, or None"), instead of the rules above,
    until it exits; a rule left None stays as it was. A normal run never installs one: the dispatch reads the
    device, the probes and autocast's state and nothing else. blipfast.bench.counting installs rules under which
    meta tensors dispatch as CUDA tensors, and blipfast.bench.meta_autocast one under which they are autocast, to
    count the cost of the GPU path without a GPU. Each rule gets the rule it replaces as ``default=``."""

    _NAMES = ("_is_cuda", "_runnable", "_autocast_dtype")

    def __init__(self, is_cuda=None, runnable=None, autocast_dtype=None):
        self._rules = (is_cuda, runnable, autocast_dtype)

    def __enter__(self):
        g = globals()
        self._prev = tuple(g[n] for n in self._NAMES)
        for name, rule, prev in zip(self._NAMES, self._rules, self._prev):
            if rule is not None:
                g[name] = functools.partial(rule, default=prev)
        return self

    def __exit__(self, *exc):
        globals().update(zip(self._NAMES, self._prev))
        return False


# The first-use self-test (docs/selftest.md): before automatic dispatch (or BLIPFAST_BACKEND) sends an op to a fast
# backend for the first time, FIRST_USE(op, backend, device, dtype) -> bool checks that backend against the
# reference on the device (once per process and device, its verdict cached on disk) and adds a failing
# (op, backend, dtype) to DISABLED; the dispatch then takes the next backend. blipfast.selftest installs the hook (the
# ops import nothing above them) and fills the set. While torch.compile traces (and in a CUDA-graph capture, which
# the hook declines) the dispatch reads DISABLED and nothing else: plain Python over constants, no graph break.
# backend= is never checked: forcing a backend is how the self-test itself reaches the kernels.
DISABLED: set = set()
FIRST_USE = None


def _trusted(op: str, backend: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    if (op, backend, dtype) in DISABLED:
        return False
    if backend == "torch" or FIRST_USE is None or torch.compiler.is_compiling():
        return True
    return FIRST_USE(op, backend, device, dtype)


def resolve_backend(op: str, backend: str | None, device: torch.device, supported: Sequence[str],
                    dtype: torch.dtype | None = None) -> str:
    """Pick the backend for ``op`` on ``device``; ``supported`` lists the op's backends, fastest first.
    ``dtype`` is the inputs' dtype (the fused backends take fp32/fp16/bf16, the reference also fp64). A backend
    that failed its first-use self-test for the op and dtype is skipped unless forced."""
    if backend is not None:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend not in supported:
            raise ValueError(f"{op}: backend {backend!r} is not implemented for this op (has {tuple(supported)})")
        if dtype is not None and backend != "torch" and dtype not in FUSED_DTYPES:
            raise ValueError(f"{op}: backend {backend!r} takes float32, float16 or bfloat16 inputs, got {dtype}; "
                             f"use backend='torch' for {dtype}")
        if not _runnable(backend, device):
            raise ValueError(f"{op}: backend {backend!r} cannot run on a {device.type} tensor here "
                             f"(needs {'a CUDA device and blipfast._C' if backend == 'cuda' else 'a CUDA device or TRITON_INTERPRET=1'})")
        return backend
    env = os.environ.get("BLIPFAST_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"BLIPFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env in supported and _runnable(env, device, dtype) and _trusted(op, env, device, dtype):
            return env
    if _is_cuda(device):
        for cand in supported:
            if _runnable(cand, device, dtype) and _trusted(op, cand, device, dtype):
                return cand
    return "torch"


# ----------------------------------------------------------------------------------------------
# validation: called once per op call in Python; kernels assume valid input


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
                 device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    return t


def check_shape(op: str, name: str, t: torch.Tensor, shape: Sequence[int | None]) -> None:
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dts = {n: t.dtype for n, t in tensors.items()}
    if len(set(dts.values())) > 1:
        desc = ", ".join(f"{n}={str(d).replace('torch.', '')}" for n, d in dts.items())
        raise TypeError(f"{op}: {', '.join(dts)} must share one dtype, got {desc}")


def check_inner_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must be contiguous in its last dimension (stride {t.stride(-1)}); "
                         f"call .contiguous() first")


def check_probability(op: str, name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1), got {p}")
    return p


def check_positive_float(op: str, name: str, x, allow_none: bool = True):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(x).__name__}")
    x = float(x)
    if not x > 0.0 or x != x or x == float("inf"):
        raise ValueError(f"{op}: {name} must be a finite positive float, got {x}")
    return x


def check_unit_interval(op: str, name: str, x) -> float:
    """A float in [0, 1] (e.g. label smoothing)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(x).__name__}")
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1], got {x}")
    return x


def check_positive_int(op: str, name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {x}")
    return x


def gemm_dtype(op: str, device: torch.device, **tensors) -> torch.dtype:
    """The dtype that ``F.linear`` over ``tensors`` (None entries skipped) computes in: autocast's where autocast is
    on for ``device`` (it casts every floating-point tensor but float64 to it), else the tensors' own, which must be
    one. The linear ops (concat_linear, gelu_mlp, linear_cross_entropy) run their GEMMs, forward and backward, in it
    and return each gradient in its input's dtype, as autocast's own ``linear`` does."""
    cast = _autocast_dtype(device)
    on = cast is not None
    given = {n: t.dtype for n, t in tensors.items() if t is not None}
    got = {cast if cast is not None and d != torch.float64 else d for d in given.values()}
    if len(got) > 1:
        desc = ", ".join(f"{n}={str(d).replace('torch.', '')}" for n, d in given.items())
        rule = " (autocast casts all but float64)" if on else " (or run under autocast)"
        raise TypeError(f"{op}: {', '.join(given)} must share one dtype{rule}, got {desc}")
    return got.pop()


def as_key_padding_mask(op: str, name: str, mask, shape: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """Validate a [.., Lk] bool or 0/1 integer/float mask (true = attend) and return it as bool."""
    if mask is None:
        return None
    check_tensor(op, name, mask, dtypes=None, device=device)
    check_shape(op, name, mask, shape)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return mask != 0
    raise TypeError(f"{op}: {name} must be bool or a 0/1 integer or float tensor, got {mask.dtype}")


def check_seed(op: str, seed, device: torch.device) -> torch.Tensor | None:
    """A seed of a random draw (dropout, the negatives) as the ops take it: None, a Python int that fits int64, or an
    int64 tensor with one element on the inputs' ``device``; returned as an int64 [1] tensor (None stays None), a
    ValueError / TypeError naming ``op`` otherwise."""
    if seed is None:
        return None
    if isinstance(seed, int) and not isinstance(seed, bool):
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"{op}: seed must fit in int64, got {seed}")
        # a fill kernel with the value as its argument: no host-to-device copy, capturable in a CUDA graph
        return torch.full((1,), seed, dtype=torch.int64, device=device)
    check_tensor(op, "seed", seed, dtypes=(torch.int64,), device=device)
    if seed.numel() != 1:
        raise ValueError(f"{op}: seed must have exactly one element, got shape {tuple(seed.shape)}")
    return seed if seed.shape == (1,) else seed.reshape(1)


def dropout_seeds(n: int, device: torch.device) -> tuple:
    """n dropout seeds for the n dropout sites of a model's forward, from ONE draw of torch's RNG on the device
    (one randint instead of one per site; each seed is a [1] view). Only where the fused backends run (CUDA):
    elsewhere n Nones, so that the reference backend keeps torch's own dropout (its Philox rule is slow on a CPU)."""
    if not _is_cuda(device) or n == 0:
        return (None,) * n
    return torch.randint(0, 2**62, (n, 1), device=device, dtype=torch.int64).unbind(0)


def check_gathered(op: str, rank, b: int, bw: int, image_ids, image_ids_all, device) -> None:
    """Arguments of the ``*_from_gathered`` variants: this rank's row block [rank * B, rank * B + B) must lie
    in the BW gathered rows, and ``image_ids_all`` [BW] comes with ``image_ids``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank * b <= bw - b:
        raise ValueError(f"{op}: rank must be an int with rank * B + B <= BW ({b}, {bw}), got {rank!r}")
    if (image_ids is None) != (image_ids_all is None):
        raise ValueError(f"{op}: pass image_ids and image_ids_all together")
    if image_ids_all is not None:
        check_tensor(op, "image_ids_all", image_ids_all, dtypes=(torch.int64, torch.int32), device=device)
        check_shape(op, "image_ids_all", image_ids_all, (bw,))


def check_positive_finite_scalar(op: str, name: str, t: torch.Tensor) -> None:
    """A one-element tensor (a learnable scalar such as a temperature) must be finite and > 0.

    Eager on a CPU tensor: a ValueError naming it. Elsewhere (CUDA, meta, or while torch.compile traces)
    reading the value would be a host sync or a graph break, so the check is ``torch._assert_async`` on
    the device, with a message naming it: no sync, capturable in a CUDA graph; on CUDA a violation is a
    device-side assert (reported at the next synchronisation), under torch.compile on a CPU a RuntimeError.
    """
    ok = ((t > 0) & (t < float("inf"))).reshape(())  # NaN fails both
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_fake(t):
        if not bool(ok):
            raise ValueError(f"{op}: {name} must be finite and > 0, got {float(t.detach().reshape(()))}")
        return
    torch._assert_async(ok, f"{op}: {name} must be finite and > 0")


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def check_index_range(op: str, name: str, index: torch.Tensor, upper: int, what: str,
                      ignore: int | None = None) -> None:
    """Every value of the integer tensor ``index`` must lie in [0, upper) (``what`` says what ``upper`` is), or
    equal ``ignore`` where that is given (e.g. -100, the ignored target of a cross-entropy).

    Eager on a CPU tensor: a ValueError naming the argument and the first bad value. On CUDA, and whenever
    torch.compile traces the call, a ``torch._assert_async`` instead: no host synchronisation, valid under
    CUDA-graph capture and without a graph break; the device raises it at the next synchronisation. The
    kernels never read or write out of bounds either way (they skip out-of-range entries)."""
    if index.numel() == 0:
        return
    msg = f"{op}: {name} values must be in [0, {upper}) ({what})"
    if ignore is not None:
        msg += f" or {ignore}"
    ok = (index >= 0) & (index < upper)
    if ignore is not None:
        ok = ok | (index == ignore)
    if index.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_fake(index):
        if not bool(ok.all()):
            pos = int((~ok).nonzero()[0, 0])
            raise ValueError(f"{msg}, got {int(index[pos])} at position {pos}")
        return
    torch._assert_async(ok.all(), msg)


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0):
    """``F.scaled_dot_product_attention`` on [B, H, L, D]; on meta tensors (counting the GPU path, see
    blipfast.bench.counting) the memory-efficient kernel that CUDA runs for it, which PyTorch would otherwise
    decompose into its math path there (materialised probabilities)."""
    import torch.nn.functional as F

    if q.device.type != "meta":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    bias = None if attn_mask is None else attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p)[0]



def no_autocast(device: torch.device):
    """A context with autocast off on ``device`` (a null context where it is off already, or where autocast does not
    exist, e.g. meta tensors). For the custom ops' implementations: autocast passes a custom op through with its
    inputs as they are, but the torch ops inside an implementation would be autocast again (the reference backend's
    einsum and matmuls in bf16 where the kernels compute in fp32); with it an op computes in its own accumulation
    dtype on every backend, as its contract says. The models use it for what must stay fp32 under autocast."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
