"""blipfast.BlipPretrain against Salesforce BLIP's ``BLIP_Pretrain.forward`` restated in plain PyTorch
(blipfast/bench/blip_pretrain_baseline.py: BERT passes with -10000 masks, four passes that see the image each
projecting its K/V, the momentum loop, queue slicing at ``int(queue_ptr)``, materialised ITC targets).

Both run on deep copies of one tiny random model (dropout off) from the same state: the three losses, the gradient
of every parameter and of the pixels, and the state the step leaves (momentum copies, queues, pointer, temp) must
agree, in float64 to float64 rounding and in float32 within PyTorch's own float32 error. Cases: padding, repeated
image ids (the index queue), a batch of one, a prompt, given queue contents, and several steps in a row so that
the queue pointer wraps around."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from blipfast.bench.blip_pretrain_baseline import blip_pretrain_forward
from blipfast.models.blip_pretrain import BlipPretrain, BlipPretrainConfig
from blipfast.ops import sample_hard_negatives_from_gathered
from tests.helpers.blip_pretrain import VOCAB, make_batch, tiny_config
from tests.helpers.runtime import AUTOCAST, autocast, replay_captured_step
from tests.helpers.tolerance import assert_within_rounding, assert_within_torch_error

F64 = torch.float64
LOSSES = ("loss_itc", "loss_itm", "loss_lm")
STATE = ("image_queue", "text_queue", "idx_queue", "queue_ptr", "temp")


def _step(model, fn, px, ids, mask, kw, dtype):
    x = px.clone().to(dtype).requires_grad_()
    out = dict(fn(model, x, ids, mask, **kw))
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["pixel_values"] = x.grad
    model.zero_grad(set_to_none=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k in STATE or k.startswith(("vision_model_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m."))}
    return out, grads, state


def _check_step(fast, low, ref, dtype):
    """(outputs, grads) of blipfast, of the restatement in the low precision and in float64 (extra items ignored):
    each loss on its own, then every gradient as one vector, within the restatement's own error in ``dtype``."""
    (fo, fg), (lo, lg), (ro, rg) = fast[:2], low[:2], ref[:2]
    for k in LOSSES:
        assert_within_torch_error(fo[k].float().cpu().reshape(1), ro[k].reshape(1), lo[k].float().cpu().reshape(1),
                                  dtype=dtype, name=k)
    names = sorted(rg)
    cat = lambda g: torch.cat([g[n].double().cpu().flatten() for n in names])  # noqa: E731
    assert_within_torch_error(cat(fg), cat(rg), cat(lg), dtype=dtype, name="all gradients")


def _fast(m, x, i, mk, alpha=0.4, **kw):
    return m(x, i, mk, alpha=alpha, **kw)


def _base(m, x, i, mk, alpha=0.4, **kw):
    return blip_pretrain_forward(m, x, i, mk, alpha, **kw)


CASES = {
    # name: (B, T, padded rows, image_ids, negatives (text, image), config overrides)
    "padded": (4, 7, (1, 3), None, ([1, 2, 3, 0], [2, 0, 1, 1]), {}),
    "image_ids": (4, 6, (2,), [7, 3, 7, 5], ([1, 0, 1, 2], [3, 2, 1, 1]), {}),
    "B1": (1, 5, (), None, ([-1], [-1]), {}),
    "prompt": (3, 8, (0,), None, ([2, 0, 1], [1, 2, 0]), {"prompt_length": 3}),
}


def _case(name, dtype, steps=1):
    b, t, pads, ids_, neg, over = CASES[name]
    torch.manual_seed(1234)
    model = BlipPretrain(tiny_config(**over)).to(dtype).train()
    with torch.no_grad():  # known, non-trivial queue contents and pointer
        model.image_queue.copy_(F.normalize(torch.randn_like(model.image_queue), dim=0))
        model.text_queue.copy_(F.normalize(torch.randn_like(model.text_queue), dim=0))
        model.idx_queue.copy_(torch.randint(0, 9, model.idx_queue.shape))
        model.queue_ptr.fill_(b * (steps % 3))
        for p in model.parameters():  # momentum copies that differ from the online weights
            if not p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    kw = {"negatives": (torch.tensor(neg[0]), torch.tensor(neg[1]))}
    if ids_ is not None:
        kw["image_ids"] = torch.tensor(ids_)
    batches = [make_batch(b, t, pads) for _ in range(steps)]
    return model, batches, kw


def _compare(name, dtype, steps, check):
    model, batches, kw = _case(name, dtype, steps)
    fast, base = copy.deepcopy(model), copy.deepcopy(model)
    for s, (px, ids, mask) in enumerate(batches):
        alpha = 0.1 + 0.3 * s
        check(_step(fast, _fast, px, ids, mask, dict(kw, alpha=alpha), dtype),
              _step(base, _base, px, ids, mask, dict(kw, alpha=alpha), dtype), name, s)


def _check_f64(a, b, name, step):
    (fo, fg, fs), (bo, bg, bs) = a, b
    for k in LOSSES:
        torch.testing.assert_close(fo[k], bo[k], rtol=1e-12, atol=1e-12, msg=f"{name} step {step}: {k}")
    assert set(fg) == set(bg), sorted(set(fg) ^ set(bg))
    scale = max(g.abs().max().item() for g in bg.values())
    for n in bg:
        err = (fg[n] - bg[n]).abs().max().item()
        assert err <= 1e-11 * scale, f"{name} step {step}: d {n}: {err:.3e} (scale {scale:.3e})"
    assert set(fs) == set(bs)
    for n in bs:
        torch.testing.assert_close(fs[n], bs[n], rtol=1e-12, atol=1e-13, msg=f"{name} step {step}: {n}")


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_blip_float64(name):
    _compare(name, F64, 1, _check_f64)


def test_queue_wraps_around_over_steps_float64():
    """Four steps of B = 4 into a queue of 12 starting at pointer 4: the pointer goes 4, 8, 0 (wrap), 4, 8, and
    every step's losses, gradients and state equal BLIP's."""
    _compare("padded", F64, 4, _check_f64)


@pytest.mark.parametrize("name", ["padded", "image_ids"])
def test_parity_with_blip_float32(name):
    """blipfast fp32 vs the float64 ground truth, yardstick the restatement's own fp32 error (losses one by one, the
    gradients as one vector)."""
    model, ((px, ids, mask),), kw = _case(name, F64)
    runs = {}
    for tag, fn, dt in (("fast", _fast, torch.float32), ("base32", _base, torch.float32), ("ref", _base, F64)):
        runs[tag] = _step(copy.deepcopy(model).to(dt), fn, px, ids, mask, kw, dt)
    _check_step(runs["fast"], runs["base32"], runs["ref"], torch.float32)


def test_the_parity_check_catches_an_untied_lm_head():
    """The restatement ties the LM head to the word embeddings itself: a model whose head has a weight of its own
    (equal values, another parameter, as blipfast had it before) fails the float64 parity check."""
    model, ((px, ids, mask),), kw = _case("padded", F64)
    untied = copy.deepcopy(model)
    head = untied.text_decoder.cls.predictions
    head.decoder.weight = torch.nn.Parameter(head.decoder.weight.detach().clone())
    fast = _step(untied, _fast, px, ids, mask, kw, F64)
    base = _step(copy.deepcopy(model), _base, px, ids, mask, kw, F64)
    with pytest.raises(AssertionError):
        _check_f64(fast, base, "untied", 0)
    # the tied model passes, and its word-embedding gradient is the sum of the lookups' and the head's
    _check_f64(_step(copy.deepcopy(model), _fast, px, ids, mask, kw, F64), base, "tied", 0)


def test_checkpoints_hold_the_three_tied_keys():
    """Saving writes the three keys (one tensor); loading them yields one parameter; a checkpoint whose three
    values differ (BLIP before 073b821) loads as BLIP's loader leaves it: the LM head's value for all three."""
    from blipfast.models.blip_pretrain import TIED_WORD_EMBEDDINGS

    torch.manual_seed(8)
    model = BlipPretrain(tiny_config())
    sd = model.to_lavis_state_dict()
    assert all(torch.equal(sd[k], sd[TIED_WORD_EMBEDDINGS[0]]) for k in TIED_WORD_EMBEDDINGS)
    old = dict(sd)
    old[TIED_WORD_EMBEDDINGS[2]] = torch.randn_like(sd[TIED_WORD_EMBEDDINGS[2]])
    back = BlipPretrain(tiny_config())
    notes = back.load_lavis_state_dict(old)
    assert len(notes) == 2 and all("replaced" in n for n in notes)
    words = back.text_encoder.embeddings.word_embeddings.weight
    assert back.text_decoder.cls.predictions.decoder.weight is words
    assert torch.equal(words, old[TIED_WORD_EMBEDDINGS[2]])
    assert back.load_lavis_state_dict(sd) == [] and torch.equal(words, sd[TIED_WORD_EMBEDDINGS[0]])


def test_momentum_update_and_enqueue_by_hand():
    """Independent of the restatement: after a step, every momentum parameter is 0.995 p_m + 0.005 p of the
    parameters before it, and the queues hold the momentum features computed with the updated copies at the
    slots [ptr, ptr + B) modulo the queue size (5 here: not a multiple of B = 3, so the write wraps)."""
    torch.manual_seed(0)
    model = BlipPretrain(tiny_config(queue_size=5)).train()
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        model.queue_ptr.fill_(4)
    before = copy.deepcopy(model)
    px, ids, mask = make_batch(3, 6, (1,))
    model(px, ids, mask, alpha=0.4, image_ids=torch.tensor([4, 8, 4]))
    m = model.config.momentum
    on, mo_before = before._param_lists()
    _, mo_after = model._param_lists()
    for p, pm0, pm1 in zip(on, mo_before, mo_after):
        torch.testing.assert_close(pm1, m * pm0 + (1 - m) * p, rtol=1e-6, atol=1e-7)
        assert not pm1.requires_grad
    with torch.no_grad():
        img = F.normalize(model.vision_proj_m(model.vision_model_m(pixel_values=px).last_hidden_state[:, 0]), dim=-1)
        txt = F.normalize(model.text_proj_m(model.text_encoder_m(ids, attention_mask=mask).last_hidden_state[:, 0]),
                          dim=-1)
    slots = [4, 0, 1]
    torch.testing.assert_close(model.image_queue[:, slots], img.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.text_queue[:, slots], txt.t(), rtol=1e-5, atol=1e-6)
    assert model.idx_queue[0, slots].tolist() == [4, 8, 4]
    untouched = [2, 3]
    assert torch.equal(model.image_queue[:, untouched], before.image_queue[:, untouched])
    assert model.queue_ptr.tolist() == [2]


def test_sampled_negatives_are_the_ops_draws_with_blips_floor():
    torch.manual_seed(1)
    model = BlipPretrain(tiny_config()).eval()
    px, ids, mask = make_batch(6, 5)
    out = model(px, ids, mask, alpha=0.4, sample_seed=77)
    nt, ni = sample_hard_negatives_from_gathered(out.s_i2t, out.s_t2i, seed=77, floor=1e-4)
    assert torch.equal(out.neg_text_index, nt) and torch.equal(out.neg_image_index, ni)
    assert bool((nt != torch.arange(6)).all()) and bool((ni != torch.arange(6)).all())
    ids_img = torch.tensor([0, 0, 1, 1, 2, 2])
    out = model(px, ids, mask, alpha=0.4, sample_seed=78, image_ids=ids_img)
    for idx in (out.neg_text_index, out.neg_image_index):
        assert bool((ids_img[idx] != ids_img).all())


def test_batch_of_one_trains_itm_on_the_positive():
    torch.manual_seed(2)
    model = BlipPretrain(tiny_config()).train()
    out = model(*make_batch(1, 5), alpha=0.0)
    assert out.neg_text_index.tolist() == [-1] and out.neg_image_index.tolist() == [-1]
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_temp_is_clamped_and_alpha_may_be_a_tensor():
    model = BlipPretrain(tiny_config()).train()
    batch = make_batch(2, 5)
    with torch.no_grad():
        model.temp.fill_(3.0)
    a = model(*batch, alpha=torch.tensor(0.25))
    assert model.temp.item() == 0.5
    with torch.no_grad():
        model.temp.fill_(1e-6)
    model(*batch, alpha=0.25)
    assert model.temp.item() == pytest.approx(0.001)
    assert torch.isfinite(a.loss)


@pytest.mark.slow
def test_compiled_fullgraph_step_equals_eager():
    """The whole step (sampling, momentum update, queue writes) traces as one graph; two steps in a row (the queue
    and momentum state carry over) equal the eager ones, losses, gradients and state."""
    torch.manual_seed(3)
    model = BlipPretrain(tiny_config(text=dict(num_hidden_layers=1), vision=dict(num_hidden_layers=1))).train()
    px, ids, mask = make_batch(3, 6, (1,))
    eager, comp = copy.deepcopy(model), copy.deepcopy(model)
    fn = torch.compile(comp, fullgraph=True, backend="aot_eager")
    for k in range(2):
        seed = torch.tensor([5 + k])
        a = eager(px, ids, mask, alpha=torch.tensor(0.1 * k), sample_seed=seed)
        b = fn(px, ids, mask, alpha=torch.tensor(0.1 * k), sample_seed=seed)
        assert torch.equal(a.neg_text_index, b.neg_text_index) and torch.equal(a.neg_image_index, b.neg_image_index)
        for name in LOSSES:
            assert_within_rounding(b[name], a[name], name=name)
        a.loss.backward()
        b.loss.backward()
    ge = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    gc = {n: p.grad for n, p in comp.named_parameters() if p.grad is not None}
    assert ge.keys() == gc.keys()
    for n in ge:
        assert_within_rounding(gc[n], ge[n], name=n)
    for n in STATE:
        torch.testing.assert_close(getattr(comp, n), getattr(eager, n))


def test_shared_parameters_and_checkpoint_names():
    model = BlipPretrain(tiny_config())
    enc = {id(p) for p in model.text_encoder.parameters()}
    for n, p in model.text_decoder.bert.named_parameters():
        assert (id(p) in enc) == (".attention." not in n), n
    head = model.text_decoder.cls.predictions
    # as BLIP (since 073b821) ties them: the encoder's and the decoder's word embeddings and the LM head's output
    # weight are one parameter
    words = model.text_encoder.embeddings.word_embeddings.weight
    assert head.decoder.weight is words and model.text_decoder.bert.embeddings.word_embeddings.weight is words
    assert head.decoder.bias is head.bias
    assert all(not p.requires_grad for m in ("vision_model_m", "text_encoder_m", "vision_proj_m", "text_proj_m")
               for p in getattr(model, m).parameters())
    sd = model.to_lavis_state_dict()
    for key in ("visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder_m.norm.bias", "text_encoder_m.embeddings"
                ".word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight", "vision_proj_m.weight",
                "image_queue", "text_queue", "idx_queue", "queue_ptr", "temp", "itm_head.bias"):
        assert key in sd, key


def test_salesforce_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(4)
    model = BlipPretrain(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # momentum copies differ too
        model.queue_ptr.fill_(3)
    sd = model.to_lavis_state_dict()
    path = tmp_path / "blip_pretrain.pth"
    torch.save({"model": sd}, path)
    back = BlipPretrain.from_lavis(str(path), tiny_config())
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # a retrieval checkpoint: ptr_queue, idx_queue; no decoder -> refused (the decoder is part of the model)
    bad = dict(sd)
    bad["visual_encoder.something"] = torch.zeros(1)
    with pytest.raises(ValueError, match="visual_encoder.something"):
        BlipPretrain.from_lavis(bad, tiny_config())
    lacking = {k: v for k, v in sd.items() if not k.startswith("text_decoder.cls")}
    with pytest.raises(ValueError, match="lacks"):
        BlipPretrain.from_lavis(lacking, tiny_config())
    # no momentum copies and no queues (e.g. a fine-tuned captioning + retrieval merge): copies start as the online
    plain = {k: v for k, v in sd.items() if "_m." not in k and "queue" not in k}
    m2 = BlipPretrain.from_lavis(plain, tiny_config())
    assert torch.equal(m2.vision_model_m.post_layernorm.weight, model.vision_model.post_layernorm.weight)
    assert m2.idx_queue.eq(-100).all()
    wrong = dict(sd)
    wrong["image_queue"] = torch.zeros(8, 7)
    with pytest.raises(ValueError, match="image_queue"):
        BlipPretrain.from_lavis(wrong, tiny_config())


def test_config_round_trip_and_errors():
    cfg = tiny_config()
    assert BlipPretrainConfig(**cfg.to_dict()) == cfg
    assert BlipPretrainConfig().text.hidden_dropout_prob == 0.1 and BlipPretrainConfig().vision.image_size == 224
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        tiny_config(text=dict(encoder_hidden_size=20))
    with pytest.raises(ValueError, match="enc_token_id"):
        tiny_config(enc_token_id=VOCAB)
    with pytest.raises(ValueError, match="momentum"):
        tiny_config(momentum=1.5)
    with pytest.raises(ValueError, match="unknown vision"):
        tiny_config(vision=dict(bogus=1))
    with pytest.raises(TypeError, match="config"):
        BlipPretrain("base")


def test_forward_validates_its_arguments():
    model = BlipPretrain(tiny_config())
    px, ids, mask = make_batch(2, 5)
    with pytest.raises(ValueError, match="pixel_values"):
        model(px[:, :, :8], ids, mask, alpha=0.4)
    with pytest.raises(ValueError, match="input_ids"):
        model(px, ids.float(), mask, alpha=0.4)
    with pytest.raises(ValueError, match="attention_mask"):
        model(px, ids, mask[:, :3], alpha=0.4)
    with pytest.raises(ValueError, match="alpha"):
        model(px, ids, mask, alpha=1.5)
    with pytest.raises(ValueError, match="image_ids"):
        model(px, ids, mask, alpha=0.4, image_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match="negatives"):
        model(px, ids, mask, alpha=0.4, negatives=(torch.tensor([1, 0]),))
    with pytest.raises(ValueError, match="queue_size"):
        BlipPretrain(tiny_config(queue_size=1))(px, ids, mask, alpha=0.4)


def test_vit_sdpa_attention_equals_hf_eager():
    """fuse_vision_model changes only how the ViT's attention and MLP are computed: outputs and every gradient equal
    HF's eager BlipVisionModel (float64), parameters and state dict keys unchanged, and it can be undone."""
    from transformers import BlipVisionModel

    from blipfast.models.blip_vision import (RecomputeGeluBlipMLP, SdpaBlipAttention, fuse_vision_model,
                                             unfuse_vision_model)

    torch.manual_seed(5)
    hf = BlipVisionModel(tiny_config().vision).double()
    fast = fuse_vision_model(copy.deepcopy(hf))
    assert any(isinstance(m, SdpaBlipAttention) for m in fast.modules())
    assert any(isinstance(m, RecomputeGeluBlipMLP) for m in fast.modules())
    assert list(fast.state_dict()) == list(hf.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=F64)
    outs = []
    for m in (hf, fast):
        xi = x.clone().requires_grad_()
        y = m(pixel_values=xi).last_hidden_state
        (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-12)
    for n, g in outs[0][2].items():
        torch.testing.assert_close(outs[1][2][n], g, rtol=1e-10, atol=1e-12, msg=n)
    unfuse_vision_model(fast)
    assert not any(isinstance(m, (SdpaBlipAttention, RecomputeGeluBlipMLP)) for m in fast.modules())


# ----------------------------------------------------------------------------------------------
# GPU (pytest -m gpu)


@pytest.mark.gpu
def test_parity_on_gpu_kernels():
    """fp32 on CUDA (Triton attention, CUDA epilogue and sampler kernels) vs the float64 restatement on the CPU, the
    fp32 restatement's error as yardstick; the momentum copies and queues the step leaves too."""
    model, ((px, ids, mask),), kw = _case("padded", F64)
    cuda_kw = {"negatives": tuple(t.cuda() for t in kw["negatives"])}
    fo, fg, fs = _step(copy.deepcopy(model).float().cuda(), _fast, px.cuda(), ids.cuda(), mask.cuda(), cuda_kw,
                       torch.float32)
    lo, lg, ls = _step(copy.deepcopy(model).float(), _base, px, ids, mask, kw, torch.float32)
    ro, rg, rs = _step(copy.deepcopy(model), _base, px, ids, mask, kw, F64)
    _check_step((fo, fg), (lo, lg), (ro, rg), torch.float32)
    for n in rs:
        assert_within_torch_error(fs[n].cpu().double(), rs[n].double(), ls[n].double(), dtype=torch.float32, name=n)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_step_within_the_baselines_autocast_error(device, dtype):
    """Autocast (bf16 on the CPU's torch backends, bf16/fp16 on CUDA's kernels) vs the float64 restatement on the
    CPU, yardstick the restatement's own error under the same autocast on the same device: each loss and every
    gradient as one vector."""
    model, ((px, ids, mask),), kw = _case("padded", F64)
    dev_kw = {"negatives": tuple(t.to(device) for t in kw["negatives"])}
    dev = (px.to(device), ids.to(device), mask.to(device))
    fo, fg, _ = _step(copy.deepcopy(model).float().to(device), autocast(_fast, device, dtype), *dev, dev_kw,
                      torch.float32)
    lo, lg, _ = _step(copy.deepcopy(model).float().to(device), autocast(_base, device, dtype), *dev, dev_kw,
                      torch.float32)
    ro, rg, _ = _step(copy.deepcopy(model), _base, px, ids, mask, kw, F64)
    _check_step((fo, fg), (lo, lg), (ro, rg), dtype)


@pytest.mark.gpu
def test_compiled_step_on_cuda_never_syncs():
    model = BlipPretrain(tiny_config()).cuda().train()
    px, ids, mask = (t.cuda() for t in make_batch(4, 7, pad_rows=(1,)))
    alpha = torch.tensor(0.3, device="cuda")
    step = torch.compile(lambda a, b, c: model(a, b, c, alpha=alpha).loss, fullgraph=True)
    step(px, ids, mask).backward()  # compile and tune outside the check
    eager = model(px, ids, mask, alpha=alpha).loss  # the eager step does not sync either
    eager.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(px, ids, mask)
        loss.backward()
        model(px, ids, mask, alpha=alpha).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@pytest.mark.gpu
def test_training_step_captures_in_a_cuda_graph():
    """Forward (momentum update and enqueue included), backward and AdamW in one CUDA graph; every replay moves the
    queue pointer by B on the device and the loss goes down on the fixed batch."""
    torch.manual_seed(0)
    model = BlipPretrain(tiny_config(queue_size=40)).cuda().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, capturable=True)
    px, ids, mask = (t.cuda() for t in make_batch(8, 7, pad_rows=(1, 5)))
    alpha = torch.tensor(0.4, device="cuda")

    def train_step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(px, ids, mask, alpha=alpha).loss
        loss.backward()
        opt.step()
        return loss.detach()

    ptr = {}
    losses = replay_captured_step(train_step, 20, on_captured=lambda: ptr.setdefault("0", int(model.queue_ptr)))
    assert int(model.queue_ptr) == (ptr["0"] + 20 * 8) % 40
    assert torch.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean(), losses
