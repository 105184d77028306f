"""``blipfast caption`` / ``blipfast vqa`` decode with LAVIS' settings for the model's LLM: the generate arguments
they resolve equal LAVIS' calls (restated in tests/helpers/lavis_stage2.py) with LAVIS' lengths counted as its
transformers counts them; flags and ``--generate-kwargs`` win over the settings."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from blipfast import cli
from blipfast.generate.engine import Generator, decoding
from blipfast.testing import blip2 as T
from tests.helpers import lavis_stage2 as lavis

PREDICT_ANSWERS = {("t5", False): lavis.t5_predict_answers, ("opt", False): lavis.opt_predict_answers,
                   ("opt", True): lavis.vicuna_instruct_predict_answers}


def _expected(call: dict) -> dict:
    most, least = lavis.counts_4_33(call)
    return {"do_sample": False, "num_beams": call["num_beams"], "max_new_tokens": most, "min_new_tokens": least,
            "length_penalty": call["length_penalty"], "repetition_penalty": call.get("repetition_penalty", 1.0)}


def _generator(tmp_path, kind, instruct=False):
    folder = T.save_folder(T.blip2(kind, instruct=instruct), tmp_path / f"{kind}{int(instruct)}", kind,
                           instruct=instruct)
    return Generator(folder, device="cpu", dtype="fp32")


def _args(command, *flags):
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    src = ["--images", "i"] if command == "caption" else ["--data", "d"]
    return sub.parse_args(["--model", "m", *src, *flags])


@pytest.mark.parametrize("kind,instruct", sorted(PREDICT_ANSWERS))
def test_vqa_defaults_are_lavis_predict_answers_per_llm(tmp_path, kind, instruct):
    """LAVIS' VQA task calling predict_answers: the prompt, beam 5, 10 new tokens (9 for InstructBLIP's Vicuna,
    whose generate counts the BOS placeholder), no minimum, length penalty -1 for Flan-T5 and 0 for OPT."""
    gen = _generator(tmp_path, kind, instruct)
    prompt, kwargs = decoding(gen, _args("vqa"))
    assert prompt == lavis.VQA_RUN["prompt"]
    assert kwargs == _expected(lavis.vqa_task(PREDICT_ANSWERS[(kind, instruct)]))
    _, given = decoding(gen, _args("vqa", "--length-penalty", "1", "--num-beams", "3", "--prompt", "Q: {} A:",
                                   "--generate-kwargs", '{"num_beams": 2}'))
    assert (given["length_penalty"], given["num_beams"]) == (1.0, 2)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_caption_settings_are_lavis_generate_and_coco_evaluation(tmp_path, kind):
    gen = _generator(tmp_path, kind)
    generate = lavis.opt_generate if kind == "opt" else lavis.t5_generate
    prompt, kwargs = decoding(gen, _args("caption"))
    assert (prompt, kwargs) == ("", _expected(generate()))
    prompt, kwargs = decoding(gen, _args("caption", "--settings", "coco"))
    assert (prompt, kwargs) == (lavis.COCO_PROMPT, _expected(lavis.caption_task(generate)))
    assert (kwargs["max_new_tokens"], kwargs["min_new_tokens"]) == ((29, 7) if kind == "opt" else (30, 7))
    _, kwargs = decoding(gen, _args("caption", "--settings", "coco", "--max-new-tokens", "12", "--min-new-tokens", "2"))
    assert (kwargs["max_new_tokens"], kwargs["min_new_tokens"]) == (12, 2)


def test_caption_coco_end_to_end_equals_hf(tmp_path):
    """``blipfast caption --settings coco`` with an OPT folder: the captions HF's own generate gives with the prompt
    "a photo of" and LAVIS' counts (29 new tokens at most, 7 at least)."""
    hf = T.blip2("opt")
    folder = T.save_folder(hf, tmp_path / "model", "opt")
    (tmp_path / "imgs").mkdir()
    paths = T.write_images(tmp_path / "imgs", 2)
    out = tmp_path / "c.jsonl"
    assert cli.main(["caption", "--model", str(folder), "--images", str(tmp_path / "imgs"), "--output", str(out),
                     "--settings", "coco"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = T.tokenizer("opt")
    px = T.image_processor()(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    prompt = torch.tensor([tok("a photo of").input_ids] * 2)
    ids = torch.cat([torch.full((2, T.NUM_QUERY), T.IMAGE), prompt], 1)
    new = hf.generate(pixel_values=px, input_ids=ids, num_beams=5, max_new_tokens=29, min_new_tokens=7)
    new = new[:, ids.shape[1]:]
    assert [r["caption"] for r in rows] == [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
