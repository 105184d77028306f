"""BLIP-2 retrieval: ITM re-ranking and the Q-Former image pass, blipfast against Hugging Face transformers.

The baseline of re-ranking is LAVIS' ``compute_sim_matrix`` over HF's ``Blip2ForImageTextRetrieval``: one ITM pass
per query row over its k candidates, the row's image repeated k times (so its cross-attention K/V are projected k
times) and every layer computed for every row; the ViT runs once per image on both sides (LAVIS caches its
features), so it is left out of both. blipfast: ``Blip2Retrieval.itm_scores`` (image K/V once per image shared
through ``kv_index``, the last layer for the query rows only, 1024 pairs per pass). Default BLIP-2 Q-Former
(12 layers, 32 queries), ViT-g tokens [257, 1408], captions of 35 tokens (LAVIS pads to 35), the same weights.

Counted on every device (``counted``: 64 images x k = 128 candidates, float32, on meta tensors with the GPU's
dispatch; see blipfast/bench/counting.py): FLOPs, operators dispatched, host syncs. Target of the issue: FLOPs
<= 0.7x the HF loop. Meta tensors carry no caption lengths, so blipfast is counted at the full 35 columns
(on real captions it cuts each batch to its longest caption: fewer FLOPs than counted).

Timed on CUDA (``cases``, bf16 weights): the Q-Former image pass at B = 256 (HF ``Blip2QFormerModel`` with SDPA,
eager and under torch.compile), ITM re-rank pairs/s (16 images x 128 candidates; captions of 35 tokens, and of
8-35 tokens padded to 35), and ``gallery``: a synthetic
5k-image / 25k-caption gallery (COCO test size) from cached features to the recall table.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .common import Case, captions
from .counting import Cost, count_step, counting_gpu_path, format_cost_table

BASELINE = "HF loop (LAVIS compute_sim_matrix)"
OURS = "blipfast Blip2Retrieval.itm_scores"
TARGETS = {"flops": 0.7}
N_TOKENS, WIDTH, TEXT_LEN = 257, 1408, 35


def hf_retrieval_model(dtype=torch.float32):
    """HF ``Blip2ForImageTextRetrieval`` with BLIP-2's Q-Former (vocab with [DEC], text FFN) and SDPA; its ViT is a
    1-layer stand-in of ViT-g's width (never run here: both sides start from the ViT's tokens)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    cfg = Blip2Config(vision_config=dict(hidden_size=WIDTH, num_hidden_layers=1),
                      qformer_config=dict(vocab_size=30523, use_qformer_text_input=True), num_query_tokens=32,
                      image_text_hidden_size=256)
    for c in (cfg, cfg.qformer_config):
        try:
            c._attn_implementation = "sdpa"
        except Exception:  # noqa: BLE001  (older transformers spell it differently; the default is then used)
            pass
    return Blip2ForImageTextRetrieval(cfg).to(dtype).eval()


def hf_itm_scores(hf, image_tokens: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
    """HF ``Blip2ForImageTextRetrieval.forward(use_image_text_matching_head=True)`` after its vision model, on
    ``image_tokens`` (post_layernorm'd ViT tokens, one row per pair): the positive logit, mean over queries."""
    b = image_tokens.shape[0]
    queries = hf.query_tokens.expand(b, -1, -1)
    mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long, device=queries.device), attention_mask], 1)
    # HF's forward also passes an all-ones encoder_attention_mask; without it the result is the same (on meta
    # tensors HF could not tell that it is all ones, and its [B, 1, Q + T, Lk] form fails on the Q cross rows)
    out = hf.qformer(query_embeds=hf.embeddings(input_ids=input_ids, query_embeds=queries),
                     query_length=queries.shape[1], attention_mask=mask, encoder_hidden_states=image_tokens)
    return hf.itm_head(out[0][:, :queries.shape[1]]).mean(1)[:, 1]


def hf_rerank_loop(hf, image_tokens, input_ids, attention_mask, candidates) -> torch.Tensor:
    """LAVIS' i2t loop over HF: per image, its tokens repeated k times against its k candidate texts."""
    tokens = hf.vision_model.post_layernorm(image_tokens)  # LAVIS: ln_vision once per image (forward_image)
    k = candidates.shape[1]
    return torch.stack([hf_itm_scores(hf, tokens[i:i + 1].repeat(k, 1, 1), input_ids[candidates[i]],
                                      attention_mask[candidates[i]]) for i in range(candidates.shape[0])])


def _inputs(n_images, n_texts, k, device, dtype=torch.float32, generator=None):
    img = torch.randn(n_images, N_TOKENS, WIDTH, device=device, dtype=dtype, generator=generator)
    ids, mask = captions(n_texts, TEXT_LEN, 1, 30000, 8, device, generator)
    cand = torch.stack([torch.randperm(n_texts, generator=generator)[:k] for _ in range(n_images)]).to(device)
    return img, ids, mask, cand


@contextlib.contextmanager
def _sdpa_as_on_gpu():
    """HF's SDPA calls on meta tensors as the memory-efficient kernel CUDA runs (counting.sdpa), not PyTorch's
    decomposed math path: the baseline's operators are counted as on a GPU."""
    from . import counting

    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type != "meta" or is_causal or kw or (scale is not None and scale != q.shape[-1] ** -0.5):
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return counting.sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def counted(n_images: int = 64, k: int = 128, batch_size: int = 1024) -> list[tuple[str, Cost]]:
    """[(name, Cost)] of re-ranking k candidates of each of ``n_images`` images (forward only), the HF loop and
    blipfast, counted on meta tensors with the dispatch of a CUDA device (float32)."""
    from ..models.blip2_retrieval import Blip2Retrieval

    with torch.device("meta"):
        hf = hf_retrieval_model()
        model = Blip2Retrieval.from_hf(hf)
    g = torch.Generator().manual_seed(0)
    img, ids, mask, cand = _inputs(n_images, max(k, 2 * k), k, "cpu", generator=g)
    img, ids, mask = img.to("meta"), ids.to("meta"), mask.to("meta")
    pair_img = torch.arange(n_images).repeat_interleave(k)  # CPU indices: blipfast plans its batches on the host
    pair_txt = cand.flatten()

    def base():
        with torch.no_grad():
            hf_rerank_loop(hf, img, ids, mask, cand.to("meta"))

    def ours():
        model.itm_scores(img, ids, mask, pair_img, pair_txt, batch_size=batch_size, image_batch_size=n_images)

    with counting_gpu_path(), _sdpa_as_on_gpu():
        return [(BASELINE, count_step(base)), (OURS, count_step(ours))]


def counted_report(n_images: int = 64, k: int = 128) -> tuple[str, dict]:
    """The counted table (text) and its JSON, with the ratios and whether the target is met."""
    rows = counted(n_images, k)
    base, ours = rows[0][1], rows[1][1]
    ratio = ours.ratio(base)
    met = {key: ratio[key] <= v for key, v in TARGETS.items()}
    table = format_cost_table(rows, BASELINE)
    table += "\ntargets: " + ", ".join(f"{key} <= {v}x {'met' if met[key] else 'NOT met'}"
                                       for key, v in TARGETS.items())
    payload = {"images": n_images, "k": k, "text_len": TEXT_LEN, "image_tokens": N_TOKENS, "dtype": "float32",
               "counted_on": "meta, GPU dispatch", "rows": {name: c.as_dict() for name, c in rows}, "ratio": ratio,
               "targets": TARGETS, "met": met}
    return (f"retrieval ITM re-rank, counted ({n_images} images x k = {k}, T = {TEXT_LEN}, default Q-Former, fp32)\n"
            + table, payload)


# ----------------------------------------------------------------------------------------------
# timed (CUDA)


def _image_pass_cases(device, dtype, batch: int) -> list[Case]:
    from ..models.qformer import QFormer
    from .qformer import _flops_fwd

    hf = hf_retrieval_model(dtype).to(device)
    qf = QFormer.from_hf(hf.qformer)
    cfg = hf.config.qformer_config
    x = torch.randn(batch, N_TOKENS, WIDTH, device=device, dtype=dtype)
    queries = hf.query_tokens.expand(batch, -1, -1)

    def run(m):
        def f():
            with torch.no_grad():
                return m(query_embeds=queries, encoder_hidden_states=x)[0]
        return f

    compiled = torch.compile(hf.qformer)
    g = f"retrieval Q-Former image pass B={batch}"
    flops = _flops_fwd(cfg, batch, queries.shape[1], 0, N_TOKENS, text=False)
    params = dict(batch=batch, queries=queries.shape[1], image_tokens=N_TOKENS, dtype=str(dtype).replace("torch.", ""))
    return [Case(g, "HF Blip2QFormerModel (SDPA)", run(hf.qformer), flops=flops, baseline=True, params=params),
            Case(g, "HF, torch.compile", run(compiled), flops=flops, baseline=True, params=params,
                 optional="torch.compile (Inductor with Triton) does not work on this torch/device"),
            Case(g, "blipfast QFormer", run(qf), flops=flops, params=params)]


def _rerank_cases(device, dtype, n_images: int, k: int) -> list[Case]:
    """Two groups on the same pairs: captions of 35 tokens (the counted FLOPs apply to both sides), and captions
    of 8-35 tokens padded to 35 as LAVIS pads them (HF runs the 35 columns; blipfast cuts each batch to its
    longest caption, so its FLOPs are not the counted ones and are not reported)."""
    from ..models.blip2_retrieval import Blip2Retrieval

    hf = hf_retrieval_model(dtype).to(device)
    model = Blip2Retrieval.from_hf(hf).to(dtype)
    img, ids, mask, cand = _inputs(n_images, 4 * k, k, device, dtype)
    pair_img, pair_txt = torch.arange(n_images).repeat_interleave(k), cand.flatten().cpu()
    flops = {name: c.flops for name, c in counted(n_images, k)}
    params = dict(pairs=n_images * k, images=n_images, k=k, text_len=TEXT_LEN, dtype=str(dtype).replace("torch.", ""))
    out = []
    for label, m in (("35-token captions", torch.ones_like(mask)), ("captions of 8-35 tokens", mask)):
        g = f"retrieval ITM re-rank {n_images}x{k} pairs, {label}"

        def base(m=m):
            with torch.no_grad():
                return hf_rerank_loop(hf, img, ids, m, cand)

        def ours(m=m):
            return model.itm_scores(img, ids, m, pair_img, pair_txt)

        out += [Case(g, BASELINE, base, flops=flops[BASELINE], baseline=True, params=params),
                Case(g, "blipfast", ours, flops=flops[OURS] if m is not mask else None, params=params)]
    return out


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False,
          batch: Optional[int] = None) -> list[Case]:
    """Timed cases (CUDA only: the default Q-Former over thousands of pairs takes minutes on a CPU)."""
    if device.type != "cuda":
        return []
    return _image_pass_cases(device, dtype, batch or (64 if quick else 256)) + \
        _rerank_cases(device, dtype, 4 if quick else 16, 128)


def images_per_s(results) -> str:
    """Throughput of the timed rows: images/s of the image pass, pairs/s of the ITM re-rank (``blipfast bench``
    prints it under the table)."""
    lines = []
    for r in results:
        if r.ms is None:
            continue
        if r.group.startswith("retrieval Q-Former image pass"):
            lines.append(f"  image pass  {r.name:<40} {r.params['batch'] / (r.ms / 1e3):10.0f} images/s")
        elif r.group.startswith("retrieval ITM re-rank"):
            lines.append(f"  ITM re-rank {r.name:<40} {r.params['pairs'] / (r.ms / 1e3):10.0f} pairs/s")
    return "\n".join(lines)


def gallery(device: torch.device, dtype: torch.dtype = torch.bfloat16, n_images: int = 5000, captions: int = 5,
            k: int = 128, batch_size: int = 1024) -> dict:
    """Seconds from cached image features and tokenised captions to the recall table, for a synthetic gallery
    (random default-config model, random ViT-g tokens, ``captions`` random 35-token captions per image)."""
    from ..models.blip2_retrieval import Blip2Retrieval
    from ..retrieval import recall_at_k

    hf = hf_retrieval_model(dtype).to(device)
    model = Blip2Retrieval.from_hf(hf).to(dtype)
    del hf
    g = torch.Generator(device=device).manual_seed(0)
    n_txt = n_images * captions
    img = torch.randn(n_images, N_TOKENS, WIDTH, device=device, dtype=dtype, generator=g)
    ids = torch.randint(1, 30000, (n_txt, TEXT_LEN), device=device, generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    img2txt = [list(range(i * captions, (i + 1) * captions)) for i in range(n_images)]
    txt2img = [t // captions for t in range(n_txt)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    s_i2t, s_t2i = model.score_matrices(image_embeds=img, input_ids=ids, attention_mask=mask, k=k,
                                        batch_size=batch_size)
    sync()
    t1 = time.perf_counter()
    metrics = recall_at_k(s_i2t.cpu(), s_t2i.cpu(), img2txt, txt2img)
    t2 = time.perf_counter()
    scored = int(((s_i2t != -100).sum() + (s_t2i != -100).sum()).item())
    return {"images": n_images, "captions": n_txt, "k": k, "dtype": str(dtype).replace("torch.", ""),
            "seconds_scores": t1 - t0, "seconds_recall": t2 - t1, "seconds_total": t2 - t0,
            "entries_reranked": scored, "r_mean": metrics["r_mean"]}
