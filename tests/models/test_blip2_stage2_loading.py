"""Blip2Stage2.from_pretrained_parts (a stage-1 checkpoint, a local LLM folder, a ViT) and from_hf, through the real
loading code; the LLM's attention choice (FlashAttention-2 when usable, else transformers' default)."""
from __future__ import annotations

import copy

import pytest
import torch

from blipfast import convert
from blipfast.models import llm as llm_mod
from blipfast.models.blip2_stage2 import Blip2Stage2
from blipfast.testing import blip2 as T
from tests.helpers.tolerance import assert_close, assert_within_torch_error

pytestmark = pytest.mark.hf  # compares with transformers' own models: CI also runs it on the lowest supported

Q = T.NUM_QUERY


def _stage1(**kw):
    """A stage-1 model as HF names it (Q-Former with its text FFN, embeddings, ITC/ITM heads, ViT, ln_vision)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    vision, qformer, text = T.configs("opt", **kw)
    qformer.use_qformer_text_input = True
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=Q, image_text_hidden_size=16)
    return T.sharpen(Blip2ForImageTextRetrieval(cfg), 1.0).eval(), qformer


def _llm_folder(tmp_path, kind):
    from transformers import OPTForCausalLM, T5ForConditionalGeneration

    text = T.configs(kind)[2]
    lm = T.sharpen((OPTForCausalLM if kind == "opt" else T5ForConditionalGeneration)(text), 1.0)
    path = tmp_path / f"llm-{kind}"
    lm.save_pretrained(path)
    return path, lm


def _reference(stage2, kind):
    """An HF Blip2ForConditionalGeneration holding the very weights the stage-2 model was built with."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    c = stage2.model.config
    cfg = Blip2Config(vision_config=c.vision_config.to_dict(), qformer_config=c.qformer_config.to_dict(),
                      text_config=T.configs(kind)[2].to_dict(), num_query_tokens=Q, image_token_index=T.IMAGE)
    ref = Blip2ForConditionalGeneration(cfg).eval()
    ref.load_state_dict(stage2.model.state_dict(), strict=True)
    return ref


def test_from_lavis_checkpoint_llm_and_vision_folders(tmp_path):
    """LAVIS .pth (Qformer.bert.*, ln_vision, visual_encoder.*) + OPT folder + Blip2VisionModel folder: every
    weight lands where HF's Blip2ForConditionalGeneration keeps it (strict load into one works), the stage-1
    text path is left out, and loss and generated tokens equal that HF model's."""
    s1, qcfg = _stage1()
    lavis = convert.hf_to_lavis(s1.state_dict()).state_dict
    assert "ln_vision.weight" in lavis and any(k.startswith("Qformer.bert.") for k in lavis)
    convert.save_lavis_checkpoint(lavis, tmp_path / "stage1.pth")
    llm_dir, lm = _llm_folder(tmp_path, "opt")
    s1.vision_model.save_pretrained(tmp_path / "vit")
    stage2 = Blip2Stage2.from_pretrained_parts(tmp_path / "stage1.pth", llm_dir, tmp_path / "vit", qformer_config=qcfg)

    sd, s1sd = stage2.model.state_dict(), s1.state_dict()
    qkeys = [k for k in sd if k.startswith("qformer.")]
    assert qkeys and all(torch.equal(sd[k], s1sd[k]) for k in qkeys)
    assert not any(".intermediate." in k or k.startswith("qformer.encoder.layer.0.output.") for k in qkeys)
    for k in ("query_tokens", "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias",
              "vision_model.encoder.layers.0.self_attn.qkv.weight"):
        assert torch.equal(sd[k], s1sd[k]), k
    assert all(torch.equal(sd["language_model." + k], v) for k, v in lm.state_dict().items())
    assert stage2.training and stage2.has_vision and not stage2.is_encoder_decoder
    assert all(p.dtype == torch.float32 for _, p in stage2.trainable_parameters())

    ref = _reference(stage2, "opt")
    stage2.eval()
    px = torch.randn(2, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    text = torch.randint(5, len(T.VOCAB), (2, 6))
    ids = torch.cat([torch.full((2, Q), T.IMAGE), text], 1)
    labels = torch.cat([torch.full((2, Q), -100), text], 1)
    with torch.no_grad():  # HF's model in fp32 is the yardstick, a float64 copy of it the reference
        want = ref(pixel_values=px, input_ids=ids, labels=labels).loss
        want64 = copy.deepcopy(ref).double()(pixel_values=px.double(), input_ids=ids, labels=labels).loss
        assert_within_torch_error(stage2(pixel_values=px, input_ids=text, labels=text).loss, want64, want, name="loss")
    new = ref.generate(pixel_values=px, input_ids=ids, max_new_tokens=6, num_beams=2)[:, ids.shape[1]:]
    assert torch.equal(stage2.generate(pixel_values=px, input_ids=text, max_new_tokens=6, num_beams=2), new)


def test_from_hf_safetensors_features_only_with_inferred_config(tmp_path):
    """HF-named safetensors (no config beside it) + T5 folder, no ViT: the Q-Former config is read from the
    shapes (64-wide heads), image_embeds (pre-ln_vision tokens) give the loss the full model gives on pixels,
    and pixel_values are refused."""
    s1, qcfg = _stage1(qformer_hidden=64, heads=1)
    convert.save_safetensors(s1.state_dict(), tmp_path / "stage1.safetensors")
    llm_dir, _ = _llm_folder(tmp_path, "t5")
    eps = s1.config.vision_config.layer_norm_eps
    feats_only = Blip2Stage2.from_pretrained_parts(tmp_path / "stage1.safetensors", llm_dir, ln_vision_eps=eps)
    got = feats_only.model.config.qformer_config
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "cross_attention_frequency", "encoder_hidden_size"):
        assert getattr(got, f) == getattr(qcfg, f), f
    assert not feats_only.has_vision and feats_only.is_encoder_decoder
    assert not any(k.startswith("vision_model.encoder.") for k in feats_only.model.state_dict())
    full = Blip2Stage2.from_pretrained_parts(s1, llm_dir, s1.vision_model)  # a module as stage1, a ViT module
    full.load_trainable_state_dict(feats_only.trainable_state_dict())  # same fresh language_projection
    full.eval(), feats_only.eval()
    px = torch.randn(2, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    prompt, answer = torch.randint(5, len(T.VOCAB), (2, 3)), torch.randint(5, len(T.VOCAB), (2, 4))
    with torch.no_grad():
        want = full(pixel_values=px, input_ids=prompt, labels=answer).loss
        feats = full.vision_tokens(px)
        assert_close(feats_only(image_embeds=feats, input_ids=prompt, labels=answer).loss, want)
    with pytest.raises(ValueError, match="without a ViT"):
        feats_only(pixel_values=px, input_ids=prompt, labels=answer)
    with pytest.raises(ValueError, match="no ViT"):
        feats_only.save_pretrained(tmp_path / "nope")


def test_from_blipfast_blip2stage1(tmp_path):
    """blipfast's own Blip2Stage1 (module, or its state dict in safetensors with ``ln_vision.*``): the stage-2
    query outputs on cached features are stage 1's image pass (ln_vision + Q-Former over the queries)."""
    import blipfast

    _, qcfg = _stage1()
    s1 = blipfast.Blip2Stage1(blipfast.Blip2Stage1Config(qformer=dict(qcfg.to_dict(), vocab_size=len(T.VOCAB) + 1),
                                                         num_query_tokens=Q, embed_dim=16, bos_token_id=len(T.VOCAB),
                                                         ln_vision_eps=1e-5))
    T.sharpen(s1, 1.0).eval()
    llm_dir, _ = _llm_folder(tmp_path, "opt")
    convert.save_safetensors(s1.state_dict(), tmp_path / "s1.safetensors")
    feats = torch.randn(2, 5, 24)
    with torch.no_grad():
        want = s1.qformer(query_embeds=s1.query_tokens.expand(2, -1, -1),
                          encoder_hidden_states=s1.ln_vision(feats)).last_hidden_state
    for src, kw in ((s1, {}), (tmp_path / "s1.safetensors", {"qformer_config": qcfg})):
        stage2 = Blip2Stage2.from_pretrained_parts(src, llm_dir, **kw).eval()
        assert stage2.model.vision_model.post_layernorm.eps == 1e-5  # Blip2Stage1's (LAVIS') epsilon
        with torch.no_grad():
            assert_close(stage2.query_output(image_embeds=feats), want)


def test_qformer_config_from_the_folder_and_blipfast_names(tmp_path):
    """An HF folder (config.json with qformer_config) needs no qformer_config; a state dict with blipfast's
    ``ln_vision.*`` name works like HF's post_layernorm."""
    s1, _ = _stage1()
    s1.save_pretrained(tmp_path / "stage1")
    llm_dir, _ = _llm_folder(tmp_path, "opt")
    stage2 = Blip2Stage2.from_pretrained_parts(tmp_path / "stage1", llm_dir)
    assert stage2.model.config.qformer_config.num_attention_heads == 2
    sd = {("ln_vision." + k[len("vision_model.post_layernorm."):] if "post_layernorm" in k else k): v
          for k, v in s1.state_dict().items()}
    renamed = Blip2Stage2.from_pretrained_parts(sd, llm_dir, qformer_config=s1.config)
    assert torch.equal(renamed.model.vision_model.post_layernorm.weight, s1.vision_model.post_layernorm.weight)


def test_loading_errors_are_named(tmp_path):
    s1, qcfg = _stage1()
    sd = s1.state_dict()
    llm_dir, _ = _llm_folder(tmp_path, "opt")
    with pytest.raises(ValueError, match="ln_vision"):
        Blip2Stage2.from_pretrained_parts({k: v for k, v in sd.items() if "post_layernorm" not in k}, llm_dir,
                                          qformer_config=qcfg)
    with pytest.raises(ValueError, match="qformer_config"):  # 32 wide: heads cannot be inferred
        Blip2Stage2.from_pretrained_parts(sd, llm_dir)
    with pytest.raises(ValueError, match="llm"):
        Blip2Stage2.from_pretrained_parts(sd, tmp_path / "missing", qformer_config=qcfg)
    with pytest.raises(ValueError, match="Blip2VisionModel folder"):
        Blip2Stage2.from_pretrained_parts(sd, llm_dir, llm_dir, qformer_config=qcfg)
    with pytest.raises(TypeError, match="stage1"):
        Blip2Stage2.from_pretrained_parts(42, llm_dir)
    with pytest.raises(ValueError, match="do not fit qformer_config"):
        Blip2Stage2.from_pretrained_parts(sd, llm_dir, qformer_config=dict(qcfg.to_dict(), num_hidden_layers=1))


def test_save_pretrained_then_from_hf_generates_the_same(tmp_path):
    stage2 = Blip2Stage2(T.blip2("t5")).eval()
    stage2.save_pretrained(tmp_path / "m", tokenizer=T.tokenizer("t5"), image_processor=T.image_processor())
    again = Blip2Stage2.from_hf(tmp_path / "m").eval()
    px = torch.randn(2, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    prompt = torch.randint(5, len(T.VOCAB), (2, 3))
    assert torch.equal(again.generate(pixel_values=px, input_ids=prompt, max_new_tokens=5),
                       stage2.generate(pixel_values=px, input_ids=prompt, max_new_tokens=5))
    T.blip2("t5").language_model.save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="expected one of"):
        Blip2Stage2.from_hf(tmp_path / "t5")  # a model folder, but not BLIP-2
    with pytest.raises(ValueError, match="not a folder"):
        Blip2Stage2.from_hf(tmp_path / "absent")


# ----------------------------------------------------------------------------------------------
# the LLM's attention


def test_flash_attention_selection(monkeypatch):
    opt, t5 = T.configs("opt")[2], T.configs("t5")[2]
    monkeypatch.setattr(llm_mod, "flash_attn_unavailable_reason", lambda: None)  # as if flash-attn were usable
    sel = llm_mod.select_attn_implementation
    assert sel("auto", opt, device="cuda", dtype=torch.bfloat16) == "flash_attention_2"
    assert sel(None, opt, device="cuda:0", dtype=torch.float16) == "flash_attention_2"
    assert sel("auto", opt, device="cpu", dtype=torch.bfloat16) is None
    assert sel("auto", opt, device="cuda", dtype=torch.float32) is None
    assert sel("auto", t5, device="cuda", dtype=torch.bfloat16) is None  # T5 has no FlashAttention in transformers
    with pytest.raises(ValueError, match="does not support"):
        sel("flash_attention_2", t5, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        sel("flash_attention_2", opt, device="cuda", dtype=torch.float32)
    assert sel("sdpa", opt) == "sdpa" and sel("eager", t5) == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        sel("flash", opt)
    calls = []
    lm = T.blip2("opt").language_model
    monkeypatch.setattr(lm, "set_attn_implementation", calls.append)
    assert llm_mod.configure_attention(lm, "auto", device="cuda", dtype=torch.bfloat16) == "flash_attention_2"
    assert llm_mod.configure_attention(lm, "auto") is None  # CPU fp32: left as it is
    assert calls == ["flash_attention_2"]


@pytest.mark.skipif(llm_mod.flash_attn_available(), reason="flash-attn is usable here: the fallback is not taken")
def test_without_flash_attn_everything_loads_with_the_default(tmp_path):
    reason = llm_mod.flash_attn_unavailable_reason()
    assert reason and ("pip install" in reason or "CUDA" in reason)
    llm_dir, _ = _llm_folder(tmp_path, "opt")
    cfg = T.configs("opt")[2]
    assert llm_mod.select_attn_implementation("auto", cfg, device="cuda", dtype=torch.bfloat16) is None
    with pytest.raises(ValueError, match="flash"):
        llm_mod.select_attn_implementation("flash_attention_2", cfg, device="cuda", dtype=torch.bfloat16)
    lm = llm_mod.load_llm(llm_dir, attn_implementation="auto")
    assert lm.config._attn_implementation in ("sdpa", "eager")
    assert llm_mod.load_llm(llm_dir, attn_implementation="eager").config._attn_implementation == "eager"


@pytest.mark.gpu
@pytest.mark.skipif(not llm_mod.flash_attn_available(), reason=str(llm_mod.flash_attn_unavailable_reason()))
def test_flash_attention_llm_generates_like_sdpa(tmp_path):
    """On a GPU with flash-attn: the OPT LLM loads with FlashAttention-2 and greedy captions match SDPA's."""
    stage2 = Blip2Stage2(T.blip2("opt")).eval()
    stage2.save_pretrained(tmp_path / "m")
    fa = Blip2Stage2.from_hf(tmp_path / "m", dtype=torch.bfloat16, device="cuda").eval()
    sdpa = Blip2Stage2.from_hf(tmp_path / "m", dtype=torch.bfloat16, device="cuda", attn_implementation="sdpa").eval()
    assert fa.language_model.config._attn_implementation == "flash_attention_2"
    px = torch.randn(4, 3, T.IMAGE_SIZE, T.IMAGE_SIZE, device="cuda")
    a, b = (m.generate(pixel_values=px, max_new_tokens=8) for m in (fa, sdpa))
    assert (a == b).float().mean() > 0.9  # bf16 kernels may flip a near tie
