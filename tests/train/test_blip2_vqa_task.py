"""``blipfast train --task blip2-vqa`` (BLIP-2 VQA fine-tuning: the question in the InstructBLIP-form Q-Former, the
ViT trained; docs/blip2-finetune.md) on tiny models on a CPU: the task's loss and every trained gradient are those of
transformers' own ``InstructBlipForConditionalGeneration`` (unswapped, HF's training path: labels) on the task's
batch, a run trains, checkpoints, resumes bit for bit and is scored with the VQA accuracy, a checkpoint is an
--init of its own, and what the task cannot use is refused."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from blipfast.cli import build_parser, main
from blipfast.options import EXIT_STOPPED
from blipfast.testing import blip2 as T
from blipfast.train import Trainer
from blipfast.train.config import read_config_file, resolve
from tests.helpers.blip2_vqa import args, parts  # noqa: F401  (the fixture and the run arguments)
from tests.helpers.tolerance import assert_close, assert_grads_equal_in_float64, assert_within_torch_error
from tests.helpers.train import read_log, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical runs, a 2-core CI (tests/conftest.py)

NO_DROPOUT = {"qformer": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def _trainer(argv) -> Trainer:
    cfg, given = resolve(build_parser().parse_args(argv))
    return Trainer(cfg, given, log=lambda m: None)


def test_recipe_defaults(parts):
    cfg, _ = resolve(build_parser().parse_args(["train", "--task", "blip2-vqa", "--data", parts["data"]]))
    want = {"batch_size": 16, "epochs": 5.0, "lr": 1e-5, "warmup_lr": 1e-8, "warmup_steps": 1000, "min_lr": 0.0,
            "weight_decay": 0.05, "prompt": "Question: {} Answer:", "text_suffix": None,
            "schedule": "reference", "param_groups": "reference"}
    assert {k: cfg[k] for k in want} == want


def _batch(tr) -> dict:
    rows = [tr.dataset[i] for i in range(4)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0] if isinstance(rows[0][k], torch.Tensor)}


def _hf_twin(model):
    """transformers' own InstructBlipForConditionalGeneration (HF ViT, HF Q-Former, the same LLM) holding the
    task model's weights."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    m = model.model
    vcfg = {**m.vision_model.config.to_dict(), "model_type": "instructblip_vision_model"}
    qcfg = {k: v for k, v in m.config.qformer_config.to_dict().items() if k != "model_type"}
    cfg = InstructBlipConfig(vision_config=vcfg, qformer_config=qcfg,
                             text_config=m.language_model.config.to_dict(), num_query_tokens=model.num_query_tokens,
                             image_token_index=T.IMAGE)
    cfg.text_config = m.language_model.config
    hf = InstructBlipForConditionalGeneration(cfg)
    hf.language_model = copy.deepcopy(m.language_model)
    hf.vision_model.post_layernorm.eps = m.vision_model.post_layernorm.eps  # ln_vision: LAVIS' epsilon
    missing, unexpected = hf.load_state_dict(m.state_dict(), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    trained = {n for n, _ in model.trainable_parameters()}
    for n, p in hf.named_parameters():
        p.requires_grad_(n in trained)
    return hf.eval()


def _hf_inputs(model, text: dict) -> dict:
    """HF 5.x's input: one image placeholder token per query in front of the LLM's ids (decoder-only: -100
    labels under them)."""
    q = model.num_query_tokens
    ids, mask = text["input_ids"], text["attention_mask"]
    img = torch.full((ids.shape[0], q), T.IMAGE)
    out = {"input_ids": torch.cat([img, ids], 1), "attention_mask": torch.cat([torch.ones_like(img), mask], 1),
           "qformer_input_ids": text["qformer_input_ids"], "qformer_attention_mask": text["qformer_attention_mask"]}
    if model.is_encoder_decoder:
        return {**out, "labels": text["labels"], "decoder_attention_mask": text["decoder_attention_mask"]}
    return {**out, "labels": torch.cat([torch.full((ids.shape[0], q), -100), text["labels"]], 1)}


def _grads(named: list, loss) -> dict:
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))


@pytest.mark.parametrize("llm", ["t5", "opt"])
def test_step_equals_hf_instructblip(parts, tmp_path, llm):
    """The task's loss on its own batch ("Question: {q} Answer:" to the LLM, the question to the Q-Former, the most
    weighted answer the target) and the gradient of every trained tensor (ViT, ln_vision, the whole Q-Former with
    its text embeddings, queries, projection) equal the unswapped HF InstructBLIP's on that batch: in float64 to
    rounding, the float32 loss within PyTorch's own error; the LLM gets none."""
    tr = _trainer(args(parts, str(tmp_path / "run"), llm=llm, steps=1, model=NO_DROPOUT))
    try:
        model = tr.core
        assert model.is_instructblip
        batch = _batch(tr)
        text = {k: batch[k].long() for k in tr.task.keys}
        # the target is each question's most weighted answer (first of the ties); the prompt's tokens carry no loss
        ann, tok = tr.task.ann, tr.task.tok
        for r in range(4):
            p = int(batch["index"][r])
            best = max(zip(ann.weights[p], range(len(ann.weights[p]))), key=lambda wi: (wi[0], -wi[1]))[1]
            labels = [t for t in text["labels"][r].tolist() if t != -100]
            ids = tok(ann.answers[p][best], add_special_tokens=False)["input_ids"]
            assert labels == ids + [tok.eos_token_id], (labels, ann.answers[p])
            qtok = tr.task.qtok
            assert text["qformer_input_ids"][r][text["qformer_attention_mask"][r].bool()].tolist() \
                == qtok(ann.captions[p])["input_ids"]  # the question
        names = {n.split(".")[0] for n, _ in model.trainable_parameters()}
        assert names == {"vision_model", "qformer", "query_tokens", "language_projection"}
        assert "qformer.embeddings.word_embeddings.weight" in dict(model.trainable_parameters())
        assert not any(p.requires_grad for p in model.language_model.parameters())
        hf = _hf_twin(model)
        model.eval()
        px = batch["pixel_values"]

        def both(mine_model, ref_model, px):
            mine, _ = tr.task.step_loss(mine_model, px, text, None)
            ref = ref_model(pixel_values=px, **_hf_inputs(mine_model, text)).loss
            return mine, ref

        m64, hf64 = copy.deepcopy(model).double(), copy.deepcopy(hf).double()
        mine64, ref64 = both(m64, hf64, px.double())
        assert_close(mine64, ref64, name="loss (float64)")
        g_mine = _grads(m64.trainable_parameters(), mine64)
        g_ref = _grads([(n, p) for n, p in hf64.named_parameters() if p.requires_grad], ref64)
        assert_grads_equal_in_float64(g_mine, g_ref)
        assert g_ref["qformer.embeddings.word_embeddings.weight"].abs().max() > 0  # the question reaches the loss
        assert g_ref["vision_model.encoder.layers.0.mlp.fc1.weight"].abs().max() > 0
        mine32, ref32 = both(model, hf, px)
        assert_within_torch_error(mine32.detach(), ref64.detach(), ref32.detach(), name="loss (float32)")
    finally:
        tr.close()


def test_trains_checkpoints_resumes_bit_identically_and_evaluates(parts, tmp_path):
    """4 steps == 2 (--stop-after) + --resume, losses and every trained tensor; --eval-every 1 answers the evaluation
    questions and scores them; --save-lavis names the Q-Former's text half as LAVIS does; a checkpoint is an --init
    of its own (its ViT and its qformer_tokenizer/)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    extra = ("--save-every", "2", "--eval-every", "1", "--eval-data", parts["eval"])
    assert main(args(parts, full, extra=extra + ("--save-lavis",))) == 0
    assert main(args(parts, part, extra=extra + ("--stop-after", "2"))) == EXIT_STOPPED
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    rf, rp = read_log(full), read_log(part)
    keys = ("step", "loss", "lr", "epoch")
    assert [r["step"] for r in rf] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rf)
    assert [[r[k] for k in keys] for r in rp] == [[r[k] for k in keys] for r in rf]
    wf, wp = weights(full), weights(part)
    assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf)
    assert "qformer.embeddings.word_embeddings.weight" in wf and not any("language_model" in k for k in wf)
    from blipfast.train.checkpoint import list_checkpoints

    lavis = torch.load(os.path.join(list_checkpoints(full)[-1], "lavis.pth"), weights_only=True)["model"]
    assert torch.equal(lavis["Qformer.bert.embeddings.word_embeddings.weight"],
                       wf["qformer.embeddings.word_embeddings.weight"])  # LAVIS' names for the Q-Former's text half
    with open(os.path.join(full, "eval.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 1 and rows[0]["questions"] == 4 and 0 <= rows[0]["overall"] <= 100
    with open(os.path.join(full, "answers-epoch1.jsonl")) as fh:
        answers = [json.loads(line) for line in fh]
    assert [a["question_id"] for a in answers] == [4, 9, 14, 19] and all(isinstance(a["answer"], str) for a in answers)
    cfg = read_config_file(os.path.join(full, "config.yaml"))
    assert cfg["task"] == "blip2-vqa" and cfg["model"]["image_size"] == 24
    # a checkpoint as --init: no --vision, no --model qformer_tokenizer
    again = args(parts, str(tmp_path / "again"), steps=1)
    again[again.index("--init") + 1] = full
    k = again.index("--vision")
    again = again[:k] + again[k + 2:]
    m = again.index("--model")
    tr = _trainer(again[:m] + again[m + 2:])
    try:
        got = dict(tr.core.trainable_parameters())
        assert got.keys() == wf.keys() and all(torch.equal(got[k], wf[k]) for k in wf)
    finally:
        tr.close()


def test_refusals_write_nothing(parts, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = args(parts, out, steps=1)
    m = base.index("--model")
    no_qtok = base[:m] + base[m + 2:]
    for argv, msg in ((no_qtok, "needs the Q-Former's tokenizer"),
                      (base + ["--prompt", "Answer:"], "needs one {} for the question"),
                      (base[:m + 1] + ['{"qformer_tokenizer": 3}'] + base[m + 2:], "qformer_tokenizer must be"),
                      (base + ["--features", parts["images"]], "--features cannot be used with --task blip2-vqa")):
        assert main(argv) == 2, msg
        assert msg in capsys.readouterr().err, msg
        assert not os.path.exists(out) or not os.listdir(out), msg


def test_a_checkpoint_without_the_qformer_text_half_is_refused(parts):
    """The InstructBLIP Q-Former needs the stage-1 text embeddings and text FFN (a stage-2 checkpoint drops them)."""
    from blipfast.models.blip2_stage2 import Blip2Stage2, read_stage1

    sd = {k: v for k, v in read_stage1(parts["init"])[0].items() if not k.startswith("embeddings.")}
    with pytest.raises(ValueError, match="needs the stage-1 text embeddings and text FFN"):
        Blip2Stage2.from_pretrained_parts(sd, parts["t5"], instruct=True)
