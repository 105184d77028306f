"""``blip-vqa``: BLIP (v1) VQA fine-tuning, :class:`blipfast.BlipVQA` (Salesforce BLIP's ``train_vqa.py`` with
``configs/vqa.yaml``; docs/blip-finetune.md).

- Data (:mod:`blipfast.data.vqa`): the VQAv2 and Visual Genome QA lists BLIP trains on (``--data
  vqa_train.json,vqa_val.json,vg_qa.json``; one ``--images`` folder holding both image trees), each question with
  its weighted answers. Questions are tokenised to ``--max-txt-len`` (BLIP: 35); the answers of each question fill
  ``A`` fixed slots (``A``: the most answers any question has, 10 at most for VQAv2), unused slots with weight 0,
  each answer padded to the longest answer of the data: every step has the same shapes.
- The recipe (``configs/vqa.yaml``): 480 px, batch 16, AdamW lr 2e-5 with weight decay 0.05 on every parameter,
  a cosine from 2e-5 to 0 per epoch without warm-up, 10 epochs, ``k_test`` 128; the ViT trains (stochastic depth
  0.1, BLIP's VQA ViT), its position embeddings interpolated from a 224 px checkpoint.
- ``--init``: a Salesforce BLIP pre-training (``model_base.pth``, ``model_base_capfilt_large.pth``) or VQA checkpoint
  (``model_base_vqa_capfilt_large.pth``), or a blipfast run; ``--vision``: a BLIP ViT's weights only.
- Evaluation (:meth:`BlipVQATask.score_split`): rank inference over an answer list (BLIP's ``answer_list.json``) and the
  official VQA accuracy, through :mod:`blipfast.vqa_nlvr`; during training with ``--eval-every`` on ``--eval-data``
  (or the synthetic set's ``vqa_eval.json``) and ``--answer-list`` (or the synthetic set's answer list), no
  evaluation by default (``train_vqa.py`` answers the test split once, after training).

:class:`~blipfast.train.tasks.blip_pretrain.BlipFinetuneTask` is what BLIP's fine-tuning tasks share: the ViT at the
task's size, BLIP's tokenizer with [ENC], the model configuration from the ``blip-task`` presets, the weights of
``--vision`` and ``--init`` through the task model's BLIP loader, the evaluation through :meth:`score_split`.
"""
from __future__ import annotations

import os

import torch

from .base import _need, register
from .blip_pretrain import BlipFinetuneTask


@register
class BlipVQATask(BlipFinetuneTask):
    """:class:`blipfast.BlipVQA` fine-tuning (see the module docstring)."""

    name = "blip-vqa"
    title = "BLIP VQA fine-tuning"
    spelling = "--task blip-vqa"
    max_words = 50  # BLIP's pre_question(question, max_ques_words=50)
    # Salesforce BLIP configs/vqa.yaml and train_vqa.py
    defaults = {**BlipFinetuneTask.defaults, "lr": 2e-5, "warmup_lr": 2e-5, "batch_size": 16, "epochs": 10.0,
                "max_txt_len": 35}
    streams = False  # question lists with answers: annotation files, not image-caption streams
    k_test = 128
    synthetic_eval = "vqa_eval.json"  # make_synthetic_vqa's evaluation questions (and vqa_answer_list.json)
    takes_answer_list = True
    max_answer_tokens = 32  # an answer longer than this (never in VQAv2 / VG) is cut

    @staticmethod
    def model_classes() -> tuple:
        from ...models.blip_vqa import BlipVQA, BlipVQAConfig

        return BlipVQA, BlipVQAConfig

    def synthetic(self, folder: str, size: int, seed: int) -> dict:
        from ...data.vqa import make_synthetic_vqa

        paths = make_synthetic_vqa(folder, size, seed)
        return {"data": paths["data"], "images": paths["images"]}

    def read_data(self, cfg: dict, features: bool):
        from ...data.vqa import read_vqa

        self.ann = read_vqa(cfg["data"], cfg["images"], check_images=not features, max_words=self.max_words)
        return self.ann

    def dataset(self, ann, images, processor, text, report_path, augment=None):
        from ...data.vqa import VqaDataset

        return VqaDataset(ann, images, processor, text, report_path=report_path, augment=augment)

    def tokenizer_texts(self, ann) -> list:
        return list(ann.captions) + [a for answers in ann.answers for a in answers]

    def tokenize(self, model, tok, captions: list, cfg: dict) -> dict:
        """The questions (``input_ids`` / ``attention_mask`` [P, --max-txt-len]) and each question's answers in
        fixed slots (``answer_ids`` / ``answer_mask`` [P, A, Ta], ``answer_weight`` float32 [P, A])."""
        from ...data import tokenize

        ids, mask = tokenize(tok, captions, cfg["max_txt_len"])
        answers = self.ann.answers
        counts = torch.tensor([len(a) for a in answers])
        flat = [a for row in answers for a in row]
        limit = min(self.max_answer_tokens, model.config.text.max_position_embeddings)
        a_ids, a_mask = tokenize(tok, flat, limit, longest=True)
        p, slots, ta = len(answers), int(counts.max()), a_ids.shape[1]
        row = torch.repeat_interleave(torch.arange(p), counts)
        slot = torch.arange(len(flat)) - (torch.cumsum(counts, 0) - counts)[row]
        s_ids = torch.full((p, slots, ta), tok.pad_token_id, dtype=torch.int32)
        s_mask = torch.zeros(p, slots, ta, dtype=torch.bool)
        s_ids[..., 0], s_mask[..., 0] = tok.cls_token_id, True  # an unused slot: [DEC] alone, weight 0
        s_ids[row, slot], s_mask[row, slot] = a_ids, a_mask
        weight = torch.zeros(p, slots, dtype=torch.float32)
        weight[row, slot] = torch.tensor([w for row_w in self.ann.weights for w in row_w], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "answer_ids": s_ids, "answer_mask": s_mask,
                "answer_weight": weight}

    def step_loss(self, model, pixel_values, inp: dict, seed):
        out = model(pixel_values, inp["input_ids"], inp["attention_mask"], inp["answer_ids"], inp["answer_mask"],
                    inp["answer_weight"])
        return out.loss, out.loss.detach().float().reshape(1)

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        """As the other BLIP tasks; ``--eval-every`` needs ``--answer-list`` unless the run trains on the synthetic
        set (whose answer list it then takes)."""
        super().check_options(cfg)
        _need(not cfg["eval_every"] or cfg["answer_list"] is not None or cfg["data"] is None
              or cls.synthetic_folder(cfg) is not None,
              f"--eval-every {cfg['eval_every']} with --task blip-vqa needs --answer-list FILE: the candidate answers "
              f"of rank inference (BLIP's answer_list.json); or --eval-every 0 and score the run from Python "
              f"(docs/blip-finetune.md)")

    def score_options(self, cfg: dict) -> dict:
        """``--answer-list``, else the synthetic set's answer list (check_options refuses the rest)."""
        return {"answer_list": cfg["answer_list"] or os.path.join(self.synthetic_folder(cfg), "vqa_answer_list.json")}

    def metrics(self, result: dict) -> dict:
        """``overall`` (the official VQA accuracy, percent), one ``perAnswerType_<type>`` per answer type and
        ``coverage_*`` (questions scored) of :func:`blipfast.vqa_nlvr.score_vqa`."""
        return super().metrics({k: result[k] for k in ("overall", "perAnswerType", "coverage")})

    def score_split(self, model, tok, data: str, images: str, *, answer_list, k: int = None, batch_size: int = 32,
                 max_txt_len: int = 35, inference: str = "rank") -> dict:
        """Answer the questions of ``data`` (a VQA list with human answers, LAVIS' ``vqa_val_eval.json`` layout)
        and score them with the official VQA accuracy; ``answer_list``: a path or a list of candidates."""
        from ...data.vision import default_blip_processor
        from ...data.vqa import read_answer_list, read_vqa
        from ...vqa_nlvr import answer_questions, score_vqa

        ann = read_vqa(data, images)
        answers = read_answer_list(answer_list) if isinstance(answer_list, (str, os.PathLike)) else answer_list
        unwrapped = getattr(model, "module", model)
        proc = default_blip_processor(unwrapped.config.vision.image_size)
        pred = answer_questions(unwrapped, tok, ann, images, proc, answer_list=answers, inference=inference,
                                k=k or self.k_test, batch_size=batch_size, max_txt_len=max_txt_len)
        return score_vqa(pred, ann)
