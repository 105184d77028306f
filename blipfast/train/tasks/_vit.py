"""The trainable BLIP-2 ViT of the fine-tuning tasks (``blip2-caption``, ``blip2-retrieval``; docs/blip2-finetune.md):
:class:`TrainableViT`, a mixin of the task classes (this module registers no task: ``task_names`` skips modules
whose name starts with "_").

What it gives a task whose ViT trains (``trains_vision``: the batches hold pixels):

- :meth:`TrainableViT._parts`: ``--init`` read once (its weights in HF names, :func:`blipfast.models.blip2_stage2.
  read_stage1`), the ViT's source (LAVIS' order: ``--vision``, a ``Blip2VisionModel`` folder, with the ViT weights
  ``--init`` holds over it; without ``--vision``, the ViT of ``--init`` alone: an HF BLIP-2 folder, a blipfast run
  of the task, a LAVIS ``.pth`` with ``visual_encoder.*``, EVA ViT-g's sizes from its shapes), the training
  resolution (``--model {"image_size": N}``; default the ViT's grid scaled by LAVIS' 364 / 224; a run of the same
  task as ``--init`` keeps its own) and the per-block checkpointing (``--model {"vit_checkpoint": ...}``);
- :meth:`TrainableViT.image_processor`: LAVIS' ``blip_image_eval`` at that resolution;
- :meth:`TrainableViT.vision_model`: the ViT (float32: it trains) with ``ln_vision`` as its ``post_layernorm``,
  its position table interpolated once to the training resolution (LAVIS' ``interpolate_pos_embed``), ``--init``'s
  ViT weights over ``--vision``'s, and blipfast's fused blocks (:func:`blipfast.models.blip2_vision.
  fuse_blip2_vision_model`) with the checkpointing asked for.
"""
from __future__ import annotations

import math
import os

from .base import _need

LAVIS_SCALE = (364, 224)  # the fine-tuning configs' image_size over the pre-trained EVA ViT-g's
VIT_FIELDS = ("image_size", "vit_checkpoint")
LN = "vision_model.post_layernorm."


class TrainableViT:
    """Mixin of a :class:`~blipfast.train.tasks.base.Task` whose BLIP-2 ViT trains (see the module docstring).
    The task sets ``self.parts = None`` and ``self.processor = None`` in its ``__init__``."""

    parts = None
    processor = None

    def _parts(self, cfg: dict) -> dict:
        """--init read once (its weights in HF names), the ViT's source (a config whose weights --init holds, or the
        --vision folder) and the training resolution."""
        if self.parts is not None:
            return self.parts
        from transformers import Blip2VisionConfig

        from ... import convert
        from ...models.blip2_stage2 import read_stage1

        src = convert.resolve_source(cfg["init"], what="--init")
        sd, qhint, eps_hint = read_stage1(src.weights)
        has_vit = any(k.startswith("vision_model.") and not k.startswith(LN) for k in sd)
        if cfg["vision"] is not None:  # LAVIS: the ViT's own weights, then the checkpoint's over them
            vit = cfg["vision"]
            vcfg = Blip2VisionConfig.from_pretrained(vit)
        else:
            _need(has_vit, f"--vision VIT_DIR is needed: --init {cfg['init']!r} holds no ViT weights")
            vit = vcfg = vision_config(src, sd)
        user = cfg["model"] or {}
        size = user.get("image_size")
        grid = vcfg.image_size // vcfg.patch_size
        if size is None and fine_tuned(src, self.name):  # a run of this task: its ViT keeps its resolution
            size = int(sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
                       * math.isqrt(sd["vision_model.embeddings.position_embedding"].shape[1] - 1))
        if size is None:
            size = math.floor(grid * LAVIS_SCALE[0] / LAVIS_SCALE[1] + 0.5) * vcfg.patch_size
        _need(not isinstance(size, bool) and isinstance(size, int) and size >= vcfg.patch_size
              and size % vcfg.patch_size == 0, f"--model: image_size must be a multiple of the ViT's patch size "
              f"{vcfg.patch_size}, got {size!r}")
        ckpt = user.get("vit_checkpoint", "all")
        _need(ckpt in ("all", True, False) or (isinstance(ckpt, int) and ckpt >= 0),
              f"--model: vit_checkpoint must be \"all\", true, false or k >= 0 (every k-th block), got {ckpt!r}")
        self.parts = {"src": src, "sd": sd, "qhint": qhint, "eps": eps_hint, "vit": vit, "has_vit": has_vit,
                      "image_size": size, "vit_checkpoint": ckpt}
        return self.parts

    def image_processor(self, cfg: dict, dist):
        """LAVIS' ``blip_image_eval`` at the training resolution; rank 0 saves it in the run folder."""
        from ...data.vision import default_blip_processor

        self.processor = default_blip_processor(self._parts(cfg)["image_size"])
        if dist.main:
            self.processor.save_pretrained(os.path.join(cfg["out"], "image_processor"))
        return self.processor

    def load_vision_model(self, parts: dict):
        """The ViT of ``parts``' source (--vision's folder, or --init's weights), float32, unfused."""
        from ...models.blip2_stage2 import _vision_model

        return _vision_model(parts["vit"], parts["sd"], None)

    def vision_model(self, vit, ln, parts: dict):
        """``vit`` (from :meth:`load_vision_model`) made the trained ViT: ``ln`` (``ln_vision``, with LAVIS'
        epsilon; the ViT's own norms keep theirs) as its ``post_layernorm``, the position table interpolated to the
        training resolution, --init's ViT weights over --vision's, the blocks fused and checkpointed."""
        from ... import convert
        from ...models.blip2_vision import (fuse_blip2_vision_model, interpolate_pos_embed_state_dict,
                                            resize_position_embedding)

        if vit.config.hidden_size != ln.normalized_shape[0]:
            raise ValueError(f"--init: the checkpoint's ln_vision is {ln.normalized_shape[0]} wide, the ViT "
                             f"{vit.config.hidden_size}")
        vit.post_layernorm = ln
        resize_position_embedding(vit, parts["image_size"])  # LAVIS' interpolate_pos_embed, once
        if parts["has_vit"] and isinstance(parts["vit"], str):  # --init's ViT over --vision's, at this resolution
            vsd = {k: v for k, v in parts["sd"].items() if k.startswith("vision_model.") and not k.startswith(LN)}
            vsd = interpolate_pos_embed_state_dict(vsd, parts["image_size"], vit.config.patch_size)
            convert.load_into(vit, vsd, prefix="vision_model.", ignore=(r"post_layernorm\.",), what="--init",
                              into="the ViT of --vision")
        fuse_blip2_vision_model(vit, checkpoint=parts["vit_checkpoint"])
        return vit


def vision_config(src, sd: dict):
    """The ``Blip2VisionConfig`` of the ViT weights an --init holds, at their own resolution: the ``config.json``
    beside them (an HF BLIP-2 folder, a blipfast checkpoint), else LAVIS' EVA ViT-g (``eva_clip_g``) with the
    sizes the weights' shapes give."""
    from transformers import Blip2VisionConfig

    meta = (src.hf_config or {}).get("vision_config") or {}
    pos = sd["vision_model.embeddings.position_embedding"]
    patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(pos.shape[1] - 1)
    if meta.get("num_hidden_layers"):
        spec = {k: v for k, v in meta.items() if k not in ("model_type", "transformers_version", "architectures")}
    else:  # LAVIS' eva_vit_g: 16 heads at width 1408
        width = pos.shape[-1]
        layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
        if width != 1408 and width % 64:
            raise ValueError(f"--init: a {width}-wide ViT without a config.json (its heads are unknown); give its "
                             f"config with the weights")
        spec = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=16 if width == 1408 else width // 64,
                    intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                    patch_size=patch)
    return Blip2VisionConfig(**{**spec, "image_size": grid * patch})


def fine_tuned(src, task: str) -> bool:
    """Whether --init is a run or checkpoint of ``task`` (its ViT is already at the training resolution)."""
    return (src.run_config or {}).get("task") == task or \
        ((src.hf_config or {}).get("blipfast") or {}).get("task") == task
