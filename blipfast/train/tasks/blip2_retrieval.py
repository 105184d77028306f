"""``blip2-retrieval``: BLIP-2 image-text retrieval fine-tuning with the ViT trained (LAVIS
``projects/blip2/train/retrieval_coco_ft.yaml`` with ``Blip2Qformer``'s ``coco`` model config; docs/blip2-finetune.md).

The stage-1 model (:class:`blipfast.Blip2Stage1`: ITC + ITM with hard negatives + ITG) with the ViT in front of it,
everything trained (``freeze_vit: False``), on image-caption pairs whose image ids are the ITC positives (LAVIS'
``"image_id" in samples`` branch of ``Blip2Qformer.forward``: soft targets 0.9 over the pairs of the same image
plus 0.1 spread over the batch, and no hard negative showing the same image; ``--image-ids`` stays on). The ViT
(sourcing, 364 px, fused checkpointed blocks) is :class:`~blipfast.train.tasks._vit.TrainableViT`'s, as in
``blip2-caption``; the model is :class:`Blip2Stage1ViT`, a ``Blip2Stage1`` that runs its ``vision_model`` on the
pixels first (its tokens before ``ln_vision``, which the ViT's ``post_layernorm`` is).

Weights: ``--init`` is a stage-1 checkpoint (a LAVIS ``.pth``, a blipfast ``blip2-stage1`` or ``blip2-retrieval``
run, an HF BLIP-2 folder; one without the Q-Former's LM head and ``temp``, as HF's ``Blip2ForImageTextRetrieval``,
starts them fresh), the ViT from ``--vision`` and / or ``--init``; the tokenizer: ``--tokenizer``, else the
``--init`` run's. The Q-Former's configuration: the ``--init`` run's, else the weights' shapes (heads of width 64),
with ``--model`` over it (``Blip2Stage1Config`` fields, a nested ``qformer``, ``image_size``, ``vit_checkpoint``,
``k_test``, ``lr_layer_decay``).

Optimizer groups: LAVIS' ``Blip2Base.get_optimizer_params`` with the ViT's layer-wise groups, ``lr_scale = 0.95 **
(L + 1 - layer id)`` (``retrieval_coco_ft.yaml``'s ``lr_layer_decay``; ``--model {"lr_layer_decay": s}``), as
``--param-groups reference`` keeps them: LAVIS' schedulers never apply ``lr_scale``, so neither does the
default; ``--param-groups layer-decay`` multiplies it into each group's learning rate (docs/blip2-finetune.md).

``--eval-every N``: recall@1/5/10 of ``--eval-data`` (or the synthetic set) as ``blipfast retrieval`` scores it
(:meth:`blipfast.models.blip2_retrieval.Blip2Retrieval.score_matrices`: ITC top ``k_test``, default 128 as
``retrieval_coco_ft.yaml``, re-ranked by ITM; LAVIS' ``txt_r*``, ``img_r*``, ``r_mean``). Checkpoints: every
tensor in HF names (``Blip2ForImageTextRetrieval``'s, with the Q-Former's LM head and ``temp``) and a
``config.json`` (the ViT's and the Q-Former's configs); ``--save-lavis`` adds LAVIS names. ``blipfast retrieval
--model RUN`` reads such a run with its ViT.
"""
from __future__ import annotations

import json
import os

import torch

from ...models.blip2 import Blip2Stage1
from ..logger import LOSSES
from ..param_groups import ViTLayers
from ._vit import VIT_FIELDS, TrainableViT
from .base import _check_derived, _need, check_model_fields, merge, qformer_fields, register
from .blip2_stage1 import Blip2Stage1Task

K_TEST = 128  # retrieval_coco_ft.yaml
LR_LAYER_DECAY = 0.95  # retrieval_coco_ft.yaml
EVAL_TXT_LEN = 35  # LAVIS' compute_sim_matrix tokenises the gallery's captions to 35


class Blip2Stage1ViT(Blip2Stage1):
    """A :class:`blipfast.Blip2Stage1` with its ViT (``vision_model``, an HF ``Blip2VisionModel`` whose
    ``post_layernorm`` is ``ln_vision``): ``forward(pixel_values, ...)`` is the stage-1 step on the ViT's tokens."""

    vision_model: torch.nn.Module
    #: the ViT's layer ids (LAVIS' EVA rule on transformers' names) and the layer-wise lr decay of its optimizer
    #: groups (blipfast.train.optim: LAVIS' Blip2Base.get_optimizer_params)
    vit_layers: ViTLayers
    lr_layer_decay: float

    @classmethod
    def wrap(cls, stage1: Blip2Stage1, vision_model: torch.nn.Module, lr_layer_decay: float) -> "Blip2Stage1ViT":
        """``stage1`` itself (its class switched, nothing copied) with ``vision_model``."""
        stage1.__class__ = cls
        stage1.vision_model = vision_model
        vision_model.post_layernorm = stage1.ln_vision
        stage1.vit_layers = ViTLayers("hf", vision_model.config.num_hidden_layers, prefix="vision_model")
        stage1.lr_layer_decay = lr_layer_decay
        return stage1

    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's tokens before ``ln_vision`` [B, N, width]."""
        vm = self.vision_model
        return vm.encoder(inputs_embeds=vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype)))[0]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        return super().forward(self.vision_tokens(pixel_values), input_ids, attention_mask, **kwargs)


@register
class Blip2RetrievalTask(TrainableViT, Blip2Stage1Task):
    """The stage-1 model with its ViT trained on image-caption pairs (see the module docstring)."""

    name = "blip2-retrieval"
    recipe = "blip2-finetune"  # LAVIS' linear_warmup_cosine_lr, Blip2Base's groups, blip2_image_train
    title = "BLIP-2 retrieval fine-tuning (ViT trained)"
    spelling = "--task blip2-retrieval"
    losses = LOSSES
    trains_vision = True
    streams = False
    # retrieval_coco_ft.yaml: init_lr 1e-5, warmup_lr 1e-8 over 1000 steps, min_lr 0, weight decay 0.05, 5 epochs,
    # batch 14 per GPU, evaluation every epoch, image ids as positives; Blip2Qformer: max_txt_len 32
    defaults = {"batch_size": 14, "epochs": 5.0, "lr": 1e-5, "warmup_lr": 1e-8, "warmup_steps": 1000, "min_lr": 0.0,
                "weight_decay": 0.05, "max_txt_len": 32, "eval_every": 1, "image_ids": True}
    MODEL_FIELDS = VIT_FIELDS + ("k_test", "lr_layer_decay")

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.parts = None
        self.processor = self.tok = None
        self.k_test = K_TEST

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        super().check_options(cfg)
        _need(cfg["init"] is not None, "--task blip2-retrieval needs --init CKPT (a BLIP-2 stage-1 checkpoint: a "
              "LAVIS .pth, a blipfast blip2-stage1 run or an HF BLIP-2 folder)")
        _need(cfg["image_ids"], "--no-image-ids cannot be used with --task blip2-retrieval: LAVIS' retrieval "
              "fine-tuning takes the pairs of one image as ITC positives and never as ITM negatives")
        from ...models.blip2 import Blip2Stage1Config

        check_model_fields(cfg["model"] or {}, Blip2Stage1Config.FIELDS + cls.MODEL_FIELDS,
                           {"qformer": qformer_fields()}, "blip2-retrieval")
        k = (cfg["model"] or {}).get("k_test", K_TEST)
        _need(not isinstance(k, bool) and isinstance(k, int) and k >= 1, f"--model: k_test must be an int >= 1, "
              f"got {k!r}")
        s = (cfg["model"] or {}).get("lr_layer_decay", LR_LAYER_DECAY)
        _need(not isinstance(s, bool) and isinstance(s, (int, float)) and 0 < s <= 1,
              f"--model: lr_layer_decay must be a number in (0, 1], got {s!r}")

    def tokenizer(self, cfg: dict, ann, dist):
        """``--tokenizer``, else the tokenizer of the ``--init`` run (its vocabulary is the Q-Former's)."""
        if cfg["tokenizer"] is None:
            run = self._parts(cfg)["src"].run_config or {}
            if run.get("tokenizer"):
                from ...data import load_tokenizer

                return load_tokenizer(run["tokenizer"]), run["tokenizer"]
            raise ValueError(f"--task blip2-retrieval needs --tokenizer DIR (the BERT tokenizer of --init "
                             f"{cfg['init']!r}'s Q-Former, e.g. bert-base-uncased; [DEC] is added)")
        return super().tokenizer(cfg, ann, dist)

    # ------------------------------------------------------------------------------------------

    def _stage1_config(self, cfg: dict, tok, parts: dict):
        """The ``Blip2Stage1Config``: the --init run's model, else the weights' shapes; --model over it; the
        tokenizer's ids and --max-txt-len fixed."""
        from ...models.blip2 import Blip2Stage1Config
        from ...models.blip2_stage2 import stage2_qformer_config
        from ...models.qformer import QFormerConfig

        run, sd = parts["src"].run_config or {}, parts["sd"]
        fields = set(Blip2Stage1Config.FIELDS) | {"qformer"}
        if run.get("model") and run.get("stage", 1) == 1 and run.get("task", "blip2-stage1") in (
                "blip2-stage1", self.name):
            base = {k: v for k, v in run["model"].items() if k in fields}
        else:
            q = QFormerConfig(stage2_qformer_config(parts["qhint"], sd)).to_dict()
            q.update(vocab_size=sd["embeddings.word_embeddings.weight"].shape[0],
                     max_position_embeddings=sd["embeddings.position_embeddings.weight"].shape[0])
            base = {"qformer": q, "num_query_tokens": sd["query_tokens"].shape[1],
                    "embed_dim": sd["vision_projection.weight"].shape[0], "ln_vision_eps": parts["eps"]}
        user = {k: v for k, v in (cfg["model"] or {}).items() if k not in self.MODEL_FIELDS + ("name",)}
        spec = merge(base, user)
        vocab = (spec.get("qformer") or {}).get("vocab_size")
        _need(vocab in (None, len(tok)), f"--tokenizer: {len(tok)} tokens, but the Q-Former of --init "
              f"{cfg['init']!r} has {vocab} (give the tokenizer it was trained with)")
        fixed = {"max_txt_len": cfg["max_txt_len"], "bos_token_id": tok.bos_token_id,
                 "qformer": {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}}
        _check_derived(user, {"max_txt_len": cfg["max_txt_len"]}, "--max-txt-len")
        try:
            return Blip2Stage1Config(**merge(spec, fixed))
        except TypeError as exc:
            raise ValueError(f"--model: {exc}") from None

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        from ... import convert
        from ...data.vision import quiet_transformers

        self.tok = tok
        parts = self._parts(cfg)
        mcfg = self._stage1_config(cfg, tok, parts)
        self.k_test = (cfg["model"] or {}).get("k_test", K_TEST)
        stage1 = Blip2Stage1(mcfg)
        keep = {k: v for k, v in parts["sd"].items() if not k.startswith("vision_model.")
                or k.startswith("vision_model.post_layernorm.")}
        try:  # (a checkpoint of HF's Blip2ForImageTextRetrieval has no LM head and no temp: they start fresh, as
            # in Blip2Stage1.from_hf, the decoder tied to the word embeddings; LAVIS loads with strict=False)
            convert.load_into(stage1, keep, ignore=(r"qformer_lm_head\.", r"temp$"), what="--init")
            with quiet_transformers():
                vit = self.load_vision_model(parts)  # float32: it trains
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise ValueError(f"{self.spelling}: cannot build the model from --init {cfg['init']!r} and the ViT: "
                             f"{exc}") from None
        vit = self.vision_model(vit, stage1.ln_vision, parts)
        decay = (cfg["model"] or {}).get("lr_layer_decay", LR_LAYER_DECAY)
        model = Blip2Stage1ViT.wrap(stage1, vit, decay).to(device).train()
        record = {**mcfg.to_dict(), "image_size": parts["image_size"], "vit_checkpoint": parts["vit_checkpoint"],
                  "k_test": self.k_test, "lr_layer_decay": decay}
        self.parts = dict(parts, sd=None)  # the weights are in the model now
        return model, record

    def step_loss(self, model, pixel_values, inp: dict, seed):
        out = model(pixel_values, inp["input_ids"], inp["attention_mask"], image_ids=inp["image_id"],
                    sample_seed=seed)
        return out.loss, torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_lm]).detach().float()

    # ------------------------------------------------------------------------------------------
    # checkpoints

    @staticmethod
    def hf_state_dict(model) -> dict:
        """Every tensor in HF names, each storage once (the LM head's decoder is the tied word embeddings)."""
        out, seen = {}, set()
        for k, v in model._hf_space().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                out[k] = v.detach().contiguous()
        return out

    def save(self, model, folder: str, step: int, lavis: bool) -> None:
        from safetensors.torch import save_file

        sd = self.hf_state_dict(model)
        save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"step": str(step), "format": "blipfast"})
        cfg = model.config
        meta = {"model_type": "blip-2", "vision_config": model.vision_model.config.to_dict(),
                "qformer_config": cfg.qformer.to_dict(), "num_query_tokens": cfg.num_query_tokens,
                "image_text_hidden_size": cfg.embed_dim,
                "blipfast": {"task": self.name, "step": step, "stage1": cfg.to_dict(), "k_test": self.k_test,
                             "note": "a BLIP-2 retrieval fine-tuning run: the ViT, ln_vision (its post_layernorm), "
                                     "the Q-Former with its LM head, the projections, the ITM head and temp"}}
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        if lavis:
            torch.save({"model": model.to_lavis_state_dict(), "step": step}, os.path.join(folder, "lavis.pth"))

    def load(self, model, folder: str) -> None:
        from ... import convert

        convert.load_into(model, os.path.join(folder, "model.safetensors"), what="--resume")

    # ------------------------------------------------------------------------------------------
    # evaluation

    def evaluate(self, model, cfg: dict, dist, epoch: int):
        """Recall@1/5/10 of the evaluation gallery, ``blipfast retrieval``'s scoring with ``k_test`` (rank 0;
        None on the others and without an evaluation set)."""
        from ...models.blip2_retrieval import Blip2Retrieval
        from ...retrieval import evaluate, read_annotations

        data = self.eval_data(cfg)
        if data is None or not dist.main:
            return None
        gallery = read_annotations(data, max_words=self.max_words)
        scorer = Blip2Retrieval.from_stage1(model, model.vision_model)
        with self.evaluating(cfg, model):
            res = evaluate(scorer, gallery, self.tok, images=cfg["images"], k=self.k_test,
                           max_txt_len=min(EVAL_TXT_LEN, model.config.qformer.max_position_embeddings), workers=0,
                           processor=self.processor, image_batch_size=cfg["batch_size"])
        return {k: round(v, 4) for k, v in res["metrics"].items()}
