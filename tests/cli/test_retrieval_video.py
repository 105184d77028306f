"""``blipfast retrieval --video`` with a BLIP (v1) retrieval model: the gallery's items are videos (frame folders
written here, of awkward lengths), ``--num-frames`` frames each, scored as Salesforce BLIP's zero-shot text-video
retrieval (``eval_retrieval_video.py``, restated below over the model's parameters: the ITC feature the mean of
the frames' projected [CLS] tokens, the ITM input the frames' tokens concatenated); the errors name the flag."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from blipfast import cli
from blipfast.bench.blip_pretrain_baseline import med_forward, vit_forward
from blipfast.data.tokenizer import add_enc_token, load_tokenizer
from blipfast.data.video import read_frames
from blipfast.data.vision import default_blip_processor, preprocess
from blipfast.models.blip_retrieval import BlipRetrieval, BlipRetrievalConfig
from blipfast.retrieval import read_annotations, tokenize
from blipfast.testing.blip import config as blip_config
from blipfast.testing.retrieval import write_tokenizer
from tests.helpers.blip_finetune import jitter_

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [3, 8, 10, 17]  # frames per video: shorter than, equal to and longer than --num-frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("blipvideo")
    g = torch.Generator().manual_seed(4)
    ann = []
    for v, n in enumerate(LENGTHS):
        folder = root / "videos" / f"video{v}"
        folder.mkdir(parents=True)
        for i in range(n):
            px = (torch.rand(18, 22, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(folder / f"{i:05d}.jpg")
        ann.append({"image": f"video{v}", "caption": ["a dog on the grass", "two cats"] if v == 1 else
                    f"a man {'with a red car' if v % 2 else 'sitting'}"})
    (root / "msrvtt_test.json").write_text(json.dumps(ann))
    write_tokenizer(root / "tok")
    tok = add_enc_token(load_tokenizer(str(root / "tok")))
    hc = blip_config(tok)  # 64-wide heads: the sizes a .pth's weights tell
    cfg = BlipRetrievalConfig(text=hc.text_config, vision=hc.vision_config, embed_dim=8, queue_size=12,
                              enc_token_id=tok.convert_tokens_to_ids("[ENC]"), k_test=3)
    torch.manual_seed(5)
    model = jitter_(BlipRetrieval(cfg), 0.2).eval()
    pth = root / "model_retrieval.pth"
    torch.save({"model": model.to_lavis_state_dict()}, pth)
    return {"root": root, "ann": str(root / "msrvtt_test.json"), "tok": tok, "model": model, "pth": str(pth)}


@torch.no_grad()
def blip_video_scores(model, frames, input_ids, attention_mask, k):
    """``eval_retrieval_video.py``'s ``evaluation`` (one process) over a BlipRetrieval's parameters."""
    m = copy.deepcopy(model).eval()
    b, n = frames.shape[:2]
    video_feat = vit_forward(m.vision_model, frames.flatten(0, 1))
    video_embed = F.linear(video_feat[:, 0], m.vision_proj.weight, m.vision_proj.bias).view(b, n, -1).mean(1)
    video_embed = F.normalize(video_embed, dim=-1)
    video_feat = video_feat.view(b, -1, video_feat.shape[-1])
    text_out = med_forward(m.text_encoder, input_ids, attention_mask)
    text_embed = F.normalize(F.linear(text_out[:, 0], m.text_proj.weight, m.text_proj.bias))
    ids = input_ids.clone()
    ids[:, 0] = m.config.enc_token_id
    sims = video_embed @ text_embed.t()

    def itm(i, a, enc):
        return F.linear(med_forward(m.text_encoder, i, a, image=enc)[:, 0], m.itm_head.weight, m.itm_head.bias)[:, 1]

    v2t = torch.full(sims.shape, -100.0)
    for v in range(sims.shape[0]):
        top, idx = sims[v].topk(k=min(k, sims.shape[1]))
        v2t[v, idx] = itm(ids[idx], attention_mask[idx], video_feat[v].repeat(len(idx), 1, 1)) + top
    t2v = torch.full(sims.t().shape, -100.0)
    for t in range(sims.shape[1]):
        top, idx = sims[:, t].topk(k=min(k, sims.shape[0]))
        r = len(idx)
        t2v[t, idx] = itm(ids[t].repeat(r, 1), attention_mask[t].repeat(r, 1), video_feat[idx]) + top
    return v2t, t2v


def _run(v, out, *extra):
    return cli.main(["retrieval", "--data", v["ann"], "--images", str(v["root"] / "videos"), "--model", v["pth"],
                     "--tokenizer", str(v["root"] / "tok"), "--device", "cpu", "--workers", "0", "--no-progress",
                     "--out", str(out), "--video", *extra])


@pytest.mark.parametrize("num_frames,k", [(8, 256), (5, 2)])
def test_video_retrieval_equals_blips(videos, tmp_path, capsys, num_frames, k):
    v = videos
    extra = ["--k", str(k)] + ([] if num_frames == 8 else ["--num-frames", str(num_frames)])
    assert _run(v, tmp_path, *extra) == 0
    assert f"4 videos ({num_frames} frames each), 5 captions, k = {k}" in capsys.readouterr().out
    gal = read_annotations(v["ann"])
    proc = default_blip_processor(16)
    frames = torch.stack([torch.stack([preprocess(proc, f) for f in read_frames(str(v["root"] / "videos" / p),
                                                                                num_frames)]) for p in gal.images])
    ids, mask = tokenize(v["tok"], gal.texts, 35)
    want = blip_video_scores(v["model"], frames, ids, mask, k)
    got = load_file(str(tmp_path / "scores.safetensors"))
    torch.testing.assert_close(got["score_i2t"], want[0].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["score_t2i"], want[1].float(), rtol=1e-4, atol=1e-4)
    assert (got["score_i2t"] == -100).sum() == (0 if k == 256 else 4 * (5 - 2))
    info = json.loads((tmp_path / "metrics.json").read_text())
    assert info["video"] is True and info["num_frames"] == num_frames


def test_video_errors(videos, tmp_path, capsys):
    v = videos
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "video0", "caption": "a"}, {"image": "nope.txt", "caption": "b"}]))
    (v["root"] / "videos" / "nope.txt").write_text("x")
    assert cli.main(["retrieval", "--data", str(ann), "--images", str(v["root"] / "videos"), "--model", v["pth"],
                     "--tokenizer", str(v["root"] / "tok"), "--device", "cpu", "--workers", "0", "--no-progress",
                     "--out", str(tmp_path / "o"), "--video"]) == 2
    assert "nope.txt is neither a folder of frames nor a video file (the video of gallery item 1" in \
        capsys.readouterr().err
    assert _run(v, tmp_path / "o", "--num-frames", "0") == 2
    assert "--num-frames must be >= 1" in capsys.readouterr().err
    assert cli.main(["retrieval", "--data", v["ann"], "--features", str(tmp_path), "--model", v["pth"], "--video",
                     "--out", str(tmp_path / "o")]) == 2
    assert "--video reads the videos under --images" in capsys.readouterr().err
    blip2 = tmp_path / "blip2"
    blip2.mkdir()
    (blip2 / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    assert cli.main(["retrieval", "--data", v["ann"], "--images", str(v["root"] / "videos"), "--model", str(blip2),
                     "--video", "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert "--video needs a BLIP (v1) retrieval model" in capsys.readouterr().err
