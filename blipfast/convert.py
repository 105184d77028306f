"""Hugging Face <-> LAVIS weight mapping for BLIP-2 (docs/semantics.md#weight-names), Hugging Face <-> Salesforce BLIP
(v1) mapping, and safe checkpoint loading.

Key spaces:
- HF: the state dict of ``Blip2ForImageTextRetrieval`` / ``Blip2ForConditionalGeneration`` (``qformer.*``,
  ``embeddings.*``, ``query_tokens``, ``vision_model.*``, ``vision_projection``, ``text_projection``, ``itm_head``,
  ``language_projection``), plus two blipfast names for LAVIS weights HF has no place for:
  ``temp`` (ITC temperature) and ``qformer_lm_head.*`` (LAVIS ``Qformer.cls.predictions.*``: the Q-Former's LM
  head ``transform.dense``, ``transform.LayerNorm``, ``decoder`` and ``bias``).
- LAVIS: ``Qformer.bert.*`` (``attention.self`` where HF says ``attention.attention``; the embeddings LayerNorm
  is HF's ``qformer.layernorm``; word/position embeddings are HF's ``embeddings.*``), ``Qformer.cls.*``,
  ``query_tokens``, ``ln_vision`` (HF ``vision_model.post_layernorm``), ``visual_encoder.*`` (EVA ViT, mapped as
  transformers' own conversion script does), ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``,
  ``opt_proj`` / ``t5_proj`` (HF ``language_projection``).

BLIP (v1), Salesforce names (BLIP repository; LAVIS' BLIP models use the same): ``visual_encoder.*`` (timm
ViT-B/16 or -L: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}``, ``norm``) is HF ``BlipVisionModel`` ``vision_model.*`` as transformers'
convert_blip_original_pytorch_to_hf.py maps it; ``text_encoder.*`` and ``text_decoder.*`` (MED: BERT with
``attention.self``, ``crossattention.self``, ``cls.predictions``) already use HF's ``BlipTextModel`` /
``BlipTextLMHeadModel`` names; ``vision_proj``, ``text_proj``, ``itm_head`` are HF's names too. Beyond HF's
models (blipfast names, kept by the pre-training model): ``temp``, the momentum copies ``visual_encoder_m.*``
(HF space ``vision_model_m.*``), ``text_encoder_m.*``, ``vision_proj_m``, ``text_proj_m``, and the queues
``image_queue``, ``text_queue``, ``idx_queue`` and the pointer (``queue_ptr`` in BLIP_Pretrain, ``ptr_queue`` in
BLIP_Retrieval; each keeps its name); BLIP_NLVR's twin cross-attention (``crossattention.self0`` / ``self1``,
``crossattention.output.dense0`` / ``dense1`` / ``merge_layer``) and ``cls_head`` keep their names too.

Buffers named ``position_ids`` (and a nonzero key third of the ViT's fused qkv bias, see ``hf_to_lavis``) are
dropped on purpose and listed in ``Conversion.dropped``. Every other key that
has no counterpart (the LLM's weights, unknown ViT variants, ...) is returned in ``Conversion.unmapped``, never
silently dropped; ``strict=True`` turns them into a ValueError.

Loading: :func:`load_state_dict` reads any of these files (or takes a state dict); :func:`load_into` is the one
loader of the package: any key space into a module, every key mapped or reported in one error format;
:func:`resolve_source` (:mod:`blipfast.sources`) says what a path a user passed is. Loading never unpickles code:
safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from .files import share
from .sources import CHECKPOINT_DIR, Source, list_checkpoints, resolve_source  # noqa: F401 (the one resolver)

LM_HEAD_PREFIX = "qformer_lm_head."  # blipfast's name for LAVIS ``Qformer.cls.predictions.``

# placeholders of the rename templates below
_PH = {
    "i": r"\d+", "wb": r"weight|bias", "att": r"attention|crossattention", "qkv": r"query|key|value",
    "dl": r"dense|LayerNorm", "emb": r"word_embeddings|position_embeddings",
    "inter": r"intermediate|intermediate_query",
    "out": r"output|output_query", "n": r"1|2", "fc": r"fc1|fc2",
    "head": r"transform\.dense\.(?:weight|bias)|transform\.LayerNorm\.(?:weight|bias)|decoder\.(?:weight|bias)|bias",
    # BLIP (v1): the text models (with their momentum copy), the momentum suffix, the queues
    "med": r"text_encoder|text_encoder_m|text_decoder\.bert", "m": r"|_m",
    "queue": r"image_queue|text_queue|idx_queue|ptr_queue|queue_ptr",
    # BLIP NLVR2 (nlvr_encoder.py): the twin cross-attention, its merge layer, the classification head
    "twin": r"self0|self1", "tdense": r"dense0|dense1|merge_layer", "ci": r"0|2",
}
# (LAVIS template, HF template): one-to-one renames; a placeholder {x} matches _PH[x] and is carried over
_RENAMES = [
    ("Qformer.bert.embeddings.LayerNorm.{wb}", "qformer.layernorm.{wb}"),
    ("Qformer.bert.embeddings.{emb}.weight", "embeddings.{emb}.weight"),
    ("Qformer.bert.encoder.layer.{i}.{att}.self.{qkv}.{wb}", "qformer.encoder.layer.{i}.{att}.attention.{qkv}.{wb}"),
    ("Qformer.bert.encoder.layer.{i}.{att}.output.{dl}.{wb}", "qformer.encoder.layer.{i}.{att}.output.{dl}.{wb}"),
    ("Qformer.bert.encoder.layer.{i}.{inter}.dense.{wb}", "qformer.encoder.layer.{i}.{inter}.dense.{wb}"),
    ("Qformer.bert.encoder.layer.{i}.{out}.{dl}.{wb}", "qformer.encoder.layer.{i}.{out}.{dl}.{wb}"),
    ("Qformer.cls.predictions.{head}", LM_HEAD_PREFIX + "{head}"),
    ("vision_proj.{wb}", "vision_projection.{wb}"),
    ("text_proj.{wb}", "text_projection.{wb}"),
    ("itm_head.{wb}", "itm_head.{wb}"),
    ("temp", "temp"),
    ("query_tokens", "query_tokens"),
    ("ln_vision.{wb}", "vision_model.post_layernorm.{wb}"),
    # EVA ViT, as transformers' convert_blip_2_original_to_pytorch.py maps it (q_bias/v_bias: see below)
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{wb}", "vision_model.embeddings.patch_embedding.{wb}"),
    ("visual_encoder.blocks.{i}.norm{n}.{wb}", "vision_model.encoder.layers.{i}.layer_norm{n}.{wb}"),
    ("visual_encoder.blocks.{i}.attn.qkv.weight", "vision_model.encoder.layers.{i}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{i}.attn.proj.{wb}", "vision_model.encoder.layers.{i}.self_attn.projection.{wb}"),
    ("visual_encoder.blocks.{i}.mlp.{fc}.{wb}", "vision_model.encoder.layers.{i}.mlp.{fc}.{wb}"),
]


# BLIP (v1): (Salesforce template, HF template)
_BLIP_RENAMES = [
    ("{med}.embeddings.{emb}.weight", "{med}.embeddings.{emb}.weight"),
    ("{med}.embeddings.LayerNorm.{wb}", "{med}.embeddings.LayerNorm.{wb}"),
    ("{med}.encoder.layer.{i}.{att}.self.{qkv}.{wb}", "{med}.encoder.layer.{i}.{att}.self.{qkv}.{wb}"),
    ("{med}.encoder.layer.{i}.{att}.output.{dl}.{wb}", "{med}.encoder.layer.{i}.{att}.output.{dl}.{wb}"),
    ("{med}.encoder.layer.{i}.intermediate.dense.{wb}", "{med}.encoder.layer.{i}.intermediate.dense.{wb}"),
    ("{med}.encoder.layer.{i}.output.{dl}.{wb}", "{med}.encoder.layer.{i}.output.{dl}.{wb}"),
    ("{med}.pooler.dense.{wb}", "{med}.pooler.dense.{wb}"),
    ("{med}.encoder.layer.{i}.crossattention.{twin}.{qkv}.{wb}", "{med}.encoder.layer.{i}.crossattention.{twin}.{qkv}.{wb}"),
    ("{med}.encoder.layer.{i}.crossattention.output.{tdense}.{wb}",
     "{med}.encoder.layer.{i}.crossattention.output.{tdense}.{wb}"),
    ("cls_head.{ci}.{wb}", "cls_head.{ci}.{wb}"),
    ("text_decoder.cls.predictions.{head}", "text_decoder.cls.predictions.{head}"),
    ("vision_proj{m}.{wb}", "vision_proj{m}.{wb}"),
    ("text_proj{m}.{wb}", "text_proj{m}.{wb}"),
    ("itm_head.{wb}", "itm_head.{wb}"),
    ("temp", "temp"),
    ("{queue}", "{queue}"),
    # timm ViT -> BlipVisionModel, as transformers' convert_blip_original_pytorch_to_hf.py renames it
    ("visual_encoder{m}.cls_token", "vision_model{m}.embeddings.class_embedding"),
    ("visual_encoder{m}.pos_embed", "vision_model{m}.embeddings.position_embedding"),
    ("visual_encoder{m}.patch_embed.proj.{wb}", "vision_model{m}.embeddings.patch_embedding.{wb}"),
    ("visual_encoder{m}.blocks.{i}.norm{n}.{wb}", "vision_model{m}.encoder.layers.{i}.layer_norm{n}.{wb}"),
    ("visual_encoder{m}.blocks.{i}.attn.qkv.{wb}", "vision_model{m}.encoder.layers.{i}.self_attn.qkv.{wb}"),
    ("visual_encoder{m}.blocks.{i}.attn.proj.{wb}", "vision_model{m}.encoder.layers.{i}.self_attn.projection.{wb}"),
    ("visual_encoder{m}.blocks.{i}.mlp.{fc}.{wb}", "vision_model{m}.encoder.layers.{i}.mlp.{fc}.{wb}"),
    ("visual_encoder{m}.norm.{wb}", "vision_model{m}.post_layernorm.{wb}"),
]


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    rx = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>{_PH[p]})" for n, p in enumerate(parts))
    return re.compile(rx + r"\Z")


_L2H = [(_compile(src), dst) for src, dst in _RENAMES]
_H2L = [(_compile(dst), src) for src, dst in _RENAMES]
_S2H = [(_compile(src), dst) for src, dst in _BLIP_RENAMES]
_H2S = [(_compile(dst), src) for src, dst in _BLIP_RENAMES]
_LAVIS_QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)\Z")
_HF_QKV_BIAS = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias\Z")
_HF_QV_BIAS = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q_bias|v_bias)\Z")  # transformers 4.x
_LAVIS_LM_PROJ = re.compile(r"(opt_proj|t5_proj|llm_proj)\.(weight|bias)\Z")
_HF_LM_PROJ = re.compile(r"language_projection\.(weight|bias)\Z")
_DROPPED = re.compile(r"(.*\.)?position_ids\Z")


@dataclass
class Conversion:
    """Result of a conversion: the converted ``state_dict``, the source keys with no counterpart
    (``unmapped``, with their tensors) and what was dropped on purpose (``dropped``: position_ids buffers, a
    nonzero key third of the ViT qkv bias)."""

    state_dict: dict = field(default_factory=dict)
    unmapped: dict = field(default_factory=dict)
    dropped: list = field(default_factory=list)
    origin: dict = field(default_factory=dict)  # converted key -> the source key it came from

    def check(self) -> "Conversion":
        """Raise ValueError if any key could not be mapped; return self otherwise."""
        if self.unmapped:
            keys = sorted(self.unmapped)
            more = f" ... ({len(keys)} in all)" if len(keys) > 20 else ""
            raise ValueError(f"{len(keys)} key(s) could not be mapped: {keys[:20]}{more}")
        return self


def _rename(sd: Mapping, rules, special: Callable[[str, torch.Tensor, Conversion, dict], bool]) -> Conversion:
    res = Conversion()
    pending: dict = {}
    for key, val in sd.items():
        if _DROPPED.match(key):
            res.dropped.append(key)
            continue
        if special(key, val, res, pending):
            continue
        for pat, tmpl in rules:
            m = pat.match(key)
            if m:
                new = tmpl.format(**m.groupdict())
                res.state_dict[new] = val
                res.origin[new] = key
                break
        else:
            res.unmapped[key] = val
    for key, val in pending.items():  # halves of pairs whose other half never came
        res.unmapped[key] = val
    return res


def lavis_to_hf(state_dict: Mapping[str, torch.Tensor], *, strict: bool = False) -> Conversion:
    """Map a LAVIS BLIP-2 state dict to HF names (see module doc); EVA ViT ``q_bias`` + ``v_bias`` become
    HF's fused ``qkv.bias`` (q | 0 | v), as transformers 5.x stores it."""

    def special(key, val, res, pending):
        m = _LAVIS_QV_BIAS.match(key)
        if m:
            i, which = m.groups()
            other = f"visual_encoder.blocks.{i}.attn.{'v_bias' if which == 'q_bias' else 'q_bias'}"
            if other not in pending:
                pending[key] = val
                return True
            o = pending.pop(other)
            q, v = (val, o) if which == "q_bias" else (o, val)
            fused = torch.cat((q, torch.zeros_like(q), v))  # HF's q | k | v bias; EVA has no key bias
            res.state_dict[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = fused
            res.origin[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = f"visual_encoder.blocks.{i}.attn.q_bias"
            return True
        m = _LAVIS_LM_PROJ.match(key)
        if m:
            res.state_dict[f"language_projection.{m.group(2)}"] = val
            res.origin[f"language_projection.{m.group(2)}"] = key
            return True
        return False

    res = _rename(state_dict, _L2H, special)
    return res.check() if strict else res


def hf_to_lavis(state_dict: Mapping[str, torch.Tensor], *, language_projection: str = "opt_proj",
                strict: bool = False) -> Conversion:
    """Map an HF BLIP-2 state dict (plus ``temp`` / ``qformer_lm_head.*``) to LAVIS names. The ViT's fused
    ``qkv.bias`` is split into ``q_bias`` / ``v_bias``; LAVIS has no key bias, and a nonzero key third (HF 5.x
    trains it) is dropped and listed in ``dropped`` as ``"<key>[key third]"``: it adds q . b_k to every score of
    a row, which softmax ignores. ``language_projection`` names LAVIS' projection ("opt_proj", "t5_proj")."""

    def special(key, val, res, pending):
        m = _HF_QKV_BIAS.match(key)
        if m:
            q, k, v = val.chunk(3)
            if torch.count_nonzero(k) > 0:  # a per-row constant shift of the scores: softmax ignores it
                res.dropped.append(f"{key}[key third]")
            res.state_dict[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q.clone()
            res.state_dict[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v.clone()
            return True
        m = _HF_QV_BIAS.match(key)
        if m:
            res.state_dict[f"visual_encoder.blocks.{m.group(1)}.attn.{m.group(2)}"] = val
            return True
        m = _HF_LM_PROJ.match(key)
        if m:
            res.state_dict[f"{language_projection}.{m.group(1)}"] = val
            return True
        return False

    res = _rename(state_dict, _H2L, special)
    return res.check() if strict else res


def _no_special(key, val, res, pending) -> bool:
    return False


def blip_to_hf(state_dict: Mapping[str, torch.Tensor], *, strict: bool = False) -> Conversion:
    """Map a Salesforce BLIP (v1) state dict (pre-training, retrieval, captioning, VQA, ITM checkpoints) to HF
    names (``Blip*`` models plus the blipfast names of the module doc); unknown keys land in ``unmapped``."""
    res = _rename(state_dict, _S2H, _no_special)
    return res.check() if strict else res


def hf_to_blip(state_dict: Mapping[str, torch.Tensor], *, strict: bool = False) -> Conversion:
    """Map an HF BLIP (v1) state dict (plus the blipfast names of the module doc) to Salesforce BLIP names."""
    res = _rename(state_dict, _H2S, _no_special)
    return res.check() if strict else res


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """From the key names: "lavis" or "hf" for BLIP-2, "salesforce" or "hf_blip" for BLIP (v1) (a state dict of
    text modules only, whose names both share, counts as "hf_blip"); ValueError if none fits."""
    keys = list(state_dict)
    if any(k.startswith(("Qformer.", "qformer.")) for k in keys):
        return "lavis" if any(k.startswith("Qformer.") for k in keys) else "hf"
    if any(k.startswith(("text_encoder.", "text_decoder.", "text_encoder_m.")) for k in keys):
        return "salesforce" if any(k.startswith(("visual_encoder.", "visual_encoder_m.")) for k in keys) else "hf_blip"
    if any(k.startswith(("visual_encoder.", "ln_vision.", "vision_proj.", "text_proj.")) for k in keys):
        return "lavis"
    if any(k.startswith(("vision_model.", "embeddings.", "vision_projection.", "language_projection.")) for k in keys):
        return "hf"
    raise ValueError(f"cannot tell whether this is an HF, LAVIS or Salesforce BLIP / BLIP-2 state dict (keys like "
                     f"{keys[:5]})")


# ----------------------------------------------------------------------------------------------
# loading and saving


def _unwrap(obj):
    """The state dict of a checkpoint dict that keeps it under "model", "state_dict" or "module" (LAVIS, BLIP)."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    return obj


def _load_index(index: Path, prefix: Optional[str]) -> dict:
    weight_map = json.loads(index.read_text())["weight_map"]
    wanted = {k for k in weight_map if prefix is None or k.startswith(prefix)}
    out = {}
    for shard in sorted({weight_map[k] for k in wanted}):
        out.update(load_state_dict(index.parent / shard, prefix=prefix))
    missing = sorted(wanted - set(out))
    if missing:
        raise ValueError(f"{index}: the index lists keys that no shard holds: {missing[:10]}")
    return out


def _load_safetensors(path: Path, prefix: Optional[str]) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys() if prefix is None or k.startswith(prefix)}
    except Exception as exc:  # safetensors' SafetensorError for an empty, truncated or damaged file
        raise ValueError(f"{path}: cannot be read as safetensors (empty, truncated or damaged?): {exc}") from None


def load_state_dict(source, *, prefix: Optional[str] = None) -> dict:
    """Read a state dict (CPU tensors) from an HF directory (``model.safetensors``, sharded
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` [.index.json]), a ``.safetensors`` file, an
    index ``.json`` or a torch file (LAVIS ``.pth``: a dict whose "model" entry is the state dict), read with
    ``weights_only=True``. ``source`` may also be a state dict (a ``{"model": state_dict}`` checkpoint is
    unwrapped). ``prefix``: only the tensors whose names start with it (a safetensors file reads no other)."""
    if isinstance(source, Mapping):
        sd, path = _unwrap(source), "the state dict"
    else:
        path = Path(source)
        if path.is_dir():
            for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                         "pytorch_model.bin"):
                if (path / name).is_file():
                    return load_state_dict(path / name, prefix=prefix)
            raise FileNotFoundError(f"{path}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if path.name.endswith(".json"):
            return _load_index(path, prefix)
        if path.suffix == ".safetensors":
            return _load_safetensors(path, prefix)
        try:
            sd = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
        except (EOFError, RuntimeError) as exc:  # empty or truncated (a refused pickle stays an UnpicklingError)
            raise ValueError(f"{path}: cannot be read as a torch file (empty, truncated or damaged?): "
                             f"{type(exc).__name__}: {exc}") from None
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in sd.items()):
        raise TypeError(f"{path}: does not hold a state dict (a dict of name -> tensor, or one under 'model')")
    return {k: v for k, v in sd.items() if prefix is None or k.startswith(prefix)}


def load_checkpoint(path, *, to: str = "hf", strict: bool = False) -> Conversion:
    """Load an HF or LAVIS BLIP-2 checkpoint, or an HF or Salesforce BLIP (v1) one, and return it in the key
    space ``to``: "hf" (either generation), "lavis" (BLIP-2) or "salesforce" (BLIP v1)."""
    if to not in ("hf", "lavis", "salesforce"):
        raise ValueError(f"to must be 'hf', 'lavis' or 'salesforce', got {to!r}")
    sd = load_state_dict(path)
    src = detect_format(sd)
    v1 = src in ("salesforce", "hf_blip")
    if to == ("lavis" if v1 else "salesforce"):
        raise ValueError(f"{path}: a BLIP{' (v1)' if v1 else '-2'} checkpoint converts to 'hf' or "
                         f"{'salesforce' if v1 else 'lavis'!r}, not {to!r}")
    if src == to or (src == "hf_blip" and to == "hf"):
        res = Conversion(state_dict={k: v for k, v in sd.items() if not _DROPPED.match(k)},
                         dropped=[k for k in sd if _DROPPED.match(k)])
        return res
    if v1:
        return blip_to_hf(sd, strict=strict) if to == "hf" else hf_to_blip(sd, strict=strict)
    return lavis_to_hf(sd, strict=strict) if to == "hf" else hf_to_lavis(sd, strict=strict)


# ----------------------------------------------------------------------------------------------
# one loader: any key space into a module, every key accounted for

# (blipfast name, HF name) of the tensors blipfast models keep under their own names
_ALIASES = (("ln_vision.", "vision_model.post_layernorm."), ("queue_ptr", "ptr_queue"))


@dataclass
class Loaded:
    """What :func:`load_into` did: ``keys`` (the module's keys it filled) and ``absent`` (the module's keys that
    ``ignore`` let the source lack; they keep their values)."""

    keys: list
    absent: list


def to_hf(state_dict: Mapping[str, torch.Tensor], fmt: Optional[str] = None) -> tuple[Conversion, str]:
    """(``state_dict`` in HF names, its format ``fmt``, by default as :func:`detect_format` tells it, "hf" when it
    cannot tell): LAVIS and Salesforce BLIP names are mapped, blipfast's ``ln_vision.*`` becomes HF's
    post_layernorm."""
    if fmt is None:
        try:
            fmt = detect_format(state_dict)
        except ValueError:
            fmt = "hf"
    if fmt == "lavis":
        return lavis_to_hf(state_dict), fmt
    if fmt == "salesforce":
        return blip_to_hf(state_dict), fmt
    res = Conversion()
    for k, v in state_dict.items():
        if _DROPPED.match(k):
            res.dropped.append(k)
            continue
        new = _ALIASES[0][1] + k[len(_ALIASES[0][0]):] if k.startswith(_ALIASES[0][0]) else k
        res.state_dict[new], res.origin[new] = v, k
    return res, fmt


def _listing(names: list, n: int = 10) -> str:
    names = sorted(names)
    return f"{names[:n]}" + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _source_names(keys: list, fmt: str, tensors: Mapping) -> list:
    """The names ``keys`` (HF names) have in the source's key space ``fmt``, for messages."""
    back = {"lavis": hf_to_lavis, "salesforce": hf_to_blip}.get(fmt)
    out = []
    for k in keys:
        try:
            names = list(back({k: tensors[k]}).state_dict) if back is not None else []
        except Exception:  # noqa: BLE001 - a name for a message; the HF name does as well
            names = []
        out += names or [k]
    return out


def _module_key(key: str, own: Mapping) -> str:
    """``key`` (HF name) as ``own`` (a module's state dict) names it: itself, or its blipfast alias."""
    if key in own:
        return key
    for a, b in _ALIASES:
        for x, y in ((b, a), (a, b)):
            if key.startswith(x) and y + key[len(x):] in own:
                return y + key[len(x):]
    return key


def load_into(module: torch.nn.Module, source, *, prefix: str = "", ignore=(), what: str = "weights",
              into: Optional[str] = None) -> Loaded:
    """Load ``source`` into ``module`` in place, every key mapped or reported.

    ``source``: a path (safetensors file or folder, sharded index, ``.pth`` read with ``weights_only=True``, a
    :class:`Source`) or a state dict; HF, LAVIS and Salesforce BLIP names are mapped to HF's (the module's key
    space; blipfast's ``ln_vision`` / ``queue_ptr`` are aliases of HF's post_layernorm / BLIP's ``ptr_queue``).
    ``prefix``: the part of the source the module is (e.g. "vision_model."): only its keys count, without it.
    ``ignore``: regular expressions (matched at the start of a key, in any of its names) of keys the source may
    lack or hold beyond the module. ``position_ids`` buffers never count. Tensors that share one parameter (tied
    weights) need one of their keys, and equal values when the source holds several.

    Anything else is a ValueError naming ``what`` (e.g. "--init") and ``into`` (default: the module's class):
    the keys the source lacks and the keys that do not map (in the source's names), and those of another shape.
    Returns :class:`Loaded`."""
    weights = source.weights if isinstance(source, Source) else source
    shown = "the state dict" if isinstance(weights, Mapping) else repr(str(weights))
    try:
        sd = load_state_dict(weights, prefix=prefix or None) if prefix and not isinstance(weights, Mapping) else {}
        sd = sd or load_state_dict(weights)
    except (OSError, TypeError, ValueError) as exc:
        raise ValueError(f"{what}: {exc}") from None
    skip = [re.compile(p) for p in ignore]
    own = {k: v for k, v in module.state_dict(keep_vars=True).items() if not _DROPPED.match(k)}

    def fitting(c: Conversion) -> int:
        return sum(k.startswith(prefix) and _module_key(k[len(prefix):], own) in own for k in c.state_dict)

    conv, fmt = to_hf(sd)
    if fmt != "hf":  # names that already fit the module as they are (a partial dict can look LAVIS-named)
        plain = to_hf(sd, "hf")
        if fitting(plain[0]) > fitting(conv):
            conv, fmt = plain

    def ignored(*names) -> bool:
        return any(p.match(n) for p in skip for n in names)

    unexpected = [k for k in conv.unmapped if not ignored(k)]
    loaded, origin, shapes, seen = {}, {}, [], set()
    for hf_key, t in conv.state_dict.items():
        name = conv.origin.get(hf_key, hf_key)
        if not hf_key.startswith(prefix):
            continue
        key = _module_key(hf_key[len(prefix):], own)
        if key not in own:
            if not ignored(name, hf_key, key):
                unexpected.append(name)
        elif tuple(t.shape) != tuple(own[key].shape):
            shapes.append(f"{name} {list(t.shape)} in the checkpoint, {list(own[key].shape)} in the model")
            seen.add(key)
        else:
            loaded[key], origin[key] = t, name
    groups: dict = {}
    for k, t in own.items():
        groups.setdefault(id(t), []).append(k)
    missing, absent, tied = [], [], []
    for keys in groups.values():
        have = [k for k in keys if k in loaded]
        if len(have) > 1 and not all(torch.equal(loaded[have[0]], loaded[k]) for k in have[1:]):
            tied.append(" / ".join(origin[k] for k in have))
        if not have and not seen.intersection(keys):
            for k in keys:
                (absent if ignored(k, prefix + k) else missing).append(k)
    problems = []
    if missing:
        a, b = _ALIASES[0]  # blipfast's ln_vision back to HF's name, then to the source's
        hf = {prefix + (b + k[len(a):] if k.startswith(a) else k): own[k].detach() for k in missing}
        problems.append(f"the checkpoint lacks {len(missing)} key(s): {_listing(_source_names(list(hf), fmt, hf))}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint key(s) do not map to it: {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} key(s) have another shape: {_listing(shapes, 4)}")
    if tied:
        problems.append(f"tied key(s) hold different values: {_listing(tied, 4)}")
    if problems:
        raise ValueError(f"{what}: the weights of {shown} do not fit {into or type(module).__name__}: "
                         + "; ".join(problems))
    module.load_state_dict(loaded, strict=False)
    return Loaded(keys=sorted(loaded), absent=sorted(absent))


def _sub(state_dict: Mapping, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def qformer_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The Q-Former part of a BLIP-2 state dict (HF, LAVIS or already bare) in ``QFormer`` /
    ``Blip2QFormerModel`` key space, ready for ``QFormer.load_state_dict(..., strict=True)``."""
    if any(k.startswith(("layernorm.", "encoder.layer.")) for k in state_dict):
        return dict(state_dict)
    if detect_format(state_dict) == "lavis":
        state_dict = lavis_to_hf(state_dict).state_dict
    return _sub(state_dict, "qformer.")


def embeddings_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The word/position embeddings of a BLIP-2 state dict (HF or LAVIS) for ``QFormerEmbeddings``."""
    if detect_format(state_dict) == "lavis":
        state_dict = lavis_to_hf(state_dict).state_dict
    return _sub(state_dict, "embeddings.")


def blip_text_state_dict(state_dict: Mapping[str, torch.Tensor], module: str = "text_encoder") -> dict:
    """One text module of a BLIP (v1) state dict (HF or Salesforce names: they agree there), ``module`` one of
    "text_encoder", "text_decoder", "text_encoder_m", in the key space of blipfast.BlipTextModel /
    BlipTextLMHeadModel and HF's classes (``position_ids`` buffers dropped), for ``load_state_dict(strict=True)``."""
    if module not in ("text_encoder", "text_decoder", "text_encoder_m"):
        raise ValueError(f"module must be 'text_encoder', 'text_decoder' or 'text_encoder_m', got {module!r}")
    return {k: v for k, v in _sub(state_dict, module + ".").items() if not _DROPPED.match(k)}


def save_lavis_checkpoint(state_dict: Mapping[str, torch.Tensor], path) -> None:
    """Write ``{"model": state_dict}`` with torch.save (loadable with ``weights_only=True``)."""
    torch.save({"model": dict(state_dict)}, Path(path))


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path) -> None:
    """Write a state dict as one ``.safetensors`` file (tied tensors are written as separate copies), with the mode
    the user's umask gives a new file."""
    from safetensors.torch import save_file

    seen: set = set()
    out = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen or not v.is_contiguous() else v  # safetensors refuses shared storage
        if v.numel():
            seen.add(ptr)
    save_file(out, str(path), metadata={"format": "pt"})
    share(str(path))  # safetensors writes 0600: the user's umask instead
