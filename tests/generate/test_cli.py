"""``blipfast caption`` / ``blipfast vqa`` end to end: tiny random HF folders (model, tokenizer, image processor)
and PNG images written here, the real CLI, JSONL out; the texts equal HF's own unswapped generate."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from blipfast import cli
from blipfast.testing import blip2 as T

Q = T.NUM_QUERY


def _folder(tmp_path, kind, instruct=False):
    model = T.blip2(kind, instruct=instruct)
    return T.save_folder(model, tmp_path / "model", kind, instruct=instruct), model


def _images(tmp_path, n):
    folder = tmp_path / "imgs"
    folder.mkdir()
    return folder, T.write_images(folder, n)


def _pixels(paths):
    images = [Image.open(p).convert("RGB") for p in paths]
    return T.image_processor()(images=images, return_tensors="pt")["pixel_values"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_a_folder(tmp_path, capsys):
    """Every image of the folder, in name order, batched; LAVIS' generate defaults (beam 5, no prompt, min_length 1:
    no new-token minimum)."""
    model_dir, hf = _folder(tmp_path, "opt")
    folder, paths = _images(tmp_path, 3)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "captions.jsonl"
    rc = cli.main(["caption", "--model", str(model_dir), "--images", str(folder), "--output", str(out),
                   "--batch-size", "2", "--max-new-tokens", "12"])
    assert rc == 0
    rows = _rows(out)
    assert [r["image"] for r in rows] == paths and all(set(r) == {"image", "caption"} for r in rows)
    tok = T.tokenizer("opt")
    want, tokens = [], set()
    for i in range(0, 3, 2):  # HF with the same batches: image tokens + BOS, then the new tokens
        ids = hf.generate(pixel_values=_pixels(paths[i:i + 2]), num_beams=5, max_new_tokens=12, min_new_tokens=0)
        want += [t.strip() for t in tok.batch_decode(ids[:, Q + 1:], skip_special_tokens=True)]
        tokens |= {tuple(r) for r in ids[:, Q + 1:].tolist()}
    assert [r["caption"] for r in rows] == want
    assert len(tokens) > 1  # the tokens depend on the image
    assert "blipfast caption: 3 rows" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["t5", "opt"])
def test_vqa_from_jsonl(tmp_path, kind):
    """Questions of different lengths in one batch (padded: right for T5's encoder, left for OPT) give the
    answers HF gives each question alone with LAVIS' predict_answers settings (beam 5, at most 10 new tokens, length
    penalty -1 for T5, 0 for OPT); relative image paths; extra fields are kept."""
    model_dir, hf = _folder(tmp_path, kind)
    _, paths = _images(tmp_path, 3)
    questions = ["what color is the car", "how many dogs", "is there a man riding a red bus near the tree"]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"image": f"imgs/img{i}.png", "question": q, "question_id": 10 + i}) + "\n"
                            for i, q in enumerate(questions)))
    out = tmp_path / "answers.jsonl"
    assert cli.main(["vqa", "--model", str(model_dir), "--data", str(data), "--output", str(out)]) == 0
    rows = _rows(out)
    assert [(r["image"], r["question"], r["question_id"]) for r in rows] == \
        [(f"imgs/img{i}.png", q, 10 + i) for i, q in enumerate(questions)]
    tok = T.tokenizer(kind)
    for path, q, row in zip(paths, questions, rows):
        prompt = torch.tensor([tok(f"Question: {q} Short answer:").input_ids])
        ids = torch.cat([torch.full((1, Q), T.IMAGE), prompt], 1)
        gen = hf.generate(pixel_values=_pixels([path]), input_ids=ids, num_beams=5, max_new_tokens=10, min_new_tokens=0,
                          length_penalty=-1.0 if kind == "t5" else 0.0)
        gen = gen[:, ids.shape[1]:] if kind == "opt" else gen
        assert row["answer"] == tok.decode(gen[0], skip_special_tokens=True).strip()


def test_instructblip_vqa(tmp_path):
    """InstructBLIP: the prompt is also the Q-Former's instruction (qformer_tokenizer/ of the folder)."""
    model_dir, hf = _folder(tmp_path, "opt", instruct=True)
    _, paths = _images(tmp_path, 2)
    questions = ["what is on the table", "how many"]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"image": p, "question": q}) + "\n" for p, q in zip(paths, questions)))
    out = tmp_path / "a.jsonl"
    assert cli.main(["vqa", "--model", str(model_dir), "--data", str(data), "--output", str(out),
                     "--num-beams", "1", "--max-new-tokens", "6",  # HF's penalty would also see the prompt:
                     "--generate-kwargs", '{"repetition_penalty": 1.0}']) == 0
    tok = T.tokenizer("opt")
    for path, q, row in zip(paths, questions, _rows(out)):
        text = f"Question: {q} Short answer:"
        prompt = torch.tensor([tok(text).input_ids])
        ids = torch.cat([torch.full((1, Q), T.IMAGE), prompt], 1)
        gen = hf.generate(pixel_values=_pixels([path]), input_ids=ids, qformer_input_ids=prompt, num_beams=1,
                          max_new_tokens=6)
        assert row["answer"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_generate_kwargs_pass_through(tmp_path):
    model_dir, _ = _folder(tmp_path, "t5")
    folder, _ = _images(tmp_path, 2)
    out = tmp_path / "c.jsonl"
    assert cli.main(["caption", "--model", str(model_dir), "--images", str(folder), "--output", str(out),
                     "--prompt", "a photo of", "--num-beams", "3", "--max-new-tokens", "3",
                     "--generate-kwargs", '{"num_return_sequences": 3}']) == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(len(r["caption"]) == 3 for r in rows)
    assert all(len(c.split()) <= 3 for r in rows for c in r["caption"])


def test_bad_input_gets_a_message(tmp_path, capsys):
    model_dir, _ = _folder(tmp_path, "opt")
    folder, paths = _images(tmp_path, 1)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": paths[0], "question": "what"}) + "\n" + json.dumps({"image": paths[0]}) + "\n")
    base = ["--model", str(model_dir), "--output", str(tmp_path / "o.jsonl")]
    assert cli.main(["vqa", *base, "--data", str(data)]) == 2
    assert ':2 needs a "question"' in capsys.readouterr().err
    assert cli.main(["caption", *base, "--images", str(folder), "--generate-kwargs", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert cli.main(["vqa", *base, "--data", str(data), "--prompt", "no placeholder"]) == 2
    assert "{}" in capsys.readouterr().err
    data.write_text(json.dumps({"image": "missing.png"}) + "\n")
    assert cli.main(["caption", *base, "--data", str(data)]) == 2
    assert "missing.png: cannot be read" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["caption", *base, "--images", str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err
    assert cli.main(["caption", "--model", str(folder), "--images", str(folder)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_commands_are_registered_with_lavis_settings():
    """The decoding defaults are LAVIS' settings, resolved for the model's LLM (tests/cli/test_decoding_settings.py);
    the flags are unset unless given."""
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices
    assert {"caption", "vqa"} <= set(sub)
    cap = sub["caption"].parse_args(["--model", "m", "--images", "i"])
    assert (cap.settings, cap.prompt, cap.num_beams, cap.max_new_tokens, cap.min_new_tokens) == \
        ("caption", None, None, None, None)
    vqa = sub["vqa"].parse_args(["--model", "m", "--data", "d"])
    assert (vqa.settings, vqa.prompt, vqa.length_penalty) == ("vqa", None, None)
