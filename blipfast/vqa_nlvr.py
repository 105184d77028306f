"""BLIP VQA and NLVR2 end to end (docs/blip-finetune.md): answer the questions of a file over images or videos
with a :class:`blipfast.BlipVQA` (rank inference over an answer list, or generation), predict NLVR2 labels with a
:class:`blipfast.BlipNLVR`, and score them with :mod:`blipfast.evaluation` (the official VQA accuracy, NLVR2's
accuracy and consistency). The ``blip-vqa`` / ``blip-nlvr`` tasks score a split through it (``score_split``), and
``answer_questions(video=True)`` answers video questions (the BLIP paper's zero-shot video QA: 16 frames per video,
their ViT tokens concatenated; ``blipfast eval vqa --video``). :func:`load_task_model` reads the VQA, NLVR2 and
captioning models that ``blipfast eval`` and the tasks score.

Questions are answered in batches; the ViT runs once per distinct image (or video) of a batch and its
cross-attention K/V are shared by the batch's questions about it; the answer list is tokenised once (BLIP:
``padding='longest'``), questions as BLIP does (``padding='longest'``, truncated at 35 tokens).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .data.tokenizer import tokenize

__all__ = ["answer_questions", "load_task_model", "predict_nlvr2", "score_nlvr2", "score_vqa"]


def _pixels(processor, images) -> torch.Tensor:
    from .data.vision import preprocess

    return torch.stack([preprocess(processor, im) for im in images])


def _embeds(model, paths: list, processor, *, video: bool, num_frames: int, device, dtype) -> torch.Tensor:
    """ViT tokens [M, N, width] of images, or [M, F * N, width] of videos (frames concatenated)."""
    from .data.vision import load_image
    from .models.blip_finetune import video_tokens

    if video:
        from .data.video import read_frames

        frames = torch.stack([_pixels(processor, read_frames(p, num_frames)) for p in paths])
        return video_tokens(model.vision_model, frames.to(device, dtype))
    return model.image_embeds(_pixels(processor, [load_image(p) for p in paths]).to(device, dtype))


@torch.no_grad()
def answer_questions(model, tok, ann, images_dir: Optional[str], processor, *, answer_list: Optional[list] = None,
                     inference: str = "rank", k: int = 128, batch_size: int = 32, max_txt_len: int = 35,
                     video: bool = False, num_frames: int = 16, progress: bool = False,
                     generate_kwargs: Optional[dict] = None) -> list:
    """The answer (a string) to every question of ``ann`` (a :class:`blipfast.data.vqa.VqaAnnotations`; its image
    paths relative to ``images_dir``, or videos with ``video``), in order. ``inference``: "rank" (BLIP's
    ``rank_answer`` over ``answer_list`` with ``k`` candidates) or "generate" (beam 3, at most 10 tokens;
    ``generate_kwargs`` go to :meth:`blipfast.BlipVQA.generate_answers`)."""
    if inference not in ("rank", "generate"):
        raise ValueError(f"inference must be 'rank' or 'generate', got {inference!r}")
    if inference == "rank" and not answer_list:
        raise ValueError("rank inference needs an answer list (--answer-list)")
    p = next(model.parameters())
    dev, dt = p.device, p.dtype
    was = model.training
    model.eval()
    if inference == "rank":
        cand = tok(list(answer_list), padding="longest", return_tensors="pt")
        cand_ids, cand_mask = cand["input_ids"].to(dev), cand["attention_mask"].to(dev)
    out = []
    starts = range(0, len(ann), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="questions", unit="batch")
    try:
        for s in starts:
            rows = list(range(s, min(s + batch_size, len(ann))))
            keys: dict = {}
            index = torch.tensor([keys.setdefault(ann.image_index[r], len(keys)) for r in rows], device=dev)
            paths = [ann.images[i] if images_dir is None else os.path.join(images_dir, ann.images[i]) for i in keys]
            embeds = _embeds(model, paths, processor, video=video, num_frames=num_frames, device=dev, dtype=dt)
            ids, mask = tokenize(tok, [ann.captions[r] for r in rows], max_txt_len, longest=True)
            ids, mask = ids.to(dev).long(), mask.to(dev)
            states = model.question_states(embeds, ids, mask, image_index=index)
            if inference == "rank":
                best = model.rank_answers(states, mask, cand_ids, cand_mask, k)[0].tolist()
                out += [answer_list[i] for i in best]
            else:
                gen = model.generate_answers(states, **(generate_kwargs or {}))
                out += [a.strip() for a in tok.batch_decode(gen, skip_special_tokens=True)]
    finally:
        model.train(was)
    return out


def score_vqa(answers: list, ann, rule: str = "lavis") -> dict:
    """The official VQA accuracy of ``answers`` (in ``ann``'s order) against the human answers of ``ann`` (every
    question needs its answers; a single string counts as one human answer)."""
    from .evaluation.vqa import vqa_accuracy

    refs, preds = {}, {}
    for r, (qid, human) in enumerate(zip(ann.question_id, ann.human)):
        if human is None:
            raise ValueError(f"{ann.path}: question {qid!r} (line {ann.lines[r]}) has no answers to score against")
        refs[qid] = {"answers": human if isinstance(human, list) else [human]}
        preds[qid] = answers[r]
    return vqa_accuracy(preds, refs, rule=rule)


@torch.no_grad()
def predict_nlvr2(model, tok, ann, images_dir: Optional[str], processor, *, batch_size: int = 64,
                  max_txt_len: int = 64) -> list:
    """The predicted label (bool: the sentence is true) of every example of ``ann`` (a
    :class:`blipfast.data.nlvr2.Nlvr2Annotations`), in order (no left/right swap)."""
    from .data.vision import load_image

    p = next(model.parameters())
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(ann), batch_size):
            rows = range(s, min(s + batch_size, len(ann)))
            pairs = [[load_image(ann.image_path(images_dir, r)), load_image(ann.image_path2(images_dir, r))]
                     for r in rows]
            px = torch.stack([_pixels(processor, pair) for pair in pairs]).to(p.device, p.dtype)
            ids, mask = tokenize(tok, [ann.captions[r] for r in rows], max_txt_len, longest=True)
            logits = model(px, ids.to(p.device).long(), mask.to(p.device)).logits
            out += (logits.argmax(1) == 1).tolist()
    finally:
        model.train(was)
    return out


def score_nlvr2(predictions: list, ann) -> dict:
    """NLVR2's accuracy (and consistency, with NLVR2 identifiers) of ``predictions`` against ``ann``'s labels."""
    from .evaluation.nlvr2 import nlvr2_accuracy

    ids = [str(i) for i in ann.identifier]
    return nlvr2_accuracy(dict(zip(ids, predictions)), dict(zip(ids, ann.labels)))


def load_task_model(path: str, kind: str, *, tokenizer: Optional[str] = None, state_dict: Optional[dict] = None):
    """(model, tokenizer) of a BLIP VQA (``kind`` "vqa"), NLVR2 ("nlvr") or captioning ("caption") checkpoint: a
    ``blipfast train`` run or checkpoint folder of that task (its config and tokenizer), or a Salesforce BLIP
    ``.pth`` (the sizes read from its weights, 64-wide heads as BLIP's ViT and BERT; ``tokenizer``: a BERT
    tokenizer folder, [DEC] and [ENC] added; ``state_dict``: its weights when already read)."""
    from . import convert
    from .data.tokenizer import add_enc_token, load_tokenizer
    from .models.blip_caption import BlipCaptionConfig, BlipCaptioner
    from .models.blip_nlvr import BlipNLVR
    from .models.blip_vqa import BlipVQA

    if kind not in ("vqa", "nlvr", "caption"):
        raise ValueError(f"load_task_model: kind must be 'vqa', 'nlvr' or 'caption', got {kind!r}")
    cls = {"vqa": BlipVQA, "nlvr": BlipNLVR, "caption": BlipCaptioner}[kind]
    src = convert.resolve_source(path, what="--model")
    run = src.run_config or {}
    tok_dir = tokenizer or run.get("tokenizer") or (path if os.path.isdir(path) else None)
    if tok_dir is None:
        raise ValueError("--tokenizer is needed when --model is a file (a BERT tokenizer folder)")
    tok = add_enc_token(load_tokenizer(tok_dir))
    if tok.bos_token_id is None:
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if run.get("model"):
        model = cls({k: v for k, v in run["model"].items() if k != "name"})
        convert.load_into(model, src, what="--model")
        return model, tok
    sd = state_dict if state_dict is not None else convert.load_state_dict(src.weights)
    hf, _ = convert.to_hf(sd)
    ids = {"pad_token_id": tok.pad_token_id, "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id,
           "bos_token_id": tok.bos_token_id}
    prefix = "text_decoder.bert." if kind == "caption" else "text_encoder."
    sizes = BlipCaptionConfig.from_state_dict(hf.state_dict, prefix, text=ids, bos_token_id=tok.bos_token_id)
    if kind == "caption":
        model = cls(sizes)
    else:
        text = {k: v for k, v in sizes.to_dict()["text"].items() if k != "encoder_hidden_size"}
        model = cls({"text": text, "vision": sizes.to_dict()["vision"], "bos_token_id": tok.bos_token_id,
                     "enc_token_id": tok.convert_tokens_to_ids("[ENC]")})
    model.load_lavis_state_dict(sd)
    return model, tok
