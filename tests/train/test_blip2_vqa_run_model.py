"""A ``blipfast train --task blip2-vqa`` run as a model (docs/blip2-finetune.md, "VQA fine-tuning"):
``blipfast eval vqa --model RUN`` (the run folder or one of its checkpoints) answers every question exactly as the
run's own ``--eval-every`` did (``RUN/answers-epoch<N>.jsonl``: the question alone in the Q-Former, cut at the run's
``--max-txt-len``, the run's prompt in the LLM, BLIP-2's ``predict_answers`` decoding), with Flan-T5 and with OPT;
what cannot be used is refused naming the flag."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from blipfast.cli import main
from blipfast.train.checkpoint import list_checkpoints
from tests.helpers.blip2_vqa import args, parts  # noqa: F401  (the tiny models, data and run arguments)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["t5", "opt"])
def run(request, parts, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("vqarun") / request.param)
    extra = ("--eval-every", "1", "--eval-data", parts["eval"], "--prompt", "Q: {} A:", "--lr", "1e-5")
    assert main(args(parts, out, llm=request.param, steps=4, extra=extra)) == 0
    return out


def _answers(path) -> dict:
    with open(path) as fh:
        text = fh.read().strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
    return {r["question_id"]: r["answer"] for r in rows}


def test_eval_vqa_model_run_answers_as_the_run_did(run, parts, tmp_path):  # noqa: F811
    want = _answers(os.path.join(run, "answers-epoch1.jsonl"))
    assert len(want) == 4
    if "t5" in run:  # the tiny OPT's answers are all empty (its special tokens win), the tiny Flan-T5's differ
        assert len(set(want.values())) > 1
    for i, model in enumerate((run, list_checkpoints(run)[-1])):
        pred = str(tmp_path / f"pred{i}.json")
        assert main(["eval", "vqa", "--model", model, "--data", parts["eval"], "--images", parts["images"],
                     "--save-predictions", pred, "--batch-size", "3", "--no-progress", "--device", "cpu"]) == 0
        assert _answers(pred) == want, model


def test_bad_runs_are_refused_naming_the_flag(run, parts, tmp_path, capsys):  # noqa: F811
    from blipfast.generate.export import export_run
    from blipfast.models.blip2_finetuned import finetuned_run

    fine = finetuned_run(run)
    assert fine.instruct and fine.prompt == "Q: {} A:" and fine.max_txt_len == 12
    bare = str(tmp_path / "bare")
    shutil.copytree(list_checkpoints(run)[-1], bare)
    shutil.rmtree(os.path.join(bare, "qformer_tokenizer"))
    with pytest.raises(ValueError, match="--model: .* without its qformer_tokenizer/ folder"):
        finetuned_run(bare)
    argv = ["eval", "vqa", "--data", parts["eval"], "--images", parts["images"], "--out", str(tmp_path / "m.json"),
            "--no-progress", "--device", "cpu", "--model"]
    assert main(argv + [bare]) == 2
    assert "--model: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="--model: .* was trained with the LLM"):
        finetuned_run(run, llm=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="RUN: .* is a blip2-vqa run"):
        export_run(run, tmp_path / "hf")
