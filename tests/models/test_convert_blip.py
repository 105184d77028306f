"""blipfast.convert for BLIP (v1): Salesforce BLIP <-> HF names, checkpoint loading and the report of every key.

The Salesforce state dicts are spelled out here from the BLIP repository's module structure (vit.py's timm
VisionTransformer, med.py's BertModel / BertLMHeadModel, the heads, momentum copies and queues of
blip_pretrain.py / blip_retrieval.py), not derived from blipfast.convert; the ViT mapping is also checked by
value: a plain re-statement of the timm ViT forward on the Salesforce tensors equals HF's BlipVisionModel on the
converted ones. Checkpoints are written by the tests (tmp_path).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

import blipfast
from blipfast import convert

D, F_, LAYERS, HEADS, VOCAB, NPOS = 32, 48, 2, 4, 40, 16  # text
VD, VF, VLAYERS, IMG, PATCH = 32, 40, 2, 32, 16  # vision (ViT width = the text's encoder width)
E, QUEUE = 16, 12
KINDS = ("pretrain", "retrieval", "caption", "vqa")


def _salesforce(kind: str) -> dict:
    sd = {}

    def lin(prefix, n_out, n_in, bias=True):
        sd[prefix + ".weight"] = 0.05 * torch.randn(n_out, n_in)
        if bias:
            sd[prefix + ".bias"] = 0.05 * torch.randn(n_out)

    def ln(prefix, n):
        sd[prefix + ".weight"] = 1 + 0.1 * torch.randn(n)
        sd[prefix + ".bias"] = 0.1 * torch.randn(n)

    def vit(p):
        sd[p + ".cls_token"] = torch.randn(1, 1, VD)
        sd[p + ".pos_embed"] = torch.randn(1, (IMG // PATCH) ** 2 + 1, VD)
        sd[p + ".patch_embed.proj.weight"] = 0.05 * torch.randn(VD, 3, PATCH, PATCH)
        sd[p + ".patch_embed.proj.bias"] = 0.05 * torch.randn(VD)
        for i in range(VLAYERS):
            b = f"{p}.blocks.{i}"
            ln(b + ".norm1", VD)
            lin(b + ".attn.qkv", 3 * VD, VD)
            lin(b + ".attn.proj", VD, VD)
            ln(b + ".norm2", VD)
            lin(b + ".mlp.fc1", VF, VD)
            lin(b + ".mlp.fc2", VD, VF)
        ln(p + ".norm", VD)

    def bert(p):  # med.py BertModel(add_pooling_layer=False) with cross-attention in every layer
        sd[p + ".embeddings.word_embeddings.weight"] = torch.randn(VOCAB, D)
        sd[p + ".embeddings.position_embeddings.weight"] = torch.randn(NPOS, D)
        ln(p + ".embeddings.LayerNorm", D)
        sd[p + ".embeddings.position_ids"] = torch.arange(NPOS).expand(1, -1)
        for i in range(LAYERS):
            b = f"{p}.encoder.layer.{i}"
            for att, kv_in in (("attention", D), ("crossattention", VD)):
                lin(f"{b}.{att}.self.query", D, D)
                lin(f"{b}.{att}.self.key", D, kv_in)
                lin(f"{b}.{att}.self.value", D, kv_in)
                lin(f"{b}.{att}.output.dense", D, D)
                ln(f"{b}.{att}.output.LayerNorm", D)
            lin(b + ".intermediate.dense", F_, D)
            lin(b + ".output.dense", D, F_)
            ln(b + ".output.LayerNorm", D)

    def lm_head(p):  # med.py BertLMPredictionHead: decoder.bias is the same tensor as bias
        lin(p + ".cls.predictions.transform.dense", D, D)
        ln(p + ".cls.predictions.transform.LayerNorm", D)
        sd[p + ".cls.predictions.decoder.weight"] = sd[p + ".bert.embeddings.word_embeddings.weight"]
        sd[p + ".cls.predictions.bias"] = 0.05 * torch.randn(VOCAB)
        sd[p + ".cls.predictions.decoder.bias"] = sd[p + ".cls.predictions.bias"]

    vit("visual_encoder")
    if kind in ("pretrain", "retrieval", "vqa"):
        bert("text_encoder")
    if kind in ("pretrain", "caption", "vqa"):
        bert("text_decoder.bert")
        lm_head("text_decoder")
    if kind in ("pretrain", "retrieval"):
        lin("vision_proj", E, VD)
        lin("text_proj", E, D)
        lin("itm_head", 2, D)
        sd["temp"] = torch.tensor(0.07)
        vit("visual_encoder_m")
        bert("text_encoder_m")
        lin("vision_proj_m", E, VD)
        lin("text_proj_m", E, D)
        sd["image_queue"] = F.normalize(torch.randn(E, QUEUE), dim=0)
        sd["text_queue"] = F.normalize(torch.randn(E, QUEUE), dim=0)
        if kind == "pretrain":
            sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
        else:
            sd["idx_queue"] = torch.full((1, QUEUE), -100)
            sd["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    return sd


def _hf_config() -> BlipConfig:
    text = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=F_, max_position_embeddings=NPOS, bos_token_id=1, eos_token_id=2, sep_token_id=3)
    vision = dict(hidden_size=VD, intermediate_size=VF, num_hidden_layers=VLAYERS, num_attention_heads=HEADS,
                  image_size=IMG, patch_size=PATCH, layer_norm_eps=1e-6)  # timm's ViT in BLIP: eps 1e-6
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=E)


# the HF class each Salesforce checkpoint kind fills (the pre-training one fills two)
_TARGETS = {"pretrain": (BlipForImageTextRetrieval, BlipForConditionalGeneration),
            "retrieval": (BlipForImageTextRetrieval,), "caption": (BlipForConditionalGeneration,),
            "vqa": (BlipForQuestionAnswering,)}
_EXTRA = ("temp", "vision_model_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.", "image_queue",
          "text_queue", "idx_queue", "ptr_queue", "queue_ptr")


@pytest.mark.parametrize("kind", KINDS)
def test_salesforce_to_hf_fills_the_hf_models(kind):
    sd = _salesforce(kind)
    res = convert.blip_to_hf(sd, strict=True)
    assert not res.unmapped
    assert sorted(res.dropped) == sorted(k for k in sd if k.endswith("position_ids"))
    assert len(res.state_dict) == len(sd) - len(res.dropped)
    for cls in _TARGETS[kind]:
        with torch.device("meta"):
            model = cls(_hf_config())
        hf_keys = set(model.state_dict())
        missing = hf_keys - set(res.state_dict)
        assert not missing, f"{cls.__name__}: {sorted(missing)[:5]}"
        model = cls(_hf_config())
        extra = set(res.state_dict) - hf_keys
        load = model.load_state_dict(res.state_dict, strict=False)
        assert not load.missing_keys and set(load.unexpected_keys) == extra
        assert all(k.startswith(_EXTRA) or (kind == "pretrain" and k.startswith(("text_decoder.", "text_encoder.",
                                                                                    "vision_proj", "text_proj",
                                                                                    "itm_head")))
                   for k in extra), sorted(extra)[:5]
        assert torch.equal(model.vision_model.embeddings.class_embedding, sd["visual_encoder.cls_token"])
        assert torch.equal(model.vision_model.post_layernorm.weight, sd["visual_encoder.norm.weight"])
    if kind in ("pretrain", "retrieval"):
        assert torch.equal(res.state_dict["vision_model_m.encoder.layers.1.self_attn.projection.weight"],
                           sd["visual_encoder_m.blocks.1.attn.proj.weight"])
        assert torch.equal(res.state_dict["temp"], sd["temp"])


@pytest.mark.parametrize("kind", KINDS)
def test_round_trips(kind):
    sd = _salesforce(kind)
    hf = convert.blip_to_hf(sd, strict=True).state_dict
    back = convert.hf_to_blip(hf, strict=True)
    assert not back.unmapped and not back.dropped
    expected = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    assert back.state_dict.keys() == expected.keys()
    assert all(torch.equal(back.state_dict[k], v) for k, v in expected.items())
    # and HF -> Salesforce -> HF from a real HF model's state dict
    cls = _TARGETS[kind][0]
    model_sd = cls(_hf_config()).state_dict()
    again = convert.blip_to_hf(convert.hf_to_blip(model_sd, strict=True).state_dict, strict=True).state_dict
    assert again.keys() == model_sd.keys()


def _timm_vit(sd: dict, pixels: torch.Tensor, p: str = "visual_encoder") -> torch.Tensor:
    """BLIP's vit.py VisionTransformer.forward, restated: patch conv, [CLS] + positions, pre-LN blocks (eps 1e-6,
    exact GELU MLP), final norm."""
    x = F.conv2d(pixels, sd[p + ".patch_embed.proj.weight"], sd[p + ".patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + ".cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[p + ".pos_embed"]
    b, n, c = x.shape
    for i in range(VLAYERS):
        k = f"{p}.blocks.{i}."
        h = F.layer_norm(x, (c,), sd[k + "norm1.weight"], sd[k + "norm1.bias"], 1e-6)
        q, kk, v = F.linear(h, sd[k + "attn.qkv.weight"], sd[k + "attn.qkv.bias"]).reshape(
            b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        a = ((q @ kk.transpose(-2, -1)) * (c // HEADS) ** -0.5).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(b, n, c), sd[k + "attn.proj.weight"], sd[k + "attn.proj.bias"])
        h = F.layer_norm(x, (c,), sd[k + "norm2.weight"], sd[k + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[k + "mlp.fc1.weight"], sd[k + "mlp.fc1.bias"])), sd[k + "mlp.fc2.weight"],
                     sd[k + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (c,), sd[p + ".norm.weight"], sd[p + ".norm.bias"], 1e-6)


def test_vit_mapping_by_value():
    sd = _salesforce("caption")
    model = BlipForConditionalGeneration(_hf_config()).eval()
    model.load_state_dict(convert.blip_to_hf(sd).state_dict, strict=True)
    pixels = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_model(pixel_values=pixels).last_hidden_state, _timm_vit(sd, pixels),
                                   rtol=1e-5, atol=1e-5)


def test_text_modules_load_into_blipfast_strictly():
    hf = convert.blip_to_hf(_salesforce("vqa")).state_dict
    cfg = _hf_config().text_config
    enc = blipfast.BlipTextModel(cfg, add_pooling_layer=False)
    enc.load_state_dict(convert.blip_text_state_dict(hf, "text_encoder"), strict=True)
    dec = blipfast.BlipTextLMHeadModel(cfg)
    dec.load_state_dict(convert.blip_text_state_dict(_salesforce("caption"), "text_decoder"), strict=True)
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="module must be"):
        convert.blip_text_state_dict(hf, "vision_model")


def test_unknown_keys_are_reported_never_dropped():
    sd = _salesforce("retrieval")
    sd["visual_encoder.blocks.0.adapter_after_attn.weight"] = torch.zeros(2)  # e.g. a fork's adapters
    sd["text_encoder.encoder.layer.0.crossattention.self.rel_pos.weight"] = torch.zeros(2)
    sd["prompt_embeds"] = torch.zeros(2)
    res = convert.blip_to_hf(sd)
    assert set(res.unmapped) == {"visual_encoder.blocks.0.adapter_after_attn.weight", "prompt_embeds",
                                 "text_encoder.encoder.layer.0.crossattention.self.rel_pos.weight"}
    with pytest.raises(ValueError, match="3 key"):
        convert.blip_to_hf(sd, strict=True)
    with pytest.raises(ValueError, match="could not be mapped"):
        convert.hf_to_blip({"vision_model.foo": torch.zeros(1)}, strict=True)


def test_load_checkpoint_pth_and_hf_directory(tmp_path):
    sd = _salesforce("pretrain")
    path = tmp_path / "model_base.pth"
    # a Salesforce training checkpoint: the model plus optimizer state, config and epoch (weights_only-loadable)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "config": {"vit": "base"},
                "epoch": 3}, path)
    loaded = convert.load_state_dict(path)
    assert convert.detect_format(loaded) == "salesforce"
    res = convert.load_checkpoint(path, to="hf", strict=True)
    assert "vision_model.embeddings.class_embedding" in res.state_dict and "queue_ptr" in res.state_dict
    same = convert.load_checkpoint(path, to="salesforce")
    assert same.state_dict.keys() == {k for k in sd if not k.endswith("position_ids")}
    with pytest.raises(ValueError, match="'hf' or 'salesforce'"):
        convert.load_checkpoint(path, to="lavis")

    model = BlipForQuestionAnswering(_hf_config())
    model.save_pretrained(tmp_path / "hf")
    hf_sd = convert.load_state_dict(tmp_path / "hf")
    assert convert.detect_format(hf_sd) == "hf_blip"
    back = convert.load_checkpoint(tmp_path / "hf", to="salesforce", strict=True)
    assert "visual_encoder.blocks.1.attn.qkv.weight" in back.state_dict
    assert convert.load_checkpoint(tmp_path / "hf", to="hf").state_dict.keys() == hf_sd.keys()
    with pytest.raises(ValueError, match="'hf' or 'lavis'"):
        blip2 = {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(2)}
        convert.save_lavis_checkpoint(blip2, tmp_path / "blip2.pth")
        convert.load_checkpoint(tmp_path / "blip2.pth", to="salesforce")
