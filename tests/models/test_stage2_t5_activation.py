"""Flan-T5's feed-forward activation in stage 2: LAVIS builds its T5 with ``dense_act_fn = "gelu"`` (exact GELU)
where Flan-T5's config says ``gelu_new``. ``Blip2Stage2.from_pretrained_parts`` (and so ``blipfast train --task
blip2-stage2`` with a Flan-T5 folder) builds it as LAVIS does, so loss and gradients equal a restatement of
LAVIS' ``Blip2T5.forward`` (tests/helpers/lavis_stage2.py): the same numbers in float64, the fp32 loss within
PyTorch's own error; ``from_hf`` keeps the model's config."""
from __future__ import annotations

import copy

import pytest
import torch

from blipfast.models import llm as llm_mod
from blipfast.models.blip2_stage2 import Blip2Stage2
from blipfast.testing import blip2 as T
from tests.helpers.tolerance import assert_close, assert_grads_equal_in_float64, assert_within_torch_error
from tests.helpers import lavis_stage2 as lavis
from tests.helpers.stage2 import write_lavis_stage1

pytestmark = pytest.mark.hf

PROMPTS = ["a photo of", "question: what is the man riding short answer:", "", "what color is the car"]
CAPTIONS = ["a red bus on the street", "bus", "two dogs sitting on the grass", "blue"]


def _flan_t5_config(**kw):
    """The tiny T5 of blipfast.testing with Flan-T5's feed-forward: gated, its config's GELU the tanh one."""
    from transformers import T5Config

    base = {k: v for k, v in T.configs("t5")[2].to_dict().items() if k not in ("dense_act_fn", "is_gated_act")}
    cfg = T5Config(**{**base, "feed_forward_proj": "gated-gelu", **kw})
    assert (cfg.dense_act_fn, cfg.is_gated_act) == ("gelu_new", True)
    return cfg


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("t5act")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        T.sharpen(T5ForConditionalGeneration(_flan_t5_config()), 1.0).save_pretrained(root / "flan-t5")
    T.tokenizer("t5").save_pretrained(root / "flan-t5")
    return {"llm": root / "flan-t5", "stage1": write_lavis_stage1(root / "stage1.pth", seed=4)}


def _grads(named):
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


def _run(model, feats, batch):
    """(loss, {HF name: grad}) of blipfast's stage 2 or of LAVIS' restated forward."""
    ids, mask, targets, dmask = batch
    model.zero_grad(set_to_none=True)
    if isinstance(model, Blip2Stage2):
        loss = model(image_embeds=feats, input_ids=ids, attention_mask=mask, labels=targets,
                     decoder_attention_mask=dmask).loss
        loss.backward()
        return loss.detach(), _grads(model.model.named_parameters())
    loss = model(feats, *batch)
    loss.backward()
    return loss.detach(), {model.hf_name(n): t for n, t in _grads(model.named_parameters()).items()}


def test_from_parts_builds_flan_t5_with_lavis_exact_gelu(parts):
    """blipfast's stage 2 built from parts computes LAVIS' Blip2T5.forward (exact GELU): in float64 the loss and
    every trained gradient are the same numbers (to float64 rounding), and the fp32 loss is within PyTorch's own
    fp32 error; the batch is LAVIS' (make_text_batch gives the same). With the config's gelu_new
    (t5_activation=None, the old behaviour) the float64 gradients differ.

    Why float64 for the gradients: both sides run the same T5, whose fp32 backward amplifies the last-bit
    differences of its input by 20 to 200 rounding units, at random; one fp32 run of PyTorch is then a noisy
    yardstick (the fp32 comparison of the fast path with PyTorch is test_blip2_stage2's)."""
    stage2 = Blip2Stage2.from_pretrained_parts(parts["stage1"], parts["llm"]).eval()
    assert lavis.exact_gelu_is_used(stage2.language_model)
    assert stage2.language_model.config.dense_act_fn == "gelu" and stage2.language_model.config.is_gated_act
    ref = lavis.LavisT5(stage2, parts["llm"]).eval()
    assert lavis.exact_gelu_is_used(ref.t5_model)
    ref64 = copy.deepcopy(ref).double()
    tok = T.tokenizer("t5")
    batch = lavis.t5_batch(tok, PROMPTS, CAPTIONS)
    made = stage2.make_text_batch(tok, CAPTIONS, prompts=PROMPTS)
    for key, want in zip(("input_ids", "attention_mask", "labels", "decoder_attention_mask"), batch):
        assert torch.equal(made[key], want), key
    feats = torch.randn(len(CAPTIONS), 5, 24)
    loss64, g64 = _run(ref64, feats.double(), batch)
    loss32, _ = _run(ref, feats, batch)
    mine32, _ = _run(stage2, feats, batch)
    assert_within_torch_error(mine32, loss64, loss32, name="loss")
    mine64, g = _run(copy.deepcopy(stage2).double(), feats.double(), batch)
    assert_close(mine64, loss64, name="loss (float64)")
    assert any(n.startswith("qformer.") for n in g)
    assert_grads_equal_in_float64(g, g64)

    old = Blip2Stage2.from_pretrained_parts(parts["stage1"], parts["llm"], t5_activation=None).eval()
    assert old.language_model.config.dense_act_fn == "gelu_new" and not lavis.exact_gelu_is_used(old.language_model)
    old.load_trainable_state_dict(stage2.trainable_state_dict())
    _, g_old = _run(old.double(), feats.double(), batch)
    with pytest.raises(AssertionError):
        assert_grads_equal_in_float64(g_old, g64)


def test_module_llm_changed_in_place_relu_t5_kept_from_hf_keeps_its_config(parts, tmp_path):
    """A T5 module given as llm gets the exact GELU in place; a ReLU T5 keeps ReLU; from_hf keeps the wrapped
    model's activation (gelu_new here), and a from-parts model saved and wrapped again keeps "gelu"."""
    from transformers import T5ForConditionalGeneration

    lm = T5ForConditionalGeneration(_flan_t5_config())
    stage2 = Blip2Stage2.from_pretrained_parts(parts["stage1"], lm, t5_activation="gelu")
    assert stage2.language_model is lm and lavis.exact_gelu_is_used(lm) and lm.config.dense_act_fn == "gelu"
    relu = T5ForConditionalGeneration(T.configs("t5")[2])
    assert not llm_mod.set_t5_activation(relu) and relu.config.dense_act_fn == "relu"
    with pytest.raises(ValueError, match="t5_activation"):
        llm_mod.load_llm(lm, t5_activation="gelu_exact")

    hf = T.blip2("t5")
    hf.language_model = T5ForConditionalGeneration(_flan_t5_config())
    hf.config.text_config = hf.language_model.config
    wrapped = Blip2Stage2.from_hf(hf)
    assert wrapped.language_model.config.dense_act_fn == "gelu_new" and not lavis.exact_gelu_is_used(hf.language_model)

    built = Blip2Stage2.from_pretrained_parts(parts["stage1"], parts["llm"], T.configs("t5")[0])  # ViT from the .pth
    built.save_pretrained(tmp_path / "m")
    again = Blip2Stage2.from_hf(tmp_path / "m")
    assert again.language_model.config.dense_act_fn == "gelu" and lavis.exact_gelu_is_used(again.language_model)
