"""The tiny parts of the ``blip2-vqa`` task's tests (tests/train/test_blip2_vqa_task.py and
tests/train/test_blip2_vqa_run_model.py): synthetic VQA data, a tiny ViT, OPT and T5, a LAVIS-named stage-1
checkpoint without a ViT and the Q-Former's tokenizer, and the arguments of a tiny run on them."""
from __future__ import annotations

import json

import pytest

from blipfast.testing import blip2 as T
from blipfast.testing.data import write_vision
from tests.helpers.blip2_caption import write_lavis_stage1_no_vit
from tests.helpers.stage2 import write_llm


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from blipfast.data.vqa import make_synthetic_vqa

    root = tmp_path_factory.mktemp("b2vqa")
    vqa = make_synthetic_vqa(str(root / "vqa"), 20, seed=1, image_size=16)
    qtok = str(root / "qtok")
    T.tokenizer("opt").save_pretrained(qtok)  # the Q-Former's vocabulary: blipfast.testing.blip2's words
    return {"data": vqa["data"], "eval": vqa["eval"], "images": vqa["images"], "qtok": qtok,
            "vision": write_vision(str(root / "vit")), "opt": write_llm(root / "llm-opt", "opt"),
            "t5": write_llm(root / "llm-t5", "t5", seed=1), "init": write_lavis_stage1_no_vit(root / "stage1.pth")}


def args(parts, out, llm="t5", steps=4, model=None, extra=()) -> list:
    model = {"qformer_tokenizer": parts["qtok"], **(model or {})}
    return ["train", "--task", "blip2-vqa", "--out", out, "--data", parts["data"], "--images", parts["images"],
            "--vision", parts["vision"], "--llm", parts[llm], "--init", parts["init"], "--model", json.dumps(model),
            "--steps", str(steps), "--batch-size", "4", "--max-txt-len", "12", "--warmup-steps", "2", "--lr", "1e-3",
            "--log-every", "1", "--no-progress", "--device", "cpu", "--seed", "7", "--save-every", "0", *extra]
