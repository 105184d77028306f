"""``blipfast retrieval`` with BLIP (v1) models: a Salesforce-named ``.pth`` (sizes read from the weights, the BERT
tokenizer given, [ENC] added) and an HF ``BlipForImageTextRetrieval`` folder score a gallery exactly as
``BlipRetrieval.score_matrices`` does on the same images and captions; ``k`` defaults to the model's ``k_test``."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blipfast import cli
from blipfast.data.tokenizer import add_enc_token, load_tokenizer
from blipfast.data.vision import default_blip_processor, load_image, preprocess
from blipfast.models.blip_retrieval import BlipRetrieval, BlipRetrievalConfig
from blipfast.retrieval import read_annotations, tokenize
from blipfast.testing.retrieval import write_gallery, write_tokenizer
from tests.helpers.blip_finetune import VISION, jitter_

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("blipgallery")
    ann, images = write_gallery(root, 5, [2, 3], size=20)
    write_tokenizer(root / "tok")
    tok = add_enc_token(load_tokenizer(str(root / "tok")))
    text = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id)
    cfg = BlipRetrievalConfig(text=text, vision={**VISION, "hidden_size": 64, "num_attention_heads": 1},
                              embed_dim=8, queue_size=12, enc_token_id=tok.convert_tokens_to_ids("[ENC]"), k_test=3)
    torch.manual_seed(3)
    model = jitter_(BlipRetrieval(cfg), 0.2).eval()
    return {"root": root, "ann": str(ann), "images": str(images), "tok": tok, "model": model}


def _expected(model, g, k):
    gal = read_annotations(g["ann"])
    proc = default_blip_processor(model.config.vision.image_size)
    px = torch.stack([preprocess(proc, load_image(f"{g['images']}/{p}")) for p in gal.images])
    ids, mask = tokenize(g["tok"], gal.texts, 35)
    return model.score_matrices(pixel_values=px, input_ids=ids, attention_mask=mask, k=k)


def _run(g, model_path, out, *extra):
    return cli.main(["retrieval", "--data", g["ann"], "--images", g["images"], "--model", str(model_path),
                     "--device", "cpu", "--workers", "0", "--no-progress", "--out", str(out), *extra])


def test_salesforce_pth(gallery, tmp_path, capsys):
    g = gallery
    pth = tmp_path / "model_retrieval.pth"
    torch.save({"model": g["model"].to_lavis_state_dict()}, pth)
    assert _run(g, pth, tmp_path / "out1", "--tokenizer", str(g["root"] / "tok")) == 0
    assert "k = 256" in capsys.readouterr().out  # the model's k_test (BLIP's COCO recipe: the .pth holds none)
    scores = load_file(str(tmp_path / "out1" / "scores.safetensors"))
    s_i2t, s_t2i = _expected(g["model"], g, 256)
    torch.testing.assert_close(scores["score_i2t"], s_i2t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores["score_t2i"], s_t2i, rtol=1e-5, atol=1e-5)
    info = json.loads((tmp_path / "out1" / "metrics.json").read_text())
    assert info["k"] == 256 and info["images"] == 5
    assert _run(g, pth, tmp_path / "out2") == 2
    assert "--tokenizer is needed" in capsys.readouterr().err


@pytest.mark.hf
def test_hf_folder(gallery, tmp_path):
    from transformers import BlipConfig, BlipForImageTextRetrieval

    g = gallery
    m = g["model"]
    hf = BlipForImageTextRetrieval(BlipConfig(text_config=m.config.text.to_dict(),
                                              vision_config=m.config.vision.to_dict(), image_text_hidden_size=8))
    hf.load_state_dict({k: v for k, v in m.state_dict().items() if k in hf.state_dict()}, strict=False)
    folder = tmp_path / "blip-itm"
    hf.save_pretrained(folder)
    g["tok"].save_pretrained(folder)
    assert _run(g, folder, tmp_path / "out", "--k", "2") == 0
    scores = load_file(str(tmp_path / "out" / "scores.safetensors"))
    torch.testing.assert_close(scores["score_i2t"], _expected(m, g, 2)[0], rtol=1e-5, atol=1e-5)
