"""blipfast.Blip2Retrieval against Hugging Face's Blip2ForImageTextRetrieval run as LAVIS' compute_sim_matrix runs it
(a Python loop per query row: ITC from HF's forward, top k, HF's ITM forward over k repeated copies), feature
extraction against HF's passes, loading, validation. Tiny random models from blipfast.testing.retrieval."""
from __future__ import annotations

import pytest
import torch

from blipfast import Blip2Retrieval, Blip2Stage1, convert
from blipfast.testing.retrieval import NQ, QCFG, VCFG, hf_retrieval_model, jitter_, stage1_config, texts
from tests.helpers.tolerance import assert_close, assert_within_torch_error

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)

F64 = torch.float64
N_IMG = 5
CAPTIONS = [2, 3, 2, 3, 2]  # several captions per image: 12 texts
N_TXT = sum(CAPTIONS)


def _models(dtype=torch.float32):
    hf = hf_retrieval_model().to(dtype)
    return hf, Blip2Retrieval.from_hf(hf, stage1_config()).to(dtype).eval()


def _data(dtype):
    pixels = torch.randn(N_IMG, 3, 32, 32, dtype=dtype)
    ids, mask = texts(N_TXT, 9, pad_rows=(1, 4, 7, 10))
    return pixels, ids, mask


@torch.no_grad()
def naive_hf_scores(hf, pixels, ids, mask, k):
    """LAVIS' compute_sim_matrix over HF's own forward: ITC for all pairs, then per row the top k re-ranked with
    the ITM positive logit (mean over queries) + ITC, one ITM forward of k repeated images/texts per row."""
    itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
             use_image_text_matching_head=False).logits_per_image
    n_img, n_txt = itc.shape
    i2t = torch.full((n_img, n_txt), -100.0, dtype=itc.dtype)
    t2i = torch.full((n_txt, n_img), -100.0, dtype=itc.dtype)
    for i in range(n_img):
        sim, top = itc[i].topk(min(k, n_txt))
        itm = hf(pixel_values=pixels[i:i + 1].repeat(len(top), 1, 1, 1), input_ids=ids[top], attention_mask=mask[top],
                 use_image_text_matching_head=True).logits_per_image[:, 1]
        i2t[i, top] = itm + sim
    for t in range(n_txt):
        sim, top = itc[:, t].topk(min(k, n_img))
        itm = hf(pixel_values=pixels[top], input_ids=ids[t:t + 1].repeat(len(top), 1),
                 attention_mask=mask[t:t + 1].repeat(len(top), 1),
                 use_image_text_matching_head=True).logits_per_image[:, 1]
        t2i[t, top] = itm + sim
    return i2t, t2i


@pytest.mark.parametrize("k", [3, N_IMG, N_TXT, 128])  # k < N; k = N_img (< N_txt); k = N_txt (> N_img); k > both
def test_score_matrices_equal_naive_hf_loop_float64(k):
    hf, model = _models(F64)
    pixels, ids, mask = _data(F64)
    ref_i2t, ref_t2i = naive_hf_scores(hf, pixels, ids, mask, k)
    # small batches: pairs of one image split over several ITM passes, images over several K/V groups
    s_i2t, s_t2i = model.score_matrices(pixel_values=pixels, input_ids=ids, attention_mask=mask, k=k, batch_size=4,
                                        image_batch_size=2, text_batch_size=5)
    for ours, ref in ((s_i2t, ref_i2t), (s_t2i, ref_t2i)):
        assert ours.dtype == F64
        assert torch.equal(ours == -100, ref == -100)  # the same candidates re-ranked
        assert ((ours != -100).sum(1) == min(k, ours.shape[1])).all()
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_score_matrices_float32_within_torch_error():
    """k = N (every entry re-ranked: no top-k choice a float32 rounding could flip), default batch sizes."""
    hf, model = _models()
    pixels, ids, mask = _data(torch.float32)
    ref = naive_hf_scores(hf.double(), pixels.double(), ids, mask, 128)
    low = naive_hf_scores(hf.float(), pixels, ids, mask, 128)
    ours = model.score_matrices(pixel_values=pixels, input_ids=ids, attention_mask=mask, k=128)
    for name, o, r, lo in zip(("score_i2t", "score_t2i"), ours, ref, low):
        assert o.dtype == torch.float32
        assert_within_torch_error(o, r, lo, name=name)


def test_image_embeds_path_and_itm_scores_of_any_pairs():
    hf, model = _models(F64)
    pixels, ids, mask = _data(F64)
    pre = model.encode_images(pixels, batch_size=2)  # ViT tokens before ln_vision
    with torch.no_grad():
        # the same float64 computation up to the order of its reductions (HF picks its own attention kernel)
        assert_close(model.ln_vision(pre), hf.vision_model(pixels)[0])
    a = model.score_matrices(pixel_values=pixels, input_ids=ids, attention_mask=mask, k=4)
    b = model.score_matrices(image_embeds=pre, input_ids=ids, attention_mask=mask, k=4)
    assert_close(a[0], b[0])  # the ViT ran at another batch size there: BLAS may order its sums differently
    assert_close(a[1], b[1])
    # pairs in any order, repeated, images without pairs
    img = torch.tensor([3, 0, 3, 1, 0, 3, 3])
    txt = torch.tensor([2, 11, 2, 0, 5, 7, 1])
    ours = model.itm_scores(pre, ids, mask, img, txt, batch_size=3, image_batch_size=1)
    with torch.no_grad():
        ref = hf(pixel_values=pixels[img], input_ids=ids[txt], attention_mask=mask[txt],
                 use_image_text_matching_head=True).logits_per_image[:, 1]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert model.itm_scores(pre, ids, mask, img[:0], txt[:0]).shape == (0,)

    # LAVIS pads captions to 35 tokens: each batch runs at its texts' longest extent, with the same scores (an
    # all-padding text included)
    ids2, mask2 = torch.cat([ids, torch.zeros(N_TXT, 20, dtype=ids.dtype)], 1), torch.cat([mask, torch.zeros(
        N_TXT, 20, dtype=mask.dtype)], 1)
    ids2[3], mask2[3] = 0, 0
    txt2 = txt.clone()
    txt2[1] = 3
    widths = []
    orig = model.qformer.forward

    def record(query_embeds, *a, **k):
        widths.append(query_embeds.shape[1] - NQ)
        return orig(query_embeds, *a, **k)

    model.qformer.forward = record
    try:
        padded = model.itm_scores(pre, ids2, mask2, img, txt2, batch_size=3)
    finally:
        del model.qformer.forward
    with torch.no_grad():
        ref2 = hf(pixel_values=pixels[img], input_ids=ids2[txt2], attention_mask=mask2[txt2],
                  use_image_text_matching_head=True).logits_per_image[:, 1]
    torch.testing.assert_close(padded, ref2, rtol=1e-12, atol=1e-12)
    assert widths == [6, 9, 9]  # extents sorted (1, 6, 6 | 9, 9, 9 | 9): never the 29 columns


def test_extract_features_as_lavis_and_hf():
    hf, model = _models(F64)
    pixels, ids, mask = _data(F64)
    ids, mask = ids[:N_IMG], mask[:N_IMG]
    with torch.no_grad():
        itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        vis = hf.vision_model(pixels)[0]
        q = hf.qformer(query_embeds=hf.query_tokens.expand(N_IMG, -1, -1), encoder_hidden_states=vis).last_hidden_state
        txt = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0,
                         attention_mask=mask).last_hidden_state
        mm = hf.qformer(query_embeds=hf.embeddings(input_ids=ids, query_embeds=hf.query_tokens.expand(N_IMG, -1, -1)),
                        query_length=NQ, attention_mask=torch.cat([torch.ones(N_IMG, NQ, dtype=torch.long), mask], 1),
                        encoder_hidden_states=vis).last_hidden_state[:, :NQ]
    f = model.extract_features(pixel_values=pixels, mode="image")
    assert f.text_embeds is None and f.multimodal_embeds is None
    torch.testing.assert_close(f.image_embeds, q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.image_embeds_proj, itc.image_embeds, rtol=1e-12, atol=1e-12)
    f = model.extract_features(input_ids=ids, attention_mask=mask, mode="text")
    assert f.image_embeds is None and f.text_embeds.shape == (N_IMG, 9, QCFG["hidden_size"])
    torch.testing.assert_close(f.text_embeds[mask.bool()], txt[mask.bool()], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.text_embeds_proj[:, 0], itc.text_embeds, rtol=1e-12, atol=1e-12)  # [CLS]
    torch.testing.assert_close(f.text_embeds_proj.norm(dim=-1), torch.ones(N_IMG, 9, dtype=F64))
    f = model.extract_features(image_embeds=model.encode_images(pixels), input_ids=ids, attention_mask=mask)
    assert f.image_embeds is None and f.text_embeds is None
    torch.testing.assert_close(f.multimodal_embeds, mm, rtol=1e-12, atol=1e-12)
    ones = model.extract_features(input_ids=ids, mode="text").text_embeds  # attention_mask defaults to all ones
    full = model.extract_features(input_ids=ids, attention_mask=torch.ones_like(ids), mode="text").text_embeds
    assert torch.equal(ones, full)


def test_from_stage1_shares_and_from_lavis_loads():
    stage1 = jitter_(Blip2Stage1(stage1_config())).eval()
    model = Blip2Retrieval.from_stage1(stage1)
    assert model.qformer is stage1.qformer and model.query_tokens is stage1.query_tokens
    assert model.itm_head.weight is stage1.itm_head.weight and model.vision_model is None
    assert set(model.state_dict()) == {k for k in stage1.state_dict() if not k.startswith(("qformer_lm_head.", "temp"))}

    # a LAVIS checkpoint: the stage-1 weights under LAVIS names + an EVA ViT (HF's vision weights, LAVIS names)
    hf, ref = _models(F64)
    lavis = Blip2Stage1.from_hf(hf, stage1_config()).to_lavis_state_dict()
    vit = {k: v for k, v in hf.state_dict().items() if k.startswith("vision_model.") and "post_layernorm" not in k}
    lavis.update(convert.hf_to_lavis(vit, strict=True).state_dict)
    loaded = Blip2Retrieval.from_lavis({"model": lavis}, stage1_config(), vision_config=VCFG).double().train()
    pixels, ids, mask = _data(F64)
    a = ref.score_matrices(pixel_values=pixels, input_ids=ids, attention_mask=mask, k=3)
    b = loaded.score_matrices(pixel_values=pixels, input_ids=ids, attention_mask=mask, k=3)  # no dropout in scoring
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert loaded.training and loaded.qformer.training  # the module's mode is restored
    no_vit = {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}
    with pytest.raises(ValueError, match="visual_encoder"):
        Blip2Retrieval.from_lavis(no_vit, stage1_config(), vision_config=VCFG)
    with pytest.raises(ValueError, match="pixel_values need a vision model"):
        Blip2Retrieval.from_lavis(no_vit, stage1_config()).score_matrices(pixel_values=pixels, input_ids=ids,
                                                                          attention_mask=mask)


def test_validation_names_the_argument():
    _, model = _models()
    pixels, ids, mask = _data(torch.float32)
    pre = model.encode_images(pixels)
    kw = dict(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="exactly one"):
        model.score_matrices(**kw)
    with pytest.raises(ValueError, match="exactly one"):
        model.score_matrices(pixel_values=pixels, image_embeds=pre, **kw)
    with pytest.raises(ValueError, match="image_embeds"):
        model.score_matrices(image_embeds=pre[..., :-1], **kw)
    with pytest.raises(ValueError, match="pixel_values"):
        model.score_matrices(pixel_values=pixels[:, :2], **kw)
    with pytest.raises(ValueError, match="k must"):
        model.score_matrices(image_embeds=pre, k=0, **kw)
    with pytest.raises(ValueError, match="input_ids"):
        model.score_matrices(image_embeds=pre, input_ids=ids.float(), attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model.score_matrices(image_embeds=pre, input_ids=ids, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.score_matrices(image_embeds=pre, input_ids=torch.ones(2, 41, dtype=torch.long),
                             attention_mask=torch.ones(2, 41))
    with pytest.raises(ValueError, match="image_index"):
        model.itm_scores(pre, ids, mask, torch.tensor([0, N_IMG]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text_index"):
        model.itm_scores(pre, ids, mask, torch.tensor([0, 1]), torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="text_index"):
        model.itm_scores(pre, ids, mask, torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="batch_size"):
        model.itm_scores(pre, ids, mask, torch.tensor([0]), torch.tensor([0]), batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        model.extract_features(input_ids=ids, mode="audio")
    with pytest.raises(ValueError, match="input_ids must have 5 rows"):
        model.extract_features(image_embeds=pre, input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match="Blip2ForImageTextRetrieval"):
        Blip2Retrieval.from_hf(torch.nn.Linear(2, 2))
    # NaN in gives NaN out, never an error or a silent number
    nan = pre.clone()
    nan[1] = float("nan")
    s_i2t, s_t2i = model.score_matrices(image_embeds=nan, k=N_TXT, **kw)
    assert torch.isnan(s_i2t[1]).all() and torch.isfinite(s_i2t[0]).all()


@pytest.mark.gpu
def test_score_matrices_on_cuda_within_torch_error():
    """On the GPU's kernels (fp32 and bf16): k = N, against the naive HF loop in float64 on the CPU; yardstick the
    same loop in the dtype under test on the GPU."""
    hf, model = _models()
    pixels, ids, mask = _data(torch.float32)
    ref = naive_hf_scores(hf.double(), pixels.double(), ids, mask, 128)
    for dtype in (torch.float32, torch.bfloat16):
        hf_d = hf_retrieval_model().to("cuda", dtype)
        hf_d.load_state_dict(hf.state_dict())
        model_d = Blip2Retrieval.from_hf(hf_d, stage1_config()).to("cuda", dtype)
        args = (pixels.to("cuda", dtype), ids.cuda(), mask.cuda())
        low = naive_hf_scores(hf_d, *args, 128)
        ours = model_d.score_matrices(pixel_values=args[0], input_ids=args[1], attention_mask=args[2], k=128)
        for name, o, r, lo in zip(("score_i2t", "score_t2i"), ours, ref, low):
            assert_within_torch_error(o.cpu().double(), r, lo.cpu().double(), dtype=dtype, name=f"{name} {dtype}")
