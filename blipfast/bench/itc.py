"""Benchmark cases of the fused ITC loss + hard-negative sampling (issue 4) for ``blipfast bench`` and
benchmarks/test_itc.py.

Shape (issue 4): B = 128 local rows, BW = 1024 and 8192 gathered rows simulated on one GPU (the local
rows are rows 0..B-1 of the gathered features, which is what rank 0 of a W = BW / B job sees), Q = 32
queries, E = 256, bf16 features, temperature 0.07, label smoothing 0.1.

Group "itc fwd+bwd+sample": one training step's ITC work: forward, backward to the local image/text
features and the temperature, and one hard negative per row in both directions.
  blipfast                  ops.itc_loss_from_gathered (Triton kernels, no [B, BW, Q] tensor) and
                            ops.sample_hard_negatives_from_gathered (CUDA Gumbel-max kernel when
                            blipfast._C is built, else the torch reference; no host sync either way)
  reference (LAVIS)         the similarities materialised as [B, BW, Q] in the features' dtype (einsum,
                            one GEMM per direction; LAVIS' broadcasting matmul would also copy the inputs
                            to [B, BW, Q, E], so this baseline is the faster form of it), max over Q, /temp,
                            F.cross_entropy(label_smoothing=0.1), autograd; then LAVIS' sampling: softmax
                            of the logits with the own pair at -10000 and a Python loop of
                            ``torch.multinomial(w[b], 1).item()`` per row and direction (2B host syncs)
  torch.compile(reference)  the same loss and sampling weights under torch.compile, batched
                            ``torch.multinomial(w, 1)`` (no host sync)
Group "hard-negative sampling" (not in quick mode): the three samplers alone on fixed logits.

flops = 8 * B * BW * Q * E (forward: two similarity GEMMs of 2 * B * BW * Q * E; backward: two of the
same size, counted dense). bytes = what must move at least: the gathered features read in the forward
and again in the backward, 2 * (BW * Q * E + BW * E) * itemsize, plus the fp32 logits written once and
read once per direction, 4 * B * BW * 4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .common import Case

B, Q, E = 128, 32, 256
TEMP = 0.07


def _features(bw, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    img_all = F.normalize(torch.randn(bw, Q, E, generator=g), dim=-1).to(device=device, dtype=dtype)
    txt_all = F.normalize(torch.randn(bw, E, generator=g), dim=-1).to(device=device, dtype=dtype)
    img = img_all[:B].clone().requires_grad_()
    txt = txt_all[:B].clone().requires_grad_()
    temp = torch.tensor(TEMP, device=device, requires_grad=True)
    return img, txt, img_all, txt_all, temp


def _reference_loss(img, txt, img_all, txt_all, temp, targets):
    s_i2t = torch.einsum("bqe,je->bjq", img, txt_all).max(-1).values / temp
    s_t2i = torch.einsum("be,jqe->bjq", txt, img_all).max(-1).values / temp
    loss = (F.cross_entropy(s_i2t.float(), targets, label_smoothing=0.1)
            + F.cross_entropy(s_t2i.float(), targets, label_smoothing=0.1)) / 2
    return loss, s_i2t, s_t2i


def _lavis_weights(s, b):
    """softmax with the own pair at -10000 (rank 0: local row b is global column b)."""
    own = torch.arange(s.shape[1], device=s.device).view(1, -1) == torch.arange(b, device=s.device).view(-1, 1)
    return torch.softmax(s.detach().float().masked_fill(own, -10000.0), dim=1)


def _lavis_loop_sample(w_i2t, w_t2i):
    """LAVIS: one multinomial and one .item() (a host sync) per row and direction."""
    neg_image = [torch.multinomial(w_t2i[b], 1).item() for b in range(w_t2i.shape[0])]
    neg_text = [torch.multinomial(w_i2t[b], 1).item() for b in range(w_i2t.shape[0])]
    return neg_text, neg_image


def _compiled_step_fn():
    def loss_and_weights(img, txt, img_all, txt_all, temp, targets):
        loss, s_i2t, s_t2i = _reference_loss(img, txt, img_all, txt_all, temp, targets)
        return loss, _lavis_weights(s_i2t, img.shape[0]), _lavis_weights(s_t2i, img.shape[0])

    return torch.compile(loss_and_weights, dynamic=False)


def _step_cases(bw, device, dtype, compiled):
    img, txt, img_all, txt_all, temp = _features(bw, device, dtype)
    targets = torch.arange(B, device=device)
    group = f"itc fwd+bwd+sample B={B} BW={bw} Q={Q} E={E} {str(dtype).replace('torch.', '')}"
    params = dict(B=B, BW=bw, Q=Q, E=E, dtype=str(dtype), label_smoothing=0.1)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    flops = 8.0 * B * bw * Q * E
    nbytes = 2.0 * (bw * Q * E + bw * E) * itemsize + 4.0 * B * bw * 4

    def blipfast():
        loss, s_i2t, s_t2i = ops.itc_loss_from_gathered(img, txt, img_all, txt_all, temp, return_logits=True)
        torch.autograd.grad(loss, [img, txt, temp])
        return ops.sample_hard_negatives_from_gathered(s_i2t, s_t2i)

    def reference():
        loss, s_i2t, s_t2i = _reference_loss(img, txt, img_all, txt_all, temp, targets)
        torch.autograd.grad(loss, [img, txt, temp])
        return _lavis_loop_sample(_lavis_weights(s_i2t, B), _lavis_weights(s_t2i, B))

    def compiled_reference():
        loss, w_i2t, w_t2i = compiled(img, txt, img_all, txt_all, temp, targets)
        torch.autograd.grad(loss, [img, txt, temp])
        return torch.multinomial(w_i2t, 1).squeeze(1), torch.multinomial(w_t2i, 1).squeeze(1)

    from .._ext import cuda_extension_available

    sampler = "cuda" if (device.type == "cuda" and cuda_extension_available()) else "torch"
    return [
        Case(group, "blipfast", blipfast, flops, nbytes, False, dict(params, sampler=sampler)),
        Case(group, "reference (LAVIS loop)", reference, flops, nbytes, True, params),
        Case(group, "torch.compile(reference)", compiled_reference, flops, nbytes, True, params,
             optional="torch.compile (Inductor with Triton) does not work on this torch/device"),
    ]


def _sampling_cases(bw, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    s_i2t = (torch.randn(B, bw, generator=g) * 3).to(device)
    s_t2i = (torch.randn(B, bw, generator=g) * 3).to(device)
    group = f"hard-negative sampling B={B} BW={bw}"
    params = dict(B=B, BW=bw)
    nbytes = 2.0 * B * bw * 4

    def blipfast():
        return ops.sample_hard_negatives_from_gathered(s_i2t, s_t2i)

    def loop():
        return _lavis_loop_sample(_lavis_weights(s_i2t, B), _lavis_weights(s_t2i, B))

    def batched():
        return (torch.multinomial(_lavis_weights(s_i2t, B), 1).squeeze(1),
                torch.multinomial(_lavis_weights(s_t2i, B), 1).squeeze(1))

    return [
        Case(group, "blipfast", blipfast, None, nbytes, False, params),
        Case(group, "LAVIS multinomial loop", loop, None, nbytes, True, params),
        Case(group, "batched multinomial", batched, None, nbytes, True, params),
    ]


def cases(device, dtype=torch.bfloat16, quick=False) -> list[Case]:
    """ITC cases on ``device``; [] without CUDA (the Triton kernels need a GPU outside the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    compiled = _compiled_step_fn()  # one compiled function; it recompiles once per shape
    out = []
    for bw in ((8192,) if quick else (1024, 8192)):
        out += _step_cases(bw, device, dtype, compiled)
    if not quick:
        for bw in (1024, 8192):
            out += _sampling_cases(bw, device)
    return out
