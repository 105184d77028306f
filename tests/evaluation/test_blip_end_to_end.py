"""``blipfast eval vqa | caption --model`` with BLIP (v1) models: a ``blip-vqa`` / ``blip-caption`` run folder (as
the trainer saves it: config.yaml with the task, checkpoint-N/model.safetensors) and Salesforce-named ``.pth`` files
with ``--tokenizer``; the model's kind comes from the files. The answers and captions written are exactly those of
:func:`blipfast.vqa_nlvr.answer_questions` / :meth:`BlipCaptioner.caption` called directly (the command adds no
drift); ``--video`` reads ``--num-frames`` frames per video (frame folders written here) and concatenates their
tokens; the errors name the flag or the row."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_model

from blipfast import cli
from blipfast.data.vision import default_blip_processor, load_image, preprocess
from blipfast.data.vqa import pre_question, read_vqa
from blipfast.models.blip_caption import BlipCaptionConfig, BlipCaptioner
from blipfast.models.blip_vqa import BlipVQA, BlipVQAConfig
from blipfast.testing import blip as TB
from blipfast.testing.data import write_images
from blipfast.vqa_nlvr import answer_questions, load_task_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What colour is the shape?", "Is it a CIRCLE (or not)", "what is on the background"]
ANSWERS = ["red", "blue", "circle", "square", "yes", "no", "green background"]


def _sizes(tok):
    text = dict(vocab_size=len(tok), hidden_size=64, num_attention_heads=1, num_hidden_layers=2,
                intermediate_size=96, max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
                eos_token_id=tok.sep_token_id, bos_token_id=tok.bos_token_id)
    vision = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=96, image_size=16,
                  patch_size=8)
    return text, vision


def _jitter(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _fake_run(root, task, model, tokdir):
    """A run folder as ``blipfast train`` leaves it (what :func:`blipfast.convert.resolve_source` reads)."""
    ckpt = root / "checkpoint-3"
    ckpt.mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))
    torch.save({}, ckpt / "state.pt")
    (root / "config.yaml").write_text(yaml.safe_dump({"task": task, "model": model.config.to_dict(),
                                                      "tokenizer": str(tokdir)}))
    return str(root)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("blipe2e")
    rows = write_images(str(root), 3, seed=2)
    tok = TB.tokenizer([r["caption"] for r in rows] + QUESTIONS + ANSWERS)
    tokdir = root / "tok"
    tok.save_pretrained(str(tokdir))
    text, vision = _sizes(tok)
    torch.manual_seed(0)
    vqa = _jitter(BlipVQA(BlipVQAConfig(text=text, vision=vision, enc_token_id=tok.convert_tokens_to_ids("[ENC]"),
                                        bos_token_id=tok.bos_token_id, drop_path_rate=0.0)))
    cap = _jitter(BlipCaptioner(BlipCaptionConfig(text=text, vision=vision, bos_token_id=tok.bos_token_id)))
    vqa_pth, cap_pth = root / "vqa.pth", root / "caption.pth"
    torch.save({"model": vqa.to_lavis_state_dict()}, vqa_pth)
    torch.save({"model": cap.to_lavis_state_dict()}, cap_pth)
    data = root / "vqa_val_eval.json"
    data.write_text(json.dumps([{"question_id": 7 + i, "question": q, "image": rows[i % 3]["image"],
                                 "answer": ["red"] * 3 + ["yes"] * 7} for i, q in enumerate(QUESTIONS + ["and?"])]))
    answers = root / "answer_list.json"
    answers.write_text(json.dumps(ANSWERS))
    return {"root": root, "rows": rows, "tok": tok, "tokdir": str(tokdir), "vqa": vqa, "cap": cap,
            "vqa_run": _fake_run(root / "vqa_run", "blip-vqa", vqa, tokdir),
            "cap_run": _fake_run(root / "cap_run", "blip-caption", cap, tokdir),
            "vqa_pth": str(vqa_pth), "cap_pth": str(cap_pth), "data": str(data), "answers": str(answers)}


def _eval(task, model, data, images, out, *extra):
    return cli.main(["eval", task, "--model", str(model), "--data", str(data), "--images", str(images), "--out",
                     str(out / "metrics.json"), "--device", "cpu", "--no-progress", *extra])


def _predictions(out):
    return json.loads((out / "predictions.json").read_text())


def _direct_answers(s, **kw):
    ann = read_vqa(s["data"], str(s["root"]), need_answers=False)
    return answer_questions(s["vqa"], s["tok"], ann, str(s["root"]), default_blip_processor(16), **kw)


@pytest.mark.parametrize("source", ["vqa_run", "vqa_pth"])
def test_vqa_rank_equals_answer_questions(setup, source, tmp_path, capsys):
    s = setup
    extra = ["--answer-list", s["answers"], "--batch-size", "2", "--k", "3"]
    if source == "vqa_pth":
        extra += ["--tokenizer", s["tokdir"]]
    assert _eval("vqa", s[source], s["data"], s["root"], tmp_path, *extra) == 0
    err = capsys.readouterr().err
    assert "blipfast eval vqa: 4 answers -> " in err and "Traceback" not in err
    rows = _predictions(tmp_path)
    want = _direct_answers(s, answer_list=ANSWERS, k=3, batch_size=2)
    assert [r["answer"] for r in rows] == want and set(want) <= set(ANSWERS)
    assert [r["question_id"] for r in rows] == [7, 8, 9, 10]
    assert [r["question"] for r in rows] == QUESTIONS + ["and?"]
    again = tmp_path / "again.json"
    assert cli.main(["eval", "vqa", "--predictions", str(tmp_path / "predictions.json"), "--annotations",
                     s["data"], "--out", str(again)]) == 0
    assert json.loads(again.read_text()) == json.loads((tmp_path / "metrics.json").read_text())


def test_vqa_generate_equals_answer_questions(setup, tmp_path):
    s = setup
    assert _eval("vqa", s["vqa_run"], s["data"], s["root"], tmp_path, "--inference", "generate", "--num-beams",
                 "2") == 0
    want = _direct_answers(s, inference="generate", generate_kwargs={"num_beams": 2})
    assert [r["answer"] for r in _predictions(tmp_path)] == want


def test_caption_equals_blip_caption(setup, tmp_path, capsys):
    pytest.importorskip("pycocoevalcap", reason="pip install 'blipfast[eval]' (pycocoevalcap) for the caption metrics")
    if shutil.which("java") is None:
        pytest.skip("no Java runtime: the caption metrics need one")
    s = setup
    refs = tmp_path / "test.json"
    refs.write_text(json.dumps([{"image": r["image"], "caption": [r["caption"], "a shape"]} for r in s["rows"]]))
    for i, (source, extra) in enumerate((("cap_run", []), ("cap_pth", ["--tokenizer", s["tokdir"]]))):
        out = tmp_path / f"o{i}"
        assert _eval("caption", s[source], refs, s["root"], out, "--no-spice", "--batch-size", "2", *extra) == 0
        assert "blipfast eval caption: 3 captions -> " in capsys.readouterr().err
        px = torch.stack([preprocess(default_blip_processor(16), load_image(str(s["root"] / r["image"])))
                          for r in s["rows"]])
        want = s["cap"].caption(px, s["tok"])  # BLIP's defaults: "a picture of ", beam 3, max 20, min 5
        assert [r["caption"] for r in _predictions(out)] == want
    out = tmp_path / "o2"
    assert _eval("caption", s["cap_run"], refs, s["root"], out, "--no-spice", "--prompt", "a photo of ",
                 "--generate-kwargs", '{"max_length": 9, "min_length": 7}') == 0
    want = s["cap"].caption(px, s["tok"], prompt="a photo of ", max_length=9, min_length=7)
    assert [r["caption"] for r in _predictions(out)] == want


def _frames(folder, n, seed):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        px = (torch.rand(18, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"frame{i:03d}.png")


def test_vqa_video_uses_num_frames(setup, tmp_path, monkeypatch):
    """Two videos (frame folders of 5 and 11 frames), one given by "video", one by "image"; every ViT input is
    num_frames frames and the question encoder sees F * N tokens; the answers are answer_questions(video=True)'s."""
    from blipfast.models import blip_finetune

    s = setup
    _frames(tmp_path / "videos" / "v0", 5, 0)
    _frames(tmp_path / "videos" / "v1", 11, 1)
    data = tmp_path / "video_qa.json"
    data.write_text(json.dumps([{"question_id": 1, "question": "what is it", "video": "videos/v0", "answer": "red"},
                                {"question_id": 2, "question": "is it red", "image": "videos/v1", "answer": "no"},
                                {"question_id": 3, "question": "what colour", "video": "videos/v1", "answer": "a"}]))
    seen = []
    real = blip_finetune.video_tokens

    def spy(vit, frames):
        out = real(vit, frames)
        seen.append((tuple(frames.shape[:2]), out.shape[1]))
        return out

    monkeypatch.setattr(blip_finetune, "video_tokens", spy)
    out = tmp_path / "out"
    assert _eval("vqa", s["vqa_run"], data, tmp_path, out, "--video", "--num-frames", "4", "--answer-list",
                 s["answers"], "--k", "2") == 0
    n_tokens = (16 // 8) ** 2 + 1
    assert seen == [((2, 4), 4 * n_tokens)]  # the batch's two distinct videos, 4 frames each
    rows = _predictions(out)
    assert [r.get("video") or r.get("image") for r in rows] == ["videos/v0", "videos/v1", "videos/v1"]
    same = tmp_path / "as_images.json"  # read_vqa reads "image" paths: the same rows for the direct call
    rows_as_images = [{**{k: v for k, v in r.items() if k != "video"}, "image": r.get("video", r.get("image"))}
                      for r in json.loads(data.read_text())]
    same.write_text(json.dumps(rows_as_images))
    ann = read_vqa(str(same), None, check_images=False)
    ann.images = [str(tmp_path / p) for p in ann.images]
    seen.clear()
    want = answer_questions(s["vqa"], s["tok"], ann, None, default_blip_processor(16), answer_list=ANSWERS, k=2,
                            video=True, num_frames=4)
    assert [r["answer"] for r in rows] == want and seen == [((2, 4), 4 * n_tokens)]
    assert ann.captions == [pre_question(q) for q in ("what is it", "is it red", "what colour")]
    assert _eval("vqa", s["vqa_run"], data, tmp_path, tmp_path / "o16", "--video", "--answer-list",
                 s["answers"], "--k", "2") == 0
    assert seen[-1] == ((2, 16), 16 * n_tokens)  # BLIP's 16 frames by default (frames repeat in short videos)


def test_errors_name_the_flag_or_row(setup, tmp_path, capsys):
    s = setup
    root = s["root"]

    def err(*args):
        assert cli.main(["eval", *args, "--device", "cpu", "--no-progress"]) == 2
        return capsys.readouterr().err

    vqa = ["vqa", "--data", s["data"], "--images", str(root), "--out", str(tmp_path / "m.json")]
    assert "--answer-list FILE is needed with --inference rank" in err(*vqa, "--model", s["vqa_run"])
    assert "--tokenizer is needed when --model is a file" in err(*vqa, "--model", s["vqa_pth"], "--answer-list",
                                                                 s["answers"])
    assert "is a BLIP (v1) caption checkpoint; blipfast eval vqa needs a VQA model" in err(
        *vqa, "--model", s["cap_pth"], "--answer-list", s["answers"], "--tokenizer", s["tokdir"])
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"image": r["image"], "caption": ["a shape"]} for r in s["rows"]]))
    assert "is a blipfast train run of --task blip-vqa; blipfast eval caption needs a captioning model" in err(
        "caption", "--data", str(refs), "--images", str(root), "--model", s["vqa_run"])
    assert "--max-new-tokens is a BLIP-2 flag" in err(*vqa, "--model", s["vqa_run"], "--inference", "generate",
                                                      "--max-new-tokens", "3")
    assert "belong to --inference generate" in err(*vqa, "--model", s["vqa_run"], "--answer-list", s["answers"],
                                                   "--num-beams", "2")
    # --video: a row whose path is an image file, a missing one; a BLIP-2 folder
    assert f"is neither a folder of frames nor a video file (the video of {s['data']}" in err(
        *vqa, "--model", s["vqa_run"], "--answer-list", s["answers"], "--video")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_id": 1, "question": "q", "video": "nowhere/v9", "answer": "a"}]))
    assert f"nowhere/v9 is missing (the video of {bad}[0]" in err(
        "vqa", "--data", str(bad), "--images", str(root), "--model", s["vqa_run"], "--answer-list", s["answers"],
        "--video")
    blip2 = tmp_path / "blip2"
    blip2.mkdir()
    (blip2 / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    assert "--video is for BLIP (v1) models" in err(*vqa, "--model", str(blip2), "--video")
    assert "--video belongs to the end-to-end mode" in err("vqa", "--predictions", s["data"], "--annotations",
                                                           s["data"], "--video")


def test_video_file_needs_pyav(setup, tmp_path, capsys):
    """A video file: decoded with PyAV when it is installed, else the install advice naming the row."""
    s = setup
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"question_id": 1, "question": "q", "video": "clip.mp4", "answer": "a"}]))
    code = cli.main(["eval", "vqa", "--model", s["vqa_run"], "--data", str(data), "--images", str(tmp_path),
                     "--answer-list", s["answers"], "--video", "--device", "cpu", "--no-progress", "--out",
                     str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2
    try:
        import av  # noqa: F401
    except ImportError:
        assert "pip install 'blipfast[video]'" in err and f"of {data}[0]" in err
    else:
        assert "cannot decode video" in err  # 64 zero bytes are no video


def test_load_task_model_reads_the_pth_sizes(setup):
    """A .pth's text and ViT sizes come from its weights (64-wide heads), so the tiny models load back equal."""
    s = setup
    for kind, key in (("vqa", "vqa_pth"), ("caption", "cap_pth")):
        model, _ = load_task_model(s[key], kind, tokenizer=s["tokdir"])
        ref = s[kind if kind == "vqa" else "cap"].state_dict()
        got = model.state_dict()
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
