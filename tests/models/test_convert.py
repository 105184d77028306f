"""blipfast.convert: HF <-> LAVIS BLIP-2 weight names, checkpoint loading (safetensors, sharded, weights_only
.pth), reporting of unmappable keys, and strict loading of converted weights into blipfast.QFormer.

Checkpoints are written by the tests themselves (tmp_path); LAVIS names are spelled out here from the LAVIS
module structure (Qformer.py: BertEmbeddings, BertLayer, BertLMPredictionHead; Blip2Qformer's heads), not
derived from blipfast.convert, so the mapping is checked against an independent statement of it.
"""
from __future__ import annotations

import functools
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2ForImageTextRetrieval

import blipfast
from blipfast import convert

QF = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, use_qformer_text_input=True,
          vocab_size=40, max_position_embeddings=12, cross_attention_frequency=2)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14)
NQ, E = 5, 16


@functools.lru_cache(maxsize=1)
def _hf_model():
    cfg = Blip2Config(vision_config=VISION, qformer_config=QF, num_query_tokens=NQ, image_text_hidden_size=E)
    model = Blip2ForImageTextRetrieval(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05)
            if name.endswith("self_attn.qkv.bias"):  # LAVIS' EVA ViT has q and v biases only
                p[VISION["hidden_size"]: 2 * VISION["hidden_size"]] = 0.0
    return model


def _lavis_state_dict(with_vit: bool = False) -> dict:
    """A LAVIS Blip2Qformer state dict of the same sizes, spelled out from LAVIS' module names."""
    d, f, vocab, npos, enc = QF["hidden_size"], QF["intermediate_size"], QF["vocab_size"], \
        QF["max_position_embeddings"], VISION["hidden_size"]
    sd = {}

    def lin(prefix, n_out, n_in):
        sd[prefix + ".weight"] = 0.05 * torch.randn(n_out, n_in)
        sd[prefix + ".bias"] = 0.05 * torch.randn(n_out)

    def ln(prefix, n):
        sd[prefix + ".weight"] = 1 + 0.1 * torch.randn(n)
        sd[prefix + ".bias"] = 0.1 * torch.randn(n)

    emb = "Qformer.bert.embeddings."
    sd[emb + "word_embeddings.weight"] = torch.randn(vocab, d)
    sd[emb + "position_embeddings.weight"] = torch.randn(npos, d)
    ln(emb + "LayerNorm", d)
    sd[emb + "position_ids"] = torch.arange(npos).expand(1, -1)
    for i in range(QF["num_hidden_layers"]):
        p = f"Qformer.bert.encoder.layer.{i}."
        kinds = [("attention", d)] + ([("crossattention", enc)] if i % QF["cross_attention_frequency"] == 0 else [])
        for kind, kv_in in kinds:
            lin(p + kind + ".self.query", d, d)
            lin(p + kind + ".self.key", d, kv_in)
            lin(p + kind + ".self.value", d, kv_in)
            lin(p + kind + ".output.dense", d, d)
            ln(p + kind + ".output.LayerNorm", d)
        for suffix in ("", "_query"):
            lin(p + "intermediate" + suffix + ".dense", f, d)
            lin(p + "output" + suffix + ".dense", d, f)
            ln(p + "output" + suffix + ".LayerNorm", d)
    head = "Qformer.cls.predictions."
    lin(head + "transform.dense", d, d)
    ln(head + "transform.LayerNorm", d)
    sd[head + "bias"] = torch.randn(vocab)
    sd[head + "decoder.weight"] = sd[emb + "word_embeddings.weight"]  # tied, as in LAVIS
    sd[head + "decoder.bias"] = sd[head + "bias"]
    sd["query_tokens"] = torch.randn(1, NQ, d)
    ln("ln_vision", enc)
    lin("vision_proj", E, d)
    lin("text_proj", E, d)
    lin("itm_head", 2, d)
    sd["temp"] = torch.tensor(0.07)
    if with_vit:
        grid = VISION["image_size"] // VISION["patch_size"]
        sd["visual_encoder.cls_token"] = torch.randn(1, 1, enc)
        sd["visual_encoder.pos_embed"] = torch.randn(1, grid * grid + 1, enc)
        sd["visual_encoder.patch_embed.proj.weight"] = torch.randn(enc, 3, VISION["patch_size"], VISION["patch_size"])
        sd["visual_encoder.patch_embed.proj.bias"] = torch.randn(enc)
        for i in range(VISION["num_hidden_layers"]):
            p = f"visual_encoder.blocks.{i}."
            ln(p + "norm1", enc)
            ln(p + "norm2", enc)
            sd[p + "attn.qkv.weight"] = torch.randn(3 * enc, enc)
            sd[p + "attn.q_bias"] = torch.randn(enc)
            sd[p + "attn.v_bias"] = torch.randn(enc)
            lin(p + "attn.proj", enc, enc)
            lin(p + "mlp.fc1", VISION["intermediate_size"], enc)
            lin(p + "mlp.fc2", enc, VISION["intermediate_size"])
    return sd


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hf_to_lavis_to_hf_round_trip():
    hf_sd = dict(_hf_model().state_dict())
    hf_sd["temp"] = torch.tensor(0.07)
    hf_sd[convert.LM_HEAD_PREFIX + "bias"] = torch.randn(QF["vocab_size"])
    lav = convert.hf_to_lavis(hf_sd, strict=True)
    assert not lav.unmapped and not lav.dropped
    s = lav.state_dict
    for key in ("Qformer.bert.embeddings.LayerNorm.weight", "Qformer.bert.embeddings.word_embeddings.weight",
                "Qformer.bert.encoder.layer.0.attention.self.query.weight",
                "Qformer.bert.encoder.layer.2.crossattention.self.value.bias",
                "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias", "Qformer.cls.predictions.bias",
                "ln_vision.weight", "vision_proj.weight", "text_proj.bias", "itm_head.weight", "query_tokens", "temp",
                "visual_encoder.blocks.1.attn.q_bias", "visual_encoder.patch_embed.proj.weight"):
        assert key in s, key
    assert not any(k.startswith(("qformer.", "embeddings.", "vision_model.")) for k in s)
    assert "Qformer.bert.encoder.layer.1.crossattention.self.query.weight" not in s  # frequency 2
    back = convert.lavis_to_hf(s, strict=True)
    _same(back.state_dict, hf_sd)


def test_lavis_to_hf_matches_hf_model_and_round_trips():
    lav = _lavis_state_dict(with_vit=True)
    res = convert.lavis_to_hf(lav, strict=True)
    assert res.dropped == ["Qformer.bert.embeddings.position_ids"]
    hf = _hf_model()
    extras = {k for k in res.state_dict if k == "temp" or k.startswith(convert.LM_HEAD_PREFIX)}
    assert extras == {"temp"} | {convert.LM_HEAD_PREFIX + k for k in (
        "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias",
        "bias", "decoder.weight", "decoder.bias")}
    hf_part = {k: v for k, v in res.state_dict.items() if k not in extras}
    assert sorted(hf_part) == sorted(hf.state_dict())  # every HF parameter, nothing else
    for k, v in hf_part.items():
        assert v.shape == hf.state_dict()[k].shape, k
    qkv_bias = res.state_dict["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    enc = VISION["hidden_size"]
    assert torch.equal(qkv_bias[:enc], lav["visual_encoder.blocks.1.attn.q_bias"])
    assert not qkv_bias[enc:2 * enc].any()
    assert torch.equal(qkv_bias[2 * enc:], lav["visual_encoder.blocks.1.attn.v_bias"])
    assert torch.equal(res.state_dict["qformer.layernorm.weight"], lav["Qformer.bert.embeddings.LayerNorm.weight"])
    assert torch.equal(res.state_dict["vision_model.post_layernorm.bias"], lav["ln_vision.bias"])
    back = convert.hf_to_lavis(res.state_dict, strict=True)
    lav.pop("Qformer.bert.embeddings.position_ids")
    _same(back.state_dict, lav)


def test_unmapped_keys_are_reported_not_dropped():
    lav = _lavis_state_dict()
    lav["opt_model.model.decoder.layers.0.fc1.weight"] = torch.randn(3, 3)
    lav["Qformer.bert.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.randn(3, 3)
    lav["opt_proj.weight"] = torch.randn(7, QF["hidden_size"])
    res = convert.lavis_to_hf(lav)
    assert sorted(res.unmapped) == ["Qformer.bert.encoder.layer.0.attention.self.distance_embedding.weight",
                                    "opt_model.model.decoder.layers.0.fc1.weight"]
    assert torch.equal(res.state_dict["language_projection.weight"], lav["opt_proj.weight"])
    with pytest.raises(ValueError, match="2 key.*could not be mapped.*opt_model"):
        convert.lavis_to_hf(lav, strict=True)
    with pytest.raises(ValueError, match="could not be mapped"):
        res.check()

    hf_sd = dict(_hf_model().state_dict())
    hf_sd["language_model.lm_head.weight"] = torch.randn(3, 3)
    hf_sd["language_projection.weight"] = torch.randn(3, QF["hidden_size"])
    bias = hf_sd["vision_model.encoder.layers.0.self_attn.qkv.bias"].clone()
    bias[VISION["hidden_size"]] = 1.0  # a key bias LAVIS cannot hold
    hf_sd["vision_model.encoder.layers.0.self_attn.qkv.bias"] = bias
    res = convert.hf_to_lavis(hf_sd, language_projection="t5_proj")
    assert list(res.unmapped) == ["language_model.lm_head.weight"]
    assert "t5_proj.weight" in res.state_dict
    # the key third has no effect on attention (softmax is shift-invariant): dropped, and said so
    assert res.dropped == ["vision_model.encoder.layers.0.self_attn.qkv.bias[key third]"]
    # a lone q_bias (its v_bias missing) is reported too
    res = convert.lavis_to_hf({"visual_encoder.blocks.0.attn.q_bias": torch.zeros(4)})
    assert list(res.unmapped) == ["visual_encoder.blocks.0.attn.q_bias"] and not res.state_dict


def test_load_hf_safetensors_directory_single_and_sharded(tmp_path):
    sd = _hf_model().state_dict()
    single = tmp_path / "single"
    single.mkdir()
    convert.save_safetensors(sd, single / "model.safetensors")
    _same(convert.load_state_dict(single), dict(sd))
    _same(convert.load_state_dict(single / "model.safetensors"), dict(sd))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(sharded / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = convert.load_state_dict(sharded)
    _same(loaded, dict(sd))
    res = convert.load_checkpoint(sharded, to="lavis", strict=True)
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in res.state_dict

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert.load_state_dict(tmp_path)


def test_load_lavis_pth_weights_only_into_qformer(tmp_path):
    lav = _lavis_state_dict()
    path = tmp_path / "blip2_pretrained.pth"
    convert.save_lavis_checkpoint(lav, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model"}
    res = convert.load_checkpoint(path, to="hf", strict=True)
    cfg = blipfast.QFormerConfig(**QF, encoder_hidden_size=VISION["hidden_size"])
    qf = blipfast.QFormer(cfg)
    qf.load_state_dict(convert.qformer_state_dict(res.state_dict), strict=True)
    emb = blipfast.QFormerEmbeddings(cfg)
    emb.load_state_dict(convert.embeddings_state_dict(lav), strict=True)
    assert torch.equal(emb.word_embeddings.weight, lav["Qformer.bert.embeddings.word_embeddings.weight"])
    # a LAVIS dict goes straight in too, and the weights reach the forward
    qf2 = blipfast.QFormer(cfg)
    qf2.load_state_dict(convert.qformer_state_dict(lav), strict=True)
    qf.eval()
    qf2.eval()
    x, img = torch.randn(2, NQ, QF["hidden_size"]), torch.randn(2, 4, VISION["hidden_size"])
    assert torch.equal(qf(x, encoder_hidden_states=img)[0], qf2(x, encoder_hidden_states=img)[0])
    assert torch.equal(qf.encoder.layer[2].crossattention.attention.key.weight,
                       lav["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"])

    # the same weights through HF's model: the converted dict loads strictly (minus LAVIS-only entries)
    hf = Blip2ForImageTextRetrieval(_hf_model().config).eval()
    hf_sd = {k: v for k, v in res.state_dict.items() if k != "temp" and not k.startswith(convert.LM_HEAD_PREFIX)}
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected and all(k.startswith("vision_model.") for k in missing)  # no ViT in a stage-1 .pth
    with torch.no_grad():
        ref = hf.qformer(query_embeds=x, encoder_hidden_states=img).last_hidden_state
        got = qf(x, encoder_hidden_states=img)[0]
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_plain_safetensors_and_refusals(tmp_path):
    lav = _lavis_state_dict()
    path = tmp_path / "lavis.safetensors"
    convert.save_safetensors(lav, path)  # tied LM head weights are written as copies
    loaded = convert.load_state_dict(path)
    _same(loaded, lav)
    assert convert.detect_format(loaded) == "lavis"

    bad = tmp_path / "code.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": Payload()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        convert.load_state_dict(bad)  # weights_only=True never runs a pickled object's code

    notsd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notsd)
    with pytest.raises(TypeError, match="state dict"):
        convert.load_state_dict(notsd)
    with pytest.raises(ValueError, match="cannot tell"):
        convert.detect_format({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="to must be"):
        convert.load_checkpoint(path, to="lavis2")
