"""Stage 2 (blipfast.Blip2Stage2) against Hugging Face's own Blip2ForConditionalGeneration: generated tokens,
loss and gradients, frozen parts, training, checkpoints, and building from a stage-1 checkpoint + LLM folder."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import blipfast
from blipfast import convert
from blipfast.models.blip2_stage2 import Blip2Stage2
from blipfast.testing import blip2 as T
from tests.helpers.tolerance import assert_close, assert_grads_within_torch_error, assert_within_torch_error

pytestmark = pytest.mark.hf  # compares with transformers' own models: CI also runs it on the lowest supported

Q = T.NUM_QUERY
KINDS = ("opt", "t5")


def _prompt(bsz, width, *, left_pad=True):
    """Prompt ids with row 0 padded (left for decoder-only generation, right for encoders), and the mask."""
    ids = torch.randint(5, len(T.VOCAB), (bsz, width))
    mask = torch.ones_like(ids)
    pad = slice(0, 2) if left_pad else slice(width - 2, width)
    ids[0, pad], mask[0, pad] = T.PAD, 0
    return ids, mask


def _with_image_tokens(ids, mask):
    """HF 5.x's input: one image placeholder token per query in front of the prompt."""
    img = torch.full((ids.shape[0], Q), T.IMAGE)
    return torch.cat([img, ids], 1), torch.cat([torch.ones_like(img), mask], 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_after_swap_equals_hf(kind, beams):
    """HF's own generate gives the same tokens before and after apply_blipfast_to_blip2, and Blip2Stage2.generate
    (image prefix as inputs_embeds, no placeholder tokens; pixels or cached pre-ln_vision tokens) gives them too."""
    hf = T.blip2(kind)
    px = torch.randn(4, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    prompt, pmask = _prompt(4, 5, left_pad=kind == "opt")
    ids, mask = _with_image_tokens(prompt, pmask)
    kw = dict(max_new_tokens=8, num_beams=beams, min_new_tokens=2 if beams > 1 else 0)
    scored = dict(output_scores=True, return_dict_in_generate=True)
    out = hf.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw, **scored)
    other = hf.generate(pixel_values=px.flip(0), input_ids=ids, attention_mask=mask, **kw, **scored)
    # the output depends on the image: the first step's scores move with it (a random tiny model may still pick the
    # same tokens for other images, so the tokens alone cannot show it)
    a, b = out.scores[0], other.scores[0]
    assert (a - b)[a.isfinite() & b.isfinite()].abs().max() > 1e-3  # (-inf: tokens masked by min_new_tokens)
    want = out.sequences
    reference = copy.deepcopy(hf)
    blipfast.apply_blipfast_to_blip2(hf)
    assert isinstance(hf.qformer, blipfast.QFormer)
    assert torch.equal(hf.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **kw), want)
    stage2 = Blip2Stage2(hf).eval()
    new = want[:, ids.shape[1]:] if kind == "opt" else want  # decoder-only HF returns prompt + new tokens
    assert torch.equal(stage2.generate(pixel_values=px, input_ids=prompt, attention_mask=pmask, **kw), new)
    feats = stage2.vision_tokens(px)
    assert torch.equal(stage2.generate(image_embeds=feats, input_ids=prompt, attention_mask=pmask, **kw), new)
    # the pre-ln_vision tokens are the HF ViT's hidden state before post_layernorm
    with torch.no_grad():
        hidden = reference.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    assert_close(feats, hidden)


def test_generate_without_prompt_starts_from_bos_like_hf():
    hf = T.blip2("opt")
    px = torch.randn(3, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    want = hf.generate(pixel_values=px, max_new_tokens=6)  # HF: image tokens + BOS
    stage2 = Blip2Stage2(hf).eval()
    assert torch.equal(stage2.generate(pixel_values=px, max_new_tokens=6), want[:, Q + 1:])


def _loss_inputs(kind, bsz=3):
    """(HF forward kwargs without pixels, Blip2Stage2 kwargs without pixels) for the same stage-2 batch."""
    if kind == "opt":  # prompt + text, right-padded; -100 on the prompt (2 tokens) and the padding
        text = torch.randint(5, len(T.VOCAB), (bsz, 7))
        mask = torch.ones_like(text)
        text[0, 5:], mask[0, 5:] = T.PAD, 0
        labels = text.masked_fill(mask == 0, -100)
        labels[:, :2] = -100
        ids, full_mask = _with_image_tokens(text, mask)
        hf = dict(input_ids=ids, attention_mask=full_mask, labels=torch.cat([torch.full((bsz, Q), -100), labels], 1))
        return hf, dict(input_ids=text, attention_mask=mask, labels=labels)
    prompt, pmask = _prompt(bsz, 4, left_pad=False)
    answer = torch.randint(5, len(T.VOCAB), (bsz, 5))
    dmask = torch.ones_like(answer)
    dmask[1, 3:] = 0
    labels = answer.masked_fill(dmask == 0, -100)
    ids, mask = _with_image_tokens(prompt, pmask)
    hf = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    return hf, dict(input_ids=prompt, attention_mask=pmask, labels=labels, decoder_attention_mask=dmask)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
def test_stage2_loss_and_gradients_equal_hf(kind):
    """Loss and every trained parameter's gradient equal the unswapped HF model's (fp32 against HF in float64,
    within 2x HF fp32's own error); the frozen LLM and ViT get none; cached features give the same loss."""
    hf = T.sharpen(T.blip2(kind), 1.0)
    reference = copy.deepcopy(hf)
    stage2 = Blip2Stage2(hf).eval()
    trainable = {n for n, _ in stage2.trainable_parameters()}
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainable)
    ref64 = copy.deepcopy(reference).double()
    px = torch.randn(3, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    hf_kw, kw = _loss_inputs(kind)

    out64 = ref64(pixel_values=px.double(), **hf_kw)
    out32 = reference(pixel_values=px, **hf_kw)
    mine = stage2(pixel_values=px, **kw)
    for out in (out64, out32, mine):
        out.loss.backward()
    assert_within_torch_error(mine.loss.detach(), out64.loss.detach(), out32.loss.detach(), name="loss")
    g64, g32, g = _grads(ref64), _grads(reference), _grads(stage2.model)
    assert set(g) == trainable == set(g32)
    assert_grads_within_torch_error(g, {n: g64[n] for n in g}, g32)
    frozen = [n for n, p in stage2.model.named_parameters() if n not in trainable]
    assert any(n.startswith("language_model.") for n in frozen) and any(n.startswith("vision_model.") for n in frozen)
    assert all(stage2.model.get_parameter(n).grad is None for n in frozen)
    assert {n.split(".")[0] for n in trainable} == {"qformer", "query_tokens", "language_projection", "vision_model"}
    assert all(not n.startswith("vision_model.") or ".post_layernorm." in f".{n}" for n in trainable)
    with torch.no_grad():
        feats = stage2.vision_tokens(px)
        assert_close(stage2(image_embeds=feats, **kw).loss, mine.loss.detach())


def test_frozen_parts_modes_and_ln_vision_switch():
    stage2 = Blip2Stage2(T.blip2("opt"), train_ln_vision=False).train()
    assert stage2.training and stage2.model.qformer.training and stage2.model.language_model.training
    assert not stage2.model.vision_model.training  # the frozen ViT stays in eval mode
    names = {n for n, _ in stage2.trainable_parameters()}
    assert not any(n.startswith(("vision_model.", "language_model.")) for n in names)
    assert stage2.trainable_state_dict().keys() == names


class _HostSyncs(TorchDispatchMode):
    """Counts operators that copy a device value to the host (item(), bool(tensor), nonzero, ...)."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.equal")):
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_adds_no_host_sync(kind):
    """The step (image features -> loss -> backward) synchronises exactly as often as the bare HF LLM call on
    the same inputs (whose eager mask checks are HF's; torch.compile skips them): blipfast adds none."""
    stage2 = Blip2Stage2(T.blip2(kind)).train()
    _, kw = _loss_inputs(kind)
    feats = torch.randn(3, 5, 24)
    with _HostSyncs() as step:
        stage2.loss({"image_embeds": feats, **kw}).backward()
    lm = stage2.model.language_model
    embeds, mask, _ = stage2._prefixed(kw["input_ids"], kw["attention_mask"], {"image_embeds": feats})
    embeds = embeds.detach().requires_grad_()
    labels = kw["labels"] if kind == "t5" else torch.cat([torch.full((3, Q), -100), kw["labels"]], 1)
    extra = {"decoder_attention_mask": kw["decoder_attention_mask"]} if kind == "t5" else {}
    with _HostSyncs() as bare:
        lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False, **extra).loss.backward()
    assert step.count == bare.count


@pytest.mark.slow
def test_loss_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the whole stage-2 loss (blipfast's Q-Former ops and HF's OPT, whose
    eager mask checks are skipped under tracing): no graph break, so no host sync anywhere in the compiled step;
    loss and gradients equal eager. (~15 s of compilation on a CPU.)"""
    stage2 = Blip2Stage2(T.sharpen(T.blip2("opt"), 1.0)).eval()
    batch = {"image_embeds": torch.randn(3, 5, 24), **_loss_inputs("opt")[1]}
    compiled = torch.compile(stage2.loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (stage2.loss, compiled):
        stage2.zero_grad(set_to_none=True)
        loss = fn(batch)
        loss.backward()
        results.append((loss.detach(), _grads(stage2.model)))
    (eager, g_eager), (comp, g_comp) = results
    # aot_eager runs the same aten ops as eager (no codegen, no reassociation): bit for bit
    assert torch.equal(comp, eager)
    assert g_comp.keys() == g_eager.keys()
    for n in g_eager:
        assert torch.equal(g_comp[n], g_eager[n]), n


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_steps_lower_the_loss(kind):
    """AdamW on the trained parameters lowers the loss of a fixed batch (dropout off, so the drop is no noise);
    the frozen parameters do not move."""
    stage2 = Blip2Stage2(T.sharpen(T.blip2(kind), 1.0)).eval()
    frozen_before = {n: p.detach().clone() for n, p in stage2.model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for _, p in stage2.trainable_parameters()], lr=5e-3)
    batch = {"image_embeds": torch.randn(3, 5, 24), **_loss_inputs(kind)[1]}
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = stage2.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(torch.equal(p, frozen_before[n]) for n, p in stage2.model.named_parameters() if not p.requires_grad)


def test_trainable_state_dict_roundtrip_hf_and_lavis_names(tmp_path):
    a, b = Blip2Stage2(T.blip2("opt")), Blip2Stage2(T.blip2("opt"))
    sd = a.trainable_state_dict()
    convert.save_safetensors(sd, tmp_path / "stage2.safetensors")
    params = dict(b.trainable_parameters())
    loaded = b.load_trainable_state_dict(convert.load_state_dict(tmp_path / "stage2.safetensors"))
    assert sorted(loaded) == sorted(sd)
    assert all(params[n] is p for n, p in b.trainable_parameters())  # copied in place: an optimizer stays valid
    assert all(torch.equal(b.trainable_state_dict()[k], v) for k, v in sd.items())
    c = Blip2Stage2(T.blip2("opt"))
    c.load_trainable_state_dict(convert.hf_to_lavis(sd).state_dict)  # LAVIS names: Qformer.bert.*, opt_proj, ln_vision
    assert all(torch.equal(c.trainable_state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="missing"):
        c.load_trainable_state_dict({k: v for k, v in sd.items() if k != "query_tokens"})
    bad = dict(sd, query_tokens=torch.zeros(1, Q + 1, 32))
    with pytest.raises(ValueError, match="query_tokens"):
        c.load_trainable_state_dict(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_make_text_batch_labels(kind):
    stage2 = Blip2Stage2(T.blip2(kind))
    tok = T.tokenizer(kind)
    batch = stage2.make_text_batch(tok, ["a red car", "two dogs on the grass"], prompts="a photo of ")
    ids, labels = batch["input_ids"], batch["labels"]
    if kind == "opt":  # <s> a photo of | text </s> | pad: -100 on the 4 prompt tokens and the padding
        assert ids[0].tolist()[:8] == [T.BOS] + tok("a photo of a red car </s>", add_special_tokens=False).input_ids
        assert labels[0].tolist() == [-100] * 4 + ids[0, 4:8].tolist() + [-100] * 2
        assert labels[1].tolist() == [-100] * 4 + ids[1, 4:].tolist()
    else:  # the prompt is the encoder's input, the text the decoder target (with </s>), -100 on padding
        assert ids.tolist() == [tok("a photo of").input_ids] * 2
        assert labels[0].tolist() == tok("a red car").input_ids + [-100] * 2
        assert batch["decoder_attention_mask"][0].tolist() == [1] * 4 + [0] * 2
    loss = stage2.loss({"image_embeds": torch.randn(2, 5, 24), **batch})
    assert torch.isfinite(loss)


def test_bad_inputs_are_named():
    stage2 = Blip2Stage2(T.blip2("opt"))
    feats, ids = torch.randn(2, 5, 24), torch.randint(5, 20, (2, 4))
    with pytest.raises(ValueError, match="exactly one"):
        stage2(input_ids=ids)
    with pytest.raises(ValueError, match="exactly one"):
        stage2(input_ids=ids, image_embeds=feats, pixel_values=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="image_embeds"):
        stage2(input_ids=ids, image_embeds=torch.randn(2, 5, 23))
    with pytest.raises(ValueError, match="input_ids"):
        stage2(input_ids=ids[:1], image_embeds=feats)
    with pytest.raises(ValueError, match="labels"):
        stage2(input_ids=ids, image_embeds=feats, labels=ids[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        stage2(input_ids=ids, image_embeds=feats, attention_mask=ids[:, :2])
    with pytest.raises(ValueError, match="qformer_input_ids"):
        stage2(input_ids=ids, image_embeds=feats, qformer_input_ids=ids)
    with pytest.raises(TypeError, match="unknown key"):
        stage2.loss({"image_embeds": feats, "input_ids": ids, "labels": ids, "image_id": ids})
    with pytest.raises(ValueError, match="labels"):
        stage2.loss({"image_embeds": feats, "input_ids": ids})
    with pytest.raises(TypeError, match="Blip2ForConditionalGeneration"):
        Blip2Stage2(torch.nn.Linear(2, 2))
