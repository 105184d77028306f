"""The fused ops of blipfast, each with its pure-PyTorch reference (``<op>_ref``) beside it.

Every op validates its arguments once in Python, dispatches to the fastest backend for the device
(``backend=`` or ``BLIPFAST_BACKEND`` force one: "cuda", "triton", "torch") and is a torch.library
custom op with a fake implementation, so torch.compile(fullgraph=True) and CUDA graphs see through it.
"""
from ._common import dropout_seeds
from .cross_attention import cross_attention, cross_attention_ref
from .hard_negatives import sample_hard_negatives, sample_hard_negatives_from_gathered, sample_hard_negatives_ref
from .itc_loss import itc_loss, itc_loss_from_gathered, itc_loss_ref
from .layernorm_epilogue import bias_dropout_add_layernorm, bias_dropout_add_layernorm_ref
from .qformer_attention import MODES, qformer_attention, qformer_attention_ref

__all__ = [
    "MODES",
    "bias_dropout_add_layernorm",
    "bias_dropout_add_layernorm_ref",
    "cross_attention",
    "dropout_seeds",
    "cross_attention_ref",
    "itc_loss",
    "itc_loss_from_gathered",
    "itc_loss_ref",
    "qformer_attention",
    "qformer_attention_ref",
    "sample_hard_negatives",
    "sample_hard_negatives_from_gathered",
    "sample_hard_negatives_ref",
]
