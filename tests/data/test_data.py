"""The pieces behind ``blipfast train``: annotation readers, the tokenizer bootstrap, the vision towers' pre-LayerNorm
tokens, the feature cache, the batch order, the optimizer groups and schedule, and Blip2Stage1's ``sample_seed``."""
from __future__ import annotations

import os

import pytest
import torch

from blipfast import Blip2Stage1, Blip2Stage1Config
from blipfast.data import (FeatureCache, GlobalBatchSampler, cache_features, load_tokenizer, load_vision_tower,
                           pre_caption, read_annotations, tokenize, train_wordpiece)
from blipfast.ops import sample_hard_negatives
from blipfast.train.optim import WarmupCosine, param_groups
from blipfast.testing.data import write_images, write_jsonl, write_vision

# ----------------------------------------------------------------------------------------------
# annotations


def test_pre_caption_is_lavis_blip_caption_processor():
    assert pre_caption("A Dog (brown) on the couch!!  Next to: a cat.") == "a dog brown on the couch next to a cat"
    assert pre_caption("  \n") == ""
    assert pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_json_list_with_caption_lists_image_ids_and_line_numbers(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    text = ('[\n  {"image": "a.jpg", "caption": ["One dog.", "A DOG!"], "image_id": "coco_1"},\n'
            '  {"image": "b.jpg",\n   "caption": "a cat"},\n'
            '  {"image": "c.jpg", "caption": "missing"},\n'
            '  {"image": "./a.jpg", "caption": ""},\n'
            '  [1, 2],\n'
            '  {"image": "b.jpg"}\n]\n')
    (tmp_path / "ann.json").write_text(text)
    ann = read_annotations(str(tmp_path / "ann.json"), str(tmp_path))
    assert ann.captions == ["one dog", "a dog", "a cat"]
    assert ann.lines == [2, 2, 3] and ann.images == ["a.jpg", "b.jpg"] and ann.image_index == [0, 0, 1]
    assert ann.image_id[0] == ann.image_id[1] != ann.image_id[2]
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in ann.bad] == ["5", "6", "7", "8"]
    assert "does not exist" in ann.bad[0] and "empty caption" in ann.bad[1] and "expected an object" in ann.bad[2] \
        and "no 'caption'" in ann.bad[3]
    # without image checks (training from features) the missing file is kept
    assert len(read_annotations(str(tmp_path / "ann.json"), None, check_images=False)) == 4


def test_unreadable_annotation_files_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_annotations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.json").write_text('[{"image": "a", "caption": "b"},\n {"image": ')
    with pytest.raises(ValueError, match=r"bad.json:2: not valid JSON"):
        read_annotations(str(tmp_path / "bad.json"), check_images=False)
    (tmp_path / "empty.jsonl").write_text('{"image": "a.png", "caption": "..."}\n')
    with pytest.raises(ValueError, match="no usable image-text pair"):
        read_annotations(str(tmp_path / "empty.jsonl"), check_images=False)


# ----------------------------------------------------------------------------------------------
# tokenizer


def test_trained_wordpiece_is_bert_style_and_deterministic():
    caps = [f"a {c} {s} next to the {o}" for c in ("red", "green", "blue") for s in ("dog", "cat", "zebra")
            for o in ("window", "windmill", "tree")] + ["unbelievable tokenization, isn't it?"]
    toks = [train_wordpiece(caps, 60) for _ in range(3)]
    assert all(t.get_vocab() == toks[0].get_vocab() for t in toks)  # huggingface/tokenizers#1794 worked around
    tok = toks[0]
    assert tok.pad_token_id == 0 and tok.bos_token == "[DEC]" and tok.bos_token_id == len(tok) - 1
    enc = tok("a red zebra next to the windmills")["input_ids"]
    assert enc[0] == tok.cls_token_id and enc[-1] == tok.sep_token_id
    assert tok.decode(enc, skip_special_tokens=True) == "a red zebra next to the windmills"
    ids, mask = tokenize(tok, ["a red", "a red dog next to the window and a tree"], 9)
    n = len(tok("a red")["input_ids"])
    assert ids.shape == (2, 9) and n < 9 and mask.tolist()[0] == [True] * n + [False] * (9 - n) and mask[1].all()
    assert ids[0, n:].tolist() == [0] * (9 - n) and ids[1, -1] == tok.sep_token_id  # truncation keeps [SEP]


def test_local_bert_tokenizer_gets_dec_and_others_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast, GPT2TokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "##s"]
    t = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    t.normalizer, t.pre_tokenizer = normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer()
    t.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    BertTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                      mask_token="[MASK]").save_pretrained(str(tmp_path / "bert"))
    tok = load_tokenizer(str(tmp_path / "bert"))
    assert len(tok) == len(vocab) + 1 and tok.bos_token_id == len(vocab)  # LAVIS: 30522 for bert-base-uncased
    assert load_tokenizer(str(tmp_path / "bert")).bos_token_id == tok.bos_token_id  # idempotent
    assert tok.convert_ids_to_tokens(tok("a dogs")["input_ids"]) == ["[CLS]", "a", "dog", "##s", "[SEP]"]
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))
    g = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    g.pre_tokenizer = pre_tokenizers.Whitespace()
    GPT2TokenizerFast(tokenizer_object=g, unk_token="<unk>", pad_token="<unk>").save_pretrained(str(tmp_path / "gpt"))
    with pytest.raises(ValueError, match="BERT-style"):
        load_tokenizer(str(tmp_path / "gpt"))


# ----------------------------------------------------------------------------------------------
# vision towers: the tokens before the final LayerNorm


@pytest.mark.parametrize("kind", ["blip2", "clip", "siglip"])
def test_vision_tower_returns_pre_layernorm_tokens(tmp_path, kind):
    path = write_vision(str(tmp_path / kind), kind)
    tower, proc = load_vision_tower(path)
    px = torch.randn(3, 3, 16, 16)
    got = tower(px)
    ref = tower.model(pixel_values=px, output_hidden_states=True)
    torch.testing.assert_close(got, ref.hidden_states[-1], rtol=0, atol=0)
    assert got.shape[-1] == tower.width == 24 and not any(p.requires_grad for p in tower.parameters())
    if kind == "blip2":  # HF applies post_layernorm (BLIP-2's ln_vision) to last_hidden_state
        torch.testing.assert_close(tower.model.post_layernorm(got), ref.last_hidden_state)
        assert not torch.allclose(got, ref.last_hidden_state)
    tower.train()
    assert not tower.model.training


def test_vision_tower_of_a_composite_blip2_checkpoint(tmp_path):
    from transformers import Blip2Config, Blip2Model

    cfg = Blip2Config(vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8),
                      qformer_config=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                          num_hidden_layers=1, encoder_hidden_size=24),
                      text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       ffn_dim=32, vocab_size=50, word_embed_proj_dim=16), num_query_tokens=2)
    full = Blip2Model(cfg).eval()
    full.save_pretrained(str(tmp_path / "blip2"))
    from transformers import BlipImageProcessor

    BlipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(str(tmp_path / "blip2"))
    tower, _ = load_vision_tower(str(tmp_path / "blip2"))
    assert type(tower.model).__name__ == "Blip2VisionModel"
    for k, v in full.vision_model.state_dict().items():
        assert torch.equal(tower.model.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------
# feature cache


def test_feature_cache_continues_and_refuses_another_model(tmp_path):
    rows = write_images(str(tmp_path), 9)
    with open(tmp_path / "img" / "bad.png", "wb") as fh:
        fh.write(b"garbage")
    half = write_jsonl(str(tmp_path / "half.jsonl"), rows[:4])
    full = write_jsonl(str(tmp_path / "full.jsonl"), rows + [{"image": "img/bad.png", "caption": "x"}])
    vit = write_vision(str(tmp_path / "vit"))
    out = str(tmp_path / "feats")
    kw = dict(batch_size=3, shard_size=2, num_workers=0, progress=False, device="cpu", log=lambda m: None)
    c1 = cache_features(half, str(tmp_path), vit, out, **kw)
    assert c1["written"] == 4 and c1["already_present"] == 0
    open(os.path.join(out, "shard-00099.safetensors.tmp"), "wb").close()  # debris of an interrupted run
    c2 = cache_features(full, str(tmp_path), vit, out, **kw)
    assert c2["written"] == 5 and c2["already_present"] == 4 and c2["skipped"] == 1 and c2["total_in_cache"] == 9
    cache = FeatureCache(out)
    assert len(cache) == 9 and "img/bad.png" in cache.skipped and "img/bad.png" not in cache
    tower, proc = load_vision_tower(vit)
    from blipfast.data import load_image
    from blipfast.data.vision import preprocess

    px = torch.stack([preprocess(proc, load_image(str(tmp_path / r["image"]))) for r in rows])
    ref = tower(px).to(torch.bfloat16)
    for i, r in enumerate(rows):
        assert torch.equal(cache.get(os.path.normpath(r["image"])), ref[i]), r["image"]
    with pytest.raises(ValueError, match="another"):
        cache_features(full, str(tmp_path), write_vision(str(tmp_path / "vit2"), seed=1, image_size=24), out, **kw)
    with pytest.raises(ValueError, match="another dtype"):
        cache_features(full, str(tmp_path), vit, out, **dict(kw, dtype="fp16"))


# ----------------------------------------------------------------------------------------------
# batch order, optimizer, schedule


def test_global_batches_split_by_rank_and_resume_mid_epoch():
    one = GlobalBatchSampler(23, 6, world=1, seed=5)
    two = [GlobalBatchSampler(23, 3, world=2, rank=r, seed=5) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 3
    seen = []
    for _ in range(7):  # over two epoch boundaries: rank r holds rows [3r, 3r + 3) of the global batch
        g = next(it1)
        assert next(it2[0]) + next(it2[1]) == g
        seen.append(g)
    assert sorted(sum(seen[:3], [])) == sorted(set(sum(seen[:3], [])))  # no repeats within an epoch
    assert seen[0] != seen[3]  # a new permutation each epoch
    late = iter(GlobalBatchSampler(23, 6, world=1, seed=5, start=4))
    assert [next(late) for _ in range(3)] == seen[4:7]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 3, world=2)


def test_weight_decay_groups_and_schedule():
    model = Blip2Stage1(Blip2Stage1Config(qformer=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                                       num_hidden_layers=1, encoder_hidden_size=8, vocab_size=40),
                                          num_query_tokens=2, embed_dim=8, bos_token_id=39))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"temp", "ln_vision.weight", "ln_vision.bias", "itm_head.bias"}
    assert all(p.ndim >= 2 for p in decay["params"]) and "query_tokens" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    s = WarmupCosine(opt, lr=1e-4, warmup_lr=1e-6, warmup_steps=4, min_lr=1e-5, total_steps=10)
    lrs = [s.current()] + [s.step() for _ in range(9)]
    assert lrs[0] == 1e-6 and lrs[2] == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2) and lrs[4] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-5) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert opt.param_groups[0]["lr"] == lrs[9]


# ----------------------------------------------------------------------------------------------
# Blip2Stage1(sample_seed=)


def test_sample_seed_fixes_the_negatives_whatever_the_rng():
    cfg = Blip2Stage1Config(qformer=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                         num_hidden_layers=2, encoder_hidden_size=8, vocab_size=40),
                            num_query_tokens=3, embed_dim=8, bos_token_id=39)
    model = Blip2Stage1(cfg).eval()
    img, ids = torch.randn(6, 5, 8), torch.randint(1, 39, (6, 7))
    mask = torch.ones(6, 7, dtype=torch.long)
    seed = torch.tensor([123456789], dtype=torch.int64)
    outs = []
    for rng in (1, 2):
        torch.manual_seed(rng)
        outs.append(model(img, ids, mask, sample_seed=seed))
    assert torch.equal(outs[0].neg_text_index, outs[1].neg_text_index)
    assert torch.equal(outs[0].neg_image_index, outs[1].neg_image_index)
    nt, ni = sample_hard_negatives(outs[0].s_i2t, outs[0].s_t2i, seed=seed)
    assert torch.equal(nt, outs[0].neg_text_index) and torch.equal(ni, outs[0].neg_image_index)
    other = model(img, ids, mask, sample_seed=seed + 1)
    assert not (torch.equal(other.neg_text_index, nt) and torch.equal(other.neg_image_index, ni))
