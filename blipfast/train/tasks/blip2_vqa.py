"""``blip2-vqa``: BLIP-2's VQAv2 fine-tuning (the BLIP-2 paper, section 4.3) with the ViT and the Q-Former
trained and the LLM frozen (docs/blip2-finetune.md). LAVIS ships no configuration for it; the recipe chosen:

- the model: :class:`blipfast.Blip2Stage2` in its InstructBLIP form (``InstructBlipForConditionalGeneration``):
  the question goes to the Q-Former beside the learned queries ("we also provide the question as a condition to
  the Q-Former"), whose word/position embeddings and text FFN come from the stage-1 checkpoint of ``--init``, as
  LAVIS' ``Blip2T5Instruct`` takes them from BLIP-2's ``blip2_pretrained.pth``
  (:meth:`blipfast.Blip2Stage2.from_pretrained_parts` with ``instruct=True``); an HF InstructBLIP folder or a
  ``blip2-vqa`` run as ``--init`` gives them too. The Q-Former's tokenizer (LAVIS': bert-base-uncased, cut on the
  left): ``--model '{"qformer_tokenizer": DIR}'``, else the ``qformer_tokenizer/`` folder beside ``--init`` (HF
  InstructBLIP folders and this task's checkpoints hold one);
- the LLM reads "Question: {question} Answer:" (``--prompt``; the question as LAVIS' ``blip_question`` processes
  it) and its target is ONE answer per question: the answer with the highest VQA weight (the most human
  answers; ties: the first given). LAVIS' ``COCOVQAInstructDataset`` draws one distinct answer uniformly per visit;
  the most frequent one is deterministic (exact resume, fixed shapes, no random draw in the data) and is the answer
  VQA accuracy rewards most. A Flan-T5 (the default LLM family of the paper's VQA results) reads the prompt in its
  encoder and decodes the answer; a decoder-only LLM (OPT) reads prompt + " " + answer + its EOS, the prompt's
  tokens without loss;
- everything else is ``blip2-caption``'s (:class:`~blipfast.train.tasks.blip2_caption.Blip2CaptionTask`): the ViT
  trained (fused, checkpointed blocks, 364 px from a 224-px ViT), ``caption_coco_ft.yaml``'s schedule and
  weight-decay rule (lr 1e-5, warm-up from 1e-8 over 1,000 steps, cosine to 0, weight decay 0.05, 5 epochs, batch
  16), the closest LAVIS recipe that trains the ViT;
- ``--eval-every N`` (default 1 with an evaluation file): every question of ``--eval-data`` (or the synthetic
  set's ``vqa_eval.json``) answered open-ended as BLIP-2's ``predict_answers`` does (beam 5, at most 10 new
  tokens, Flan-T5's length penalty -1) from the training prompt, and scored with the official VQA accuracy
  (:func:`blipfast.vqa_nlvr.score_vqa`); the answers in ``RUN/answers-epoch<N>.jsonl``.

Data: :mod:`blipfast.data.vqa`'s question lists with answers (VQAv2 / Visual Genome rows, as ``blip-vqa`` reads
them). Checkpoints: ``blip2-caption``'s (every trained tensor, HF InstructBLIP names; ``--save-lavis``: LAVIS'
``Blip2T5Instruct`` names) with the Q-Former's tokenizer in ``qformer_tokenizer/``.
"""
from __future__ import annotations

import json
import os

import torch

from .base import _need, register
from .blip2_caption import Blip2CaptionTask
from .blip_pretrain import BlipFinetuneTask
from .blip_vqa import BlipVQATask

VQA_PROMPT = "Question: {} Answer:"  # the BLIP-2 paper's VQA fine-tuning prompt


@register
class Blip2VQATask(Blip2CaptionTask):
    """The InstructBLIP-form stage-2 model fine-tuned on VQA with its ViT trained (see the module docstring)."""

    name = "blip2-vqa"
    streams = False  # VQA question lists are annotation files (as blip-vqa's)
    title = "BLIP-2 VQA fine-tuning (ViT trained, the question in the Q-Former)"
    spelling = "--task blip2-vqa"
    qformer_text_input = True
    max_words = 50  # LAVIS' blip_question: max_words 50
    synthetic_eval = "vqa_eval.json"
    defaults = {**Blip2CaptionTask.defaults, "prompt": VQA_PROMPT, "text_suffix": None}

    # the data: blip-vqa's question lists with answers
    synthetic = BlipVQATask.synthetic
    read_data = BlipVQATask.read_data
    dataset = BlipVQATask.dataset

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        # config.json: how the run answers (blipfast.models.blip2_finetuned reads them back)
        self.ends = {**self.ends, "prompt": cfg["prompt"], "max_txt_len": cfg["max_txt_len"]}
        self.qtok = None
        self.ann = None

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        model = {k: v for k, v in (cfg["model"] or {}).items() if k != "qformer_tokenizer"}
        super().check_options({**cfg, "model": model})
        qtok = (cfg["model"] or {}).get("qformer_tokenizer")
        _need(qtok is None or (isinstance(qtok, str) and os.path.isdir(qtok)),
              f"--model: qformer_tokenizer must be a tokenizer folder (LAVIS': bert-base-uncased), got {qtok!r}")
        prompt = cfg["prompt"]
        _need(prompt is None or prompt.count("{}") == 1, f"--prompt: the VQA prompt needs one {{}} for the question, "
              f"got {prompt!r}")

    def _qformer_config(self, cfg: dict, src):
        model = {k: v for k, v in (cfg["model"] or {}).items() if k != "qformer_tokenizer"}
        return super()._qformer_config({**cfg, "model": model}, src)

    def _qformer_tokenizer(self, cfg: dict):
        """(the Q-Former's tokenizer, its folder): ``--model qformer_tokenizer``, else ``qformer_tokenizer/``
        beside --init's weights."""
        from transformers import AutoTokenizer

        from ...data.vision import quiet_transformers

        path = (cfg["model"] or {}).get("qformer_tokenizer")
        if path is None:
            src = self._parts(cfg)["src"]
            base = src.weights if os.path.isdir(str(src.weights)) else os.path.dirname(str(src.weights))
            path = os.path.join(base, "qformer_tokenizer")
            _need(os.path.isdir(path), f"{self.spelling} needs the Q-Former's tokenizer: --model "
                  f"'{{\"qformer_tokenizer\": DIR}}' (a BERT tokenizer folder, LAVIS': bert-base-uncased), or a "
                  f"qformer_tokenizer/ folder beside --init {cfg['init']!r}")
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many kinds for a folder it cannot read
            raise ValueError(f"--model: cannot load the Q-Former's tokenizer from {path!r}: {exc}") from None
        tok.truncation_side, tok.padding_side = "left", "right"  # LAVIS' init_tokenizer(truncation_side="left")
        return tok, os.path.abspath(path)

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        qtok, path = self._qformer_tokenizer(cfg)
        model, record = super().build(cfg, tok, width, device, fresh)
        n_emb = model.model.qformer.get_input_embeddings().num_embeddings
        if len(qtok) > n_emb:
            raise ValueError(f"--model: the Q-Former's tokenizer {path!r} has {len(qtok)} tokens, more than the "
                             f"Q-Former's {n_emb} word embeddings")
        self.qtok = qtok
        self.keys += ("qformer_input_ids", "qformer_attention_mask")
        return model, {**record, "qformer_tokenizer": path}

    # ------------------------------------------------------------------------------------------
    # the batches

    def tokenize(self, model, tok, captions: list, cfg: dict) -> dict:
        """The questions for the Q-Former (``qformer_input_ids`` / ``qformer_attention_mask``) and the LLM's text
        (:meth:`blipfast.Blip2Stage2.make_text_batch` of "Question: {q} Answer:" and each question's most
        weighted answer), every key padded to ``--max-txt-len``."""
        from ...data import tokenize

        if len(captions) != len(self.ann.answers):
            raise ValueError(f"{self.spelling}: {len(captions)} questions for {len(self.ann.answers)} answer lists")
        best = [answers[max(range(len(w)), key=w.__getitem__)] for answers, w in zip(self.ann.answers,
                                                                                        self.ann.weights)]
        qids, qmask = tokenize(self.qtok, captions, cfg["max_txt_len"])
        prompts = [self.prompt(cfg, model).format(q) for q in captions]
        b = model.make_text_batch(tok, best, prompts, max_length=cfg["max_txt_len"], suffix=cfg["text_suffix"])
        out = {"qformer_input_ids": qids, "qformer_attention_mask": qmask}
        for k, v in b.items():
            t = torch.full((len(captions), cfg["max_txt_len"]), self.PAD_VALUES.get(k, 0), dtype=torch.int32)
            if k == "input_ids":
                t.fill_(tok.pad_token_id)
            t[:, :v.shape[1]] = v
            out[k] = t
        return out

    @staticmethod
    def prompt(cfg: dict, model) -> str:
        """The training prompt: ``--prompt`` with, for a decoder-only LLM, a space before the answer."""
        prompt = cfg["prompt"]
        return prompt if model.is_encoder_decoder or prompt[-1:].isspace() else prompt + " "

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save(self, model, folder: str, step: int, lavis: bool) -> None:
        """``blip2-caption``'s checkpoint with the Q-Former's tokenizer (``qformer_tokenizer/``)."""
        super().save(model, folder, step, lavis)
        self.qtok.save_pretrained(os.path.join(folder, "qformer_tokenizer"))

    # ------------------------------------------------------------------------------------------
    # evaluation

    def evaluate(self, model, cfg: dict, dist, epoch: int):
        """Every question of the evaluation file answered (:meth:`answers`) and scored with the official VQA
        accuracy (rank 0): ``overall``, ``perAnswerType_<type>``, ``coverage_*``."""
        from ...data.vision import load_image, preprocess
        from ...data.vqa import read_vqa
        from ...vqa_nlvr import score_vqa

        data = self.eval_data(cfg)
        if data is None or not dist.main:
            return None
        ann = read_vqa(data, cfg["images"], max_words=self.max_words)
        preds, b = [], cfg["batch_size"]
        with self.evaluating(cfg, model):
            for s in range(0, len(ann), b):
                rows = range(s, min(s + b, len(ann)))
                px = torch.stack([preprocess(self.processor, load_image(os.path.join(cfg["images"],
                                                                                     ann.images[ann.image_index[r]])))
                                  for r in rows])
                preds += self.answers(model, px, [ann.captions[r] for r in rows], cfg)
        with open(os.path.join(cfg["out"], f"answers-epoch{epoch}.jsonl"), "w") as fh:
            fh.writelines(json.dumps({"question_id": q, "answer": a}) + "\n" for q, a in zip(ann.question_id, preds))
        res = score_vqa(preds, ann)
        return {"questions": len(preds),
                **BlipFinetuneTask.metrics(self, {k: res[k] for k in ("overall", "perAnswerType", "coverage")})}

    def answers(self, model, pixel_values: torch.Tensor, questions: list, cfg: dict) -> list:
        """Open-ended answers as BLIP-2's ``predict_answers`` generates them (``Blip2T5`` / ``Blip2OPT``: beam 5,
        at most 10 new tokens, min 1, Flan-T5's length penalty -1), the question in the Q-Former and the training
        prompt (without the space a decoder-only LLM's answer follows) in the LLM."""
        from ...data import tokenize
        from ...models.llm import decoding_settings

        tok = self.tok
        dev = next(model.parameters()).device
        settings = decoding_settings("vqa", is_encoder_decoder=model.is_encoder_decoder)
        side = tok.padding_side
        tok.padding_side = "right" if model.is_encoder_decoder else "left"
        try:
            enc = tok([cfg["prompt"].format(q) for q in questions], padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        qids, qmask = tokenize(self.qtok, questions, cfg["max_txt_len"], longest=True)
        out = model.generate(pixel_values=pixel_values.to(dev), input_ids=enc["input_ids"].to(dev),
                             attention_mask=enc["attention_mask"].to(dev), qformer_input_ids=qids.long().to(dev),
                             qformer_attention_mask=qmask.long().to(dev), settings=settings)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
