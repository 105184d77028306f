"""``blipfast train --fsdp``: the model sharded over the ranks with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``) instead of replicated by DDP; docs/fsdp.md.

Units (:func:`fsdp_units`): every block of every stack of transformer layers the model holds (the ViT's encoder
layers, the LLM's decoder / encoder layers: OPT ``decoder.layers``, T5 ``encoder.block`` and
``decoder.block``), found generically as the items of an ``nn.ModuleList`` of one class, innermost first; then the
root, which holds the rest (embeddings, norms, heads, queries, projections, and the Q-Former, whose cross-attention
K/V weights of all layers go into one GEMM outside the layers' forward) and is gathered for the whole step.
A unit's parameters (frozen or trained, any dtype) are sharded on dim 0 over the ranks; the optimizer is built
over the sharded parameters, so the AdamW states are sharded too; the frozen LLM's layers are gathered one at a
time in the forward and backward.

Mixed precision (:func:`wrap`): with ``--precision bf16`` FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` (the gathers move bf16, the gradients are reduced in fp32 into the fp32 master shards), the
run's autocast kept around the step as without ``--fsdp``.

Checkpoints (:func:`save_sharded`, :func:`load_sharded`, :func:`full_weights`): a checkpoint folder holds the
``torch.distributed.checkpoint`` (DCP) files (``.metadata`` and one ``__<rank>_0.distcp`` per rank: the trained
weights, the buffers and the optimizer state, keyed by parameter name, so a run resumes exactly and DCP re-shards
when the world size changes), beside the usual consolidated ``model.safetensors`` (rank 0 gathers the trained
weights to the CPU and the task writes them from a meta-device copy of the model's structure, so ``--init``,
``blipfast eval`` and ``--save-lavis`` read it as any other checkpoint) and ``state.pt`` (schedule, RNGs, data
position; no optimizer: it is in the DCP files). Frozen parameters are in neither: they come from their own files
(``--llm``, ``--vision``) on every rank.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

__all__ = ["TASKS", "Skeleton", "check_run", "clip_grad_norm", "fsdp_units", "full_weights", "load_sharded",
           "reduce_replicated", "save_sharded", "split_replicated", "wrap"]

#: the tasks ``--fsdp`` trains (BLIP v1's momentum encoders and queues are updated outside the forward)
TASKS = ("blip2-stage1", "blip2-stage2", "blip2-caption", "blip2-retrieval", "blip2-vqa")


def fsdp_units(model: nn.Module) -> list:
    """The ``(name, module)`` units FSDP2 shards one by one in ``model`` (the root excluded), innermost first:
    each item of every ``nn.ModuleList`` whose items are all of one class and hold parameters (a stack of
    transformer layers), except in blipfast's :class:`~blipfast.models.qformer.QFormer`, whose ``image_kv``
    projects the image K/V of every cross-attention layer in one GEMM outside the layers' forward: its layers stay
    in the root's group (sharded at rest like every parameter, gathered once per step). TypeError when ``model``
    is not a module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fsdp_units: model must be a torch.nn.Module, got {type(model).__name__}")
    from ..models.instructblip import InstructBlipQFormer
    from ..models.qformer import QFormer

    # by identity: InstructBLIP's Q-Former lists its QFormer's layers under HF's names
    whole = {id(m) for q in model.modules() if isinstance(q, (QFormer, InstructBlipQFormer)) for m in q.modules()}
    units, seen = [], set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or any(id(m) in whole for m in (mod, *mod)):
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) != 1 or not all(any(True for _ in m.parameters()) for m in mod):
            continue
        for i, m in enumerate(mod):
            if id(m) not in seen:
                seen.add(id(m))
                units.append((f"{name}.{i}" if name else str(i), m))
    # fully_shard goes bottom-up: a unit inside other units (a stack nested in a block) before them
    names = [n for n, _ in units]
    nesting = {n: sum(n.startswith(o + ".") for o in names) for n in names}
    return sorted(units, key=lambda u: -nesting[u[0]])


def check_run(cfg: dict, given: dict, world: int, log) -> None:
    """What ``--fsdp`` needs of the run beyond :func:`blipfast.train.config.validate`'s checks: torchrun with 2 or
    more processes (ValueError), and no evaluation during training (decoding runs outside the sharded forward): an
    explicit ``--eval-every`` is refused, the task's default turned off (and ``log`` says so)."""
    if world < 2:
        raise ValueError("--fsdp shards the model over the processes of torchrun: start the run with torchrun "
                         "--nproc-per-node N (N >= 2, over one or more nodes; docs/fsdp.md), or leave out --fsdp")
    if not cfg["eval_every"]:
        return
    if "eval_every" in given:
        raise ValueError("--fsdp does not support --eval-every (decoding runs outside the sharded forward); each "
                         "checkpoint's model.safetensors is consolidated, an --init of its own (docs/fsdp.md)")
    cfg["eval_every"] = 0
    log("blipfast train: --fsdp: no evaluation during training (the task's --eval-every); each checkpoint's "
        "model.safetensors is consolidated (docs/fsdp.md)")


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def wrap(model: nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype]) -> list:
    """``fully_shard`` each unit of :func:`fsdp_units`, then the root (in place). ``amp_dtype`` bf16: FSDP2's
    mixed precision (param bf16, reduce fp32); None: fp32 throughout. Returns the parameters left replicated:
    the scalars (FSDP2 shards no 0-d tensor: BLIP-2's ``temp``), whose gradients :func:`reduce_replicated`
    averages."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    replicated = [p for p in model.parameters() if p.dim() == 0]
    kw = {"mesh": _mesh(device), "ignored_params": set(replicated)}
    if amp_dtype == torch.bfloat16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for _, unit in fsdp_units(model):
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    return replicated


def split_replicated(optimizer, replicated: list) -> None:
    """Move the replicated parameters into param groups of their own (the same settings): a fused or foreach
    AdamW (CUDA) steps a group's tensors in one call, which cannot mix sharded (DTensor) and plain tensors."""
    ids = {id(p) for p in replicated}
    extra = []
    for g in optimizer.param_groups:
        mine = [p for p in g["params"] if id(p) in ids]
        if mine and len(mine) < len(g["params"]):
            g["params"] = [p for p in g["params"] if id(p) not in ids]
            extra.append({**g, "params": mine})
    for g in extra:
        optimizer.add_param_group(g)


def reduce_replicated(params: list) -> None:
    """Average the gradients of the replicated parameters over the ranks (what DDP does; no host sync)."""
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded (DTensor) and replicated gradients together: the norm of
    every gradient of the whole model, each shard counted once (the shards' squared norms summed over the ranks in
    one all-reduce); returns it."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    zero = torch.zeros((), dtype=torch.float32, device=local[0].device if local else None)
    sq = [torch.linalg.vector_norm(t, dtype=torch.float32) ** 2 for t in local]
    sharded = sum((q for q, g in zip(sq, grads) if isinstance(g, DTensor)), zero)
    torch.distributed.all_reduce(sharded)
    whole = sum((q for q, g in zip(sq, grads) if not isinstance(g, DTensor)), zero)
    total = (sharded + whole).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for t in local:
        t.mul_(coef.to(t.dtype))
    return total


class Skeleton:
    """A meta-device copy of a model's structure taken before it is sharded (its configs, submodules and weight
    ties; no memory), into which rank 0 puts gathered weights to let a task's ``save`` write a plain module."""

    def __init__(self, model: nn.Module):
        memo = {}
        for t in list(model.parameters()) + list(model.buffers()):
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
        self.model = copy.deepcopy(model, memo)
        ties: dict = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            ties.setdefault(id(p), []).append(name)
        self.ties = [names for names in ties.values() if len(names) > 1]

    def filled(self, state: dict) -> nn.Module:
        """A copy of the structure holding ``state`` (the others stay on the meta device), ties restored."""
        model = copy.deepcopy(self.model)
        # a gathered tensor may view a larger buffer (safetensors refuses those): such ones copied to their own
        state = {k: v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
                 for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        for names in self.ties:
            owner, leaf = _owner(model, names[0])
            p = getattr(owner, leaf)
            for name in names[1:]:
                owner, leaf = _owner(model, name)
                setattr(owner, leaf, p)
        return model


def _owner(model: nn.Module, name: str):
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def full_weights(model: nn.Module) -> dict:
    """The trained weights and buffers, gathered whole onto rank 0's CPU (a collective: every rank calls it;
    the other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def _state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model, options=_options()),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=_options())}


def save_sharded(model: nn.Module, optimizer, folder: str) -> None:
    """Every rank writes its shards of the trained weights and the optimizer state into ``folder`` (DCP)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=folder)


def load_sharded(model: nn.Module, optimizer, folder: str) -> None:
    """Read what :func:`save_sharded` wrote (any world size) into the sharded model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"], options=_options())
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_options())
