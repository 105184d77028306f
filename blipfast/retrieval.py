"""BLIP-2 image-text retrieval evaluation (LAVIS ``RetrievalTask``): recall@K, the gallery's data, the pipeline
behind ``blipfast retrieval``.

- :func:`recall_at_k`: LAVIS' ``_report_metrics`` (txt_r1/5/10, img_r1/5/10, their means, r_mean, agg_metrics) for
  galleries with several captions per image; ties are counted against the ground truth, NaN scores give NaN.
- :func:`read_annotations`: LAVIS' retrieval annotation (a JSON list, or JSON lines, of
  ``{"image": path, "caption": str | [str, ...]}``) as a :class:`Gallery` (image paths, captions, ``img2txt`` and
  ``txt2img`` in LAVIS' order): :func:`blipfast.data.read_gallery`, the reader of the training annotations seen as a
  gallery; :func:`pre_caption` is LAVIS' caption processor and :func:`tokenize` LAVIS' retrieval tokenisation, both
  :mod:`blipfast.data`'s.
- :func:`load_images` (the images through an image processor of :mod:`blipfast.data.vision`: by default BLIP's
  eval transform, LAVIS' ``blip_image_eval``) and :func:`load_features` (image tokens before ``ln_vision`` from a
  ``blipfast cache-features`` cache).
- :func:`load_videos` and :func:`video_score_matrices`: BLIP's zero-shot text-video retrieval (the BLIP paper's
  section 5.6, Salesforce BLIP ``eval_retrieval_video.py``) with a
  :class:`~blipfast.models.blip_retrieval.BlipRetrieval`:
  ``num_frames`` frames per video (8), each through the ViT; a video's ITC feature is the mean over its frames of
  the projected [CLS] tokens, normalised; its ITM input is its frames' tokens concatenated [F * N, width]; then the
  image rule: the ITC top ``k`` of each direction re-scored as ITM positive logit plus cosine, the rest -100.
- :func:`evaluate`: score matrices (``Blip2Retrieval.score_matrices``) and metrics, with the seconds each stage took.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.annotations import Gallery, pre_caption
from .data.annotations import read_gallery as read_annotations
from .models.blip2_retrieval import Blip2Retrieval

__all__ = ["Blip2Retrieval", "recall_at_k", "read_annotations", "pre_caption", "load_images", "load_features",
           "load_videos", "video_score_matrices", "tokenize", "evaluate", "format_metrics", "Gallery"]

METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean",
               "agg_metrics")


# ----------------------------------------------------------------------------------------------
# recall@K


def _as_tensor(name: str, x) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"recall_at_k: {name} must be a float matrix, got {list(t.shape)} {t.dtype}")
    return t


def _index_lists(name: str, x, n: int) -> list:
    if isinstance(x, Mapping):
        try:
            x = [x[i] for i in range(n)]
        except KeyError as e:
            raise ValueError(f"recall_at_k: {name} has no entry for row {e.args[0]} (keys must be 0..{n - 1})") \
                from None
    x = x.tolist() if isinstance(x, torch.Tensor) else list(x)
    if len(x) != n:
        raise ValueError(f"recall_at_k: {name} needs {n} entries (one per row of the score matrix), got {len(x)}")
    return x


def _ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per row: how many non-ground-truth entries score at least as high as the best ground-truth entry (LAVIS'
    rank of the best-placed ground truth in the descending order, ties against the ground truth); NaN rows NaN."""
    out = []
    for i in range(0, scores.shape[0], 1024):
        s, g = scores[i:i + 1024].double(), gt[i:i + 1024]
        best = torch.where(g, s, torch.full_like(s, -math.inf)).amax(1, keepdim=True)
        r = ((s >= best) & ~g).sum(1).double()
        out.append(torch.where(torch.isnan(s).any(1), torch.full_like(r, math.nan), r))
    return torch.cat(out)


def recall_at_k(score_i2t, score_t2i, img2txt, txt2img) -> dict:
    """LAVIS' retrieval metrics (percentages) from the score matrices [N_img, N_txt] and [N_txt, N_img].

    ``img2txt[i]``: the caption indices of image i (a list per image, or a dict keyed 0..N_img-1); ``txt2img[t]``:
    the image of caption t. An image counts at rank R when its best-placed caption has fewer than R others at or
    above its score (ties count against it; LAVIS' argsort leaves them to the sort); NaN in a row makes the
    metrics NaN. Returns ``txt_r1, txt_r5, txt_r10, txt_r_mean`` (image -> text), ``img_r1, img_r5, img_r10,
    img_r_mean`` (text -> image), ``r_mean`` and LAVIS' ``agg_metrics`` (= txt_r_mean)."""
    s_i2t, s_t2i = _as_tensor("score_i2t", score_i2t), _as_tensor("score_t2i", score_t2i)
    n_img, n_txt = s_i2t.shape
    if s_t2i.shape != (n_txt, n_img):
        raise ValueError(f"recall_at_k: score_t2i must be [{n_txt}, {n_img}] (the transpose's shape of score_i2t), "
                         f"got {list(s_t2i.shape)}")
    i2t, t2i = _index_lists("img2txt", img2txt, n_img), _index_lists("txt2img", txt2img, n_txt)
    gt_i2t = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, caps in enumerate(i2t):
        caps = [caps] if isinstance(caps, int) else list(caps)
        if any(not 0 <= c < n_txt for c in caps):
            raise ValueError(f"recall_at_k: img2txt[{i}] = {caps} has a caption index outside [0, {n_txt})")
        gt_i2t[i, caps] = True
    if any(not 0 <= int(j) < n_img for j in t2i):
        raise ValueError(f"recall_at_k: txt2img has an image index outside [0, {n_img})")
    gt_t2i = torch.zeros(n_txt, n_img, dtype=torch.bool)
    gt_t2i[torch.arange(n_txt), torch.tensor([int(j) for j in t2i], dtype=torch.long)] = True
    out = {}
    for prefix, ranks in (("txt", _ranks(s_i2t.cpu(), gt_i2t)), ("img", _ranks(s_t2i.cpu(), gt_t2i))):
        nan = bool(torch.isnan(ranks).any())
        for r in (1, 5, 10):
            out[f"{prefix}_r{r}"] = math.nan if nan else 100.0 * float((ranks < r).double().mean())
        out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{r}"] for r in (1, 5, 10)) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out


def format_metrics(metrics: dict) -> str:
    """The recall table that ``blipfast retrieval`` prints."""
    lines = [f"{'':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}"]
    for name, p in (("image -> text", "txt"), ("text -> image", "img")):
        lines.append(f"{name:<16}" + "".join(f"{metrics[f'{p}_{k}']:>8.2f}" for k in ("r1", "r5", "r10", "r_mean")))
    lines.append(f"{'r_mean':<16}{metrics['r_mean']:>8.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# data


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
    """LAVIS' retrieval tokenisation (truncation at ``max_length`` = 35), padded to the longest caption:
    :func:`blipfast.data.tokenize` with ``longest=True``."""
    from .data.tokenizer import tokenize as _tokenize

    return _tokenize(tokenizer, list(texts), max_length, longest=True)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths, processor):
        self.paths, self.processor = paths, processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from .data.vision import load_image, preprocess

        return preprocess(self.processor, load_image(str(self.paths[i])))


def load_images(model: Blip2Retrieval, folder, paths: Sequence[str], *, batch_size: int = 64, workers: int = 4,
                progress: bool = False, processor=None) -> torch.Tensor:
    """The vision model's tokens before ``ln_vision`` [N, L, width] of the images ``folder / path``, read by
    ``workers`` processes through ``processor`` (default: BLIP's eval transform at the vision model's size,
    :func:`blipfast.data.vision.default_blip_processor`, which is LAVIS' ``blip_image_eval``) and encoded
    ``batch_size`` at a time on the model's device."""
    if model.vision_model is None:
        raise ValueError("--images needs a model with its vision model (an HF Blip2ForImageTextRetrieval folder, "
                         "or a LAVIS checkpoint with --vision-config); use --features otherwise")
    folder = Path(folder)
    files = [folder / p for p in paths]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) not found, e.g. {missing[:3]}")
    if processor is None:
        from .data.vision import default_blip_processor

        processor = default_blip_processor(model.vision_model.config.image_size)
    loader = torch.utils.data.DataLoader(_ImageFiles(files, processor), batch_size=batch_size, num_workers=workers,
                                         pin_memory=model.device.type == "cuda")
    out = [model.encode_images(x.to(model.device, non_blocking=True), batch_size)
           for x in tqdm(loader, desc="images", unit="batch", disable=not progress)]
    return torch.cat(out)


def load_features(folder, paths: Sequence[str]) -> torch.Tensor:
    """Image tokens before ``ln_vision`` [N, L, width] (stored dtype) of ``paths`` from a feature cache written by
    ``blipfast cache-features`` (:class:`blipfast.data.features.FeatureCache`: safetensors shards + index.json;
    an image is looked up by its path as the annotation file writes it)."""
    from .data.features import FeatureCache

    cache = FeatureCache(str(folder))
    keys = [p if p in cache else os.path.normpath(p) for p in paths]
    missing = [p for p, k in zip(paths, keys) if k not in cache]
    if missing:
        raise KeyError(f"{folder}: {len(missing)} image(s) of the annotation are not in the feature cache, e.g. "
                       f"{missing[:3]}")
    return torch.stack([cache.get(k) for k in keys])


class _VideoFiles(_ImageFiles):
    def __init__(self, paths, processor, num_frames):
        super().__init__(paths, processor)
        self.num_frames = num_frames

    def __getitem__(self, i):
        from .data.video import read_frames
        from .data.vision import preprocess

        return torch.stack([preprocess(self.processor, f) for f in read_frames(str(self.paths[i]), self.num_frames)])


@torch.no_grad()
def load_videos(model, folder, paths: Sequence[str], *, num_frames: int = 8, batch_size: int = 8, workers: int = 4,
                progress: bool = False, processor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ViT tokens [V, F * N, width] on the CPU, as BLIP keeps them, and the normalised ITC features [V, E]) of the
    videos ``folder / path`` (frame folders or video files: :func:`blipfast.data.video.read_frames`), ``num_frames``
    frames each through ``processor`` (default BLIP's eval transform at the ViT's size) and a BLIP (v1)
    ``model``'s ViT, ``batch_size`` videos at a time (see the module docstring)."""
    from .data.video import check_video
    from .models.blip_finetune import video_tokens

    folder = Path(folder)
    files = [folder / p for p in paths]
    for i, f in enumerate(files):
        check_video(f, f"gallery item {i}")
    if processor is None:
        from .data.vision import default_blip_processor

        processor = default_blip_processor(model.config.vision.image_size)
    loader = torch.utils.data.DataLoader(_VideoFiles(files, processor, num_frames), batch_size=batch_size,
                                         num_workers=workers)
    tokens, feats = [], []
    was = model.training
    model.eval()
    try:
        for x in tqdm(loader, desc="videos", unit="batch", disable=not progress):
            t = video_tokens(model.vision_model, x.to(model.device))  # [B, F * N, width]
            cls = t.view(t.shape[0], num_frames, -1, t.shape[-1])[:, :, 0]  # each frame's [CLS]
            proj = F.linear(cls.to(model.score_dtype), model.vision_proj.weight.to(model.score_dtype),
                            model.vision_proj.bias.to(model.score_dtype))
            feats.append(F.normalize(proj.mean(1), dim=-1))
            tokens.append(t.cpu())
    finally:
        model.train(was)
    return torch.cat(tokens), torch.cat(feats)


@torch.no_grad()
def video_score_matrices(model, video_embeds: torch.Tensor, video_feats: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, *, k: int, batch_size: int = 1024, image_batch_size: int = 64,
                         text_batch_size: int = 1024, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(score_v2t [V, N_txt], score_t2v [N_txt, V]) of BLIP's zero-shot video retrieval: the cosine of the
    videos' ITC features (:func:`load_videos`) and the captions', every direction's top ``k`` re-scored by
    :meth:`BlipRetrieval.itm_scores` on the concatenated frame tokens plus the cosine (the rest -100)."""
    from .models.blip_retrieval import rerank_topk

    txt = torch.cat([model.text_features(input_ids[i:i + text_batch_size], attention_mask[i:i + text_batch_size])
                     for i in range(0, input_ids.shape[0], text_batch_size)])

    def itm(video_index, text_index):
        return model.itm_scores(video_embeds, input_ids, attention_mask, video_index, text_index,
                                batch_size=batch_size, image_batch_size=image_batch_size, progress=progress)

    return rerank_topk(video_feats.to(txt.device, txt.dtype) @ txt.t(), k, itm)


# ----------------------------------------------------------------------------------------------


def evaluate(model: Blip2Retrieval, gallery: Gallery, tokenizer, *, images=None, features=None, k: int = 128,
             batch_size: int = 1024, image_batch_size: int = 64, max_txt_len: int = 35, workers: int = 4,
             progress: bool = False, processor=None, video: bool = False, num_frames: int = 8) -> dict:
    """Score matrices and metrics of a gallery: ``images`` (a folder, with the model's vision model, through
    ``processor``: see :func:`load_images`) or ``features`` (a feature cache folder); ``video``: the gallery's
    items are videos under ``images`` (a BLIP (v1) model; :func:`load_videos`, :func:`video_score_matrices`,
    ``num_frames`` frames each). Returns ``{"score_i2t",
    "score_t2i", "metrics", "seconds", "nonfinite_images"}`` (the gallery's images whose features hold NaN or
    Inf: their scores, and so the metrics, are NaN)."""
    if (images is None) == (features is None):
        raise ValueError("evaluate: give images (a folder) or features (a feature cache), exactly one")
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if video:
        if images is None:
            raise ValueError("evaluate: video=True reads the videos under images (a folder), not features")
        embeds, video_feats = load_videos(model, images, gallery.images, num_frames=num_frames,
                                          batch_size=max(1, image_batch_size // num_frames), workers=workers,
                                          progress=progress, processor=processor)
    elif images is not None:
        embeds = load_images(model, images, gallery.images, batch_size=image_batch_size, workers=workers,
                             progress=progress, processor=processor)
    else:
        embeds = load_features(features, gallery.images)
    bad = (~torch.isfinite(embeds.flatten(1)).all(1)).nonzero().flatten().tolist()
    ids, mask = tokenize(tokenizer, gallery.texts, max_txt_len)
    sync()
    t1 = time.perf_counter()
    if video:
        s_i2t, s_t2i = video_score_matrices(model, embeds, video_feats, ids, mask, k=k, batch_size=batch_size,
                                            image_batch_size=image_batch_size, progress=progress)
    else:
        s_i2t, s_t2i = model.score_matrices(image_embeds=embeds, input_ids=ids, attention_mask=mask, k=k,
                                            batch_size=batch_size, image_batch_size=image_batch_size,
                                            progress=progress)
    s_i2t, s_t2i = s_i2t.cpu(), s_t2i.cpu()
    t2 = time.perf_counter()
    metrics = recall_at_k(s_i2t, s_t2i, gallery.img2txt, gallery.txt2img)
    t3 = time.perf_counter()
    return {"score_i2t": s_i2t, "score_t2i": s_t2i, "metrics": metrics,
            "nonfinite_images": [gallery.images[i] for i in bad],
            "seconds": {"inputs": t1 - t0, "scores": t2 - t1, "recall": t3 - t2, "total": t3 - t0}}
