"""The fused ops of blipfast, each with its pure-PyTorch reference (``<op>_ref``) beside it.

Every op validates its arguments once in Python, dispatches to the fastest backend for the device
(``backend=`` or ``BLIPFAST_BACKEND`` force one: "cuda", "triton", "torch") and is a torch.library
custom op with a fake implementation, so torch.compile(fullgraph=True) and CUDA graphs see through it.
``concat_linear``, ``gelu_mlp`` and ``linear_cross_entropy`` have one backend (PyTorch inside the custom op):
what they change is what the backward keeps in memory.

Also here: ``dropout_seeds`` (the models' dropout seeds from one draw), ``no_autocast`` (a context with autocast
off on a device), ``sdpa`` (scaled-dot-product attention, counted as CUDA runs it on meta tensors) and
``check_seed`` (a random-draw seed as the ops take it: an int or an int64 tensor, validated, as a [1] tensor).
"""
from ._common import check_seed, dropout_seeds, no_autocast, sdpa
from .concat_linear import concat_linear, concat_linear_ref
from .cross_attention import cross_attention, cross_attention_ref
from .gelu_mlp import gelu_mlp, gelu_mlp_ref
from .hard_negatives import sample_hard_negatives, sample_hard_negatives_from_gathered, sample_hard_negatives_ref
from .itc_loss import itc_loss, itc_loss_from_gathered, itc_loss_ref
from .layernorm_epilogue import bias_dropout_add_layernorm, bias_dropout_add_layernorm_ref
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .qformer_attention import MODES, qformer_attention, qformer_attention_ref

__all__ = [
    "MODES",
    "bias_dropout_add_layernorm",
    "bias_dropout_add_layernorm_ref",
    "check_seed",
    "concat_linear",
    "concat_linear_ref",
    "cross_attention",
    "cross_attention_ref",
    "dropout_seeds",
    "gelu_mlp",
    "gelu_mlp_ref",
    "itc_loss",
    "itc_loss_from_gathered",
    "itc_loss_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "no_autocast",
    "qformer_attention",
    "qformer_attention_ref",
    "sample_hard_negatives",
    "sample_hard_negatives_from_gathered",
    "sample_hard_negatives_ref",
    "sdpa",
]
