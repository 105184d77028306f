"""blipfast.Blip2Stage1 against LAVIS' stage-1 forward restated in plain PyTorch (blipfast/bench/stage1_baseline.py:
four passes, per-pass image K/V, dense -10000 masks, SDPA, materialised ITC similarities).

Parity is checked twice: in float64, where the two must agree to float64 rounding (the same mathematics: any
deviation of the fused step's semantics shows up here), and in float32 against the float64 ground truth with
PyTorch's own float32 error (the baseline's) as the yardstick."""
from __future__ import annotations

import copy

import pytest
import torch

import blipfast.ops as O
from blipfast import Blip2Stage1, Blip2Stage1Config, QFormerConfig
from blipfast.bench.stage1_baseline import lavis_stage1_forward
from blipfast.ops._philox import new_seed
from tests.helpers.runtime import AUTOCAST, autocast, replay_captured_step
from tests.helpers.tolerance import assert_close, assert_within_torch_error

F64 = torch.float64
LOSSES = ("loss_itc", "loss_itm", "loss_lm")


def tiny_config(**kw) -> Blip2Stage1Config:
    q = dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=3, encoder_hidden_size=40,
             vocab_size=120, max_position_embeddings=40)
    q.update(kw.pop("qformer", {}))
    return Blip2Stage1Config(qformer=q, num_query_tokens=kw.pop("num_query_tokens", 6), embed_dim=16,
                             bos_token_id=119, **kw)


def make_batch(b, t, n_img=9, width=40, pad_rows=(), vocab=119):
    img = torch.randn(b, n_img, width)
    ids = torch.randint(1, vocab, (b, t))
    ids[:, 0] = 101 % vocab  # [CLS]
    mask = torch.ones(b, t, dtype=torch.long)
    for r in pad_rows:
        if t > 2:
            mask[r, t - 2:] = 0
            ids[r, t - 2:] = 0
    return img, ids, mask


def _run(model, fn, dtype, img, ids, mask, which=None):
    model = copy.deepcopy(model).to(dtype)
    x = img.clone().to(dtype).requires_grad_()
    out = dict(fn(model, x, ids, mask))
    loss = out["loss"] if which is None else sum(out[k] for k in which)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["image_embeds"] = x.grad
    return out, grads


CASES = {
    # name: (B, T, padded rows, image_ids, negatives (text, image))
    "padded": (4, 7, (1, 3), None, ([1, 2, 3, 0], [2, 0, 1, 1])),
    "B1": (1, 5, (), None, ([-1], [-1])),
    "image_ids": (4, 6, (2,), [7, 3, 7, 5], ([1, 0, 1, 2], [3, 2, 1, 1])),
    "T1": (3, 1, (), None, ([2, 0, 1], [1, 2, 0])),
}


def _case(name):
    b, t, pads, ids_, neg = CASES[name]
    img, ids, mask = make_batch(b, t, pad_rows=pads)
    kw = {"negatives": (torch.tensor(neg[0]), torch.tensor(neg[1]))}
    if ids_ is not None:
        kw["image_ids"] = torch.tensor(ids_)
    fast = lambda m, x, i, mk: m(x, i, mk, **kw)  # noqa: E731
    base = lambda m, x, i, mk: lavis_stage1_forward(m, x, i, mk, **kw)  # noqa: E731
    # T = 1 has no next-token target: blipfast's loss_lm is 0 where LAVIS' mean over no tokens is NaN
    which = ("loss_itc", "loss_itm") if t == 1 else None
    return img, ids, mask, fast, base, which


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_lavis_float64(name):
    img, ids, mask, fast, base, which = _case(name)
    model = Blip2Stage1(tiny_config()).eval()
    fo, fg = _run(model, fast, F64, img, ids, mask, which)
    bo, bg = _run(model, base, F64, img, ids, mask, which)
    for k in LOSSES:
        if which is not None and k not in which:
            assert fo[k].item() == 0.0 and torch.isnan(bo[k])
            continue
        torch.testing.assert_close(fo[k], bo[k], rtol=1e-12, atol=1e-12, msg=k)
    assert set(fg) == set(bg)
    scale = max(g.abs().max().item() for g in bg.values())
    for n in bg:  # same mathematics: float64 rounding relative to the gradients' overall scale
        err = (fg[n] - bg[n]).abs().max().item()
        assert err <= 1e-11 * scale, f"{n}: {err:.3e} (scale {scale:.3e})"


def _check_gradients(fg, rg, lg, temp, dtype=torch.float32):
    """The gradients as one vector (every parameter and image_embeds) but temp: a gradient that is a small sum
    of large, cancelling terms carries an fp32 error relative to its terms, not to itself, on either path.
    d loss / d temp is such a sum with far larger terms, (p - target) * s / temp with |s| <= 1 / temp for
    normalized features: on its own, its floor at 1 / temp^2."""
    names = sorted(n for n in rg if n != "temp")
    cat = lambda g: torch.cat([g[n].double().cpu().flatten() for n in names])  # noqa: E731
    assert_within_torch_error(cat(fg), cat(rg), cat(lg), dtype=dtype, name="all gradients")
    assert_within_torch_error(fg["temp"].cpu(), rg["temp"], lg["temp"].cpu(), dtype=dtype, name="d temp",
                              magnitude=1.0 / float(temp.detach()) ** 2)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_lavis_float32(name):
    """blipfast fp32 vs the float64 ground truth, yardstick the baseline's own fp32 error. Each loss on its own;
    the gradients as _check_gradients holds them."""
    img, ids, mask, fast, base, which = _case(name)
    model = Blip2Stage1(tiny_config()).eval()
    fo, fg = _run(model, fast, torch.float32, img, ids, mask, which)
    lo, lg = _run(model, base, torch.float32, img, ids, mask, which)
    ro, rg = _run(model, base, F64, img, ids, mask, which)
    for k in which or LOSSES:
        assert_within_torch_error(fo[k].reshape(1), ro[k].reshape(1), lo[k].reshape(1), dtype=torch.float32, name=k)
    _check_gradients(fg, rg, lg, model.temp)


def test_parity_on_triton_kernels(monkeypatch):
    """The same step with the attention and ITC ops on the Triton kernels (interpreter on CPU)."""
    monkeypatch.setenv("BLIPFAST_BACKEND", "triton")
    if not O._common._runnable("triton", torch.device("cpu"), torch.float32):
        pytest.skip("Triton is not available")
    img, ids, mask, fast, base, which = _case("padded")
    model = Blip2Stage1(tiny_config(qformer=dict(num_hidden_layers=2))).eval()
    fo, fg = _run(model, fast, torch.float32, img, ids, mask, which)
    monkeypatch.setenv("BLIPFAST_BACKEND", "torch")
    lo, lg = _run(model, base, torch.float32, img, ids, mask, which)
    ro, rg = _run(model, base, F64, img, ids, mask, which)
    for k in LOSSES:
        assert_within_torch_error(fo[k].reshape(1), ro[k].reshape(1), lo[k].reshape(1), dtype=torch.float32, name=k)
    _check_gradients(fg, rg, lg, model.temp)


def test_sampled_negatives_are_the_ops_draws():
    model = Blip2Stage1(tiny_config()).eval()
    img, ids, mask = make_batch(5, 6, pad_rows=(0,))
    torch.manual_seed(1234)
    out = model(img, ids, mask)
    torch.manual_seed(1234)
    seed = new_seed(torch.device("cpu"))  # the one random draw of an eval step: the sampler's seed
    nt, ni = O.sample_hard_negatives(out.s_i2t, out.s_t2i, seed=seed)
    assert torch.equal(nt, out.neg_text_index) and torch.equal(ni, out.neg_image_index)
    assert (nt != torch.arange(5)).all() and (ni != torch.arange(5)).all()
    # and the loss with those negatives given is the same loss
    again = model(img, ids, mask, negatives=(nt, ni))
    torch.testing.assert_close(again.loss, out.loss, rtol=0, atol=0)


def test_batch_of_one_trains_without_negatives():
    model = Blip2Stage1(tiny_config()).train()
    img, ids, mask = make_batch(1, 5)
    out = model(img, ids, mask)
    assert out.neg_text_index.tolist() == [-1] and out.neg_image_index.tolist() == [-1]
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_image_ids_negatives_never_show_the_same_image():
    model = Blip2Stage1(tiny_config()).eval()
    img, ids, mask = make_batch(6, 5)
    image_ids = torch.tensor([0, 0, 1, 1, 2, 3])
    for _ in range(5):
        out = model(img, ids, mask, image_ids=image_ids)
        for k, j in enumerate(out.neg_image_index.tolist()):
            assert image_ids[j] != image_ids[k]
        for k, j in enumerate(out.neg_text_index.tolist()):
            assert image_ids[j] != image_ids[k]


def test_compiled_fullgraph_equals_eager():
    torch._dynamo.reset()
    model = Blip2Stage1(tiny_config(qformer=dict(num_hidden_layers=2))).eval()
    img, ids, mask = make_batch(3, 6, pad_rows=(1,))
    neg = (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))

    def step(img, ids, mask):
        return model(img, ids, mask, negatives=neg).loss

    eager = step(img, ids, mask)
    ge = torch.autograd.grad(eager, list(model.parameters()))
    comp = torch.compile(step, fullgraph=True, backend="aot_eager")(img, ids, mask)
    gc = torch.autograd.grad(comp, list(model.parameters()))
    assert torch.equal(comp, eager)  # aot_eager runs the same aten ops: identical
    for a, b in zip(gc, ge):
        assert torch.equal(a, b)


def test_compiled_fullgraph_with_sampling_and_dropout_runs():
    torch._dynamo.reset()
    model = Blip2Stage1(tiny_config(qformer=dict(num_hidden_layers=2))).train()
    img, ids, mask = make_batch(3, 6)
    step = torch.compile(lambda a, b, c: model(a, b, c).loss, fullgraph=True, backend="aot_eager")
    loss = step(img, ids, mask)
    loss.backward()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# checkpoints


def _lavis_checkpoint(cfg):
    """A LAVIS-named state dict with the keys a LAVIS stage-1 checkpoint has (built by hand here, not by blipfast)."""
    q = cfg.qformer
    d, v, ew, e = q.hidden_size, q.vocab_size, q.encoder_hidden_size, cfg.embed_dim
    sd = {"query_tokens": torch.randn(1, cfg.num_query_tokens, d), "temp": torch.tensor(0.07),
          "ln_vision.weight": torch.randn(ew), "ln_vision.bias": torch.randn(ew),
          "vision_proj.weight": torch.randn(e, d), "vision_proj.bias": torch.randn(e),
          "text_proj.weight": torch.randn(e, d), "text_proj.bias": torch.randn(e),
          "itm_head.weight": torch.randn(2, d), "itm_head.bias": torch.randn(2)}
    pre = "Qformer.bert."
    sd[pre + "embeddings.word_embeddings.weight"] = torch.randn(v, d)
    sd[pre + "embeddings.position_embeddings.weight"] = torch.randn(q.max_position_embeddings, d)
    sd[pre + "embeddings.LayerNorm.weight"], sd[pre + "embeddings.LayerNorm.bias"] = torch.randn(d), torch.randn(d)
    for i in range(q.num_hidden_layers):
        lp = f"{pre}encoder.layer.{i}."
        atts = ["attention"] + (["crossattention"] if i % q.cross_attention_frequency == 0 else [])
        for att in atts:
            kv_in = ew if att == "crossattention" else d
            sd[f"{lp}{att}.self.query.weight"], sd[f"{lp}{att}.self.query.bias"] = torch.randn(d, d), torch.randn(d)
            for name in ("key", "value"):
                sd[f"{lp}{att}.self.{name}.weight"], sd[f"{lp}{att}.self.{name}.bias"] = torch.randn(d, kv_in), torch.randn(d)
            sd[f"{lp}{att}.output.dense.weight"], sd[f"{lp}{att}.output.dense.bias"] = torch.randn(d, d), torch.randn(d)
            sd[f"{lp}{att}.output.LayerNorm.weight"], sd[f"{lp}{att}.output.LayerNorm.bias"] = torch.randn(d), torch.randn(d)
        for sfx in ("", "_query"):
            sd[f"{lp}intermediate{sfx}.dense.weight"] = torch.randn(q.intermediate_size, d)
            sd[f"{lp}intermediate{sfx}.dense.bias"] = torch.randn(q.intermediate_size)
            sd[f"{lp}output{sfx}.dense.weight"] = torch.randn(d, q.intermediate_size)
            sd[f"{lp}output{sfx}.dense.bias"] = torch.randn(d)
            sd[f"{lp}output{sfx}.LayerNorm.weight"], sd[f"{lp}output{sfx}.LayerNorm.bias"] = torch.randn(d), torch.randn(d)
    cls = "Qformer.cls.predictions."
    sd[cls + "transform.dense.weight"], sd[cls + "transform.dense.bias"] = torch.randn(d, d), torch.randn(d)
    sd[cls + "transform.LayerNorm.weight"], sd[cls + "transform.LayerNorm.bias"] = torch.randn(d), torch.randn(d)
    sd[cls + "bias"] = torch.randn(v)
    sd[cls + "decoder.weight"] = sd[pre + "embeddings.word_embeddings.weight"].clone()  # tied in LAVIS
    sd[cls + "decoder.bias"] = sd[cls + "bias"].clone()
    return sd


def test_lavis_checkpoint_round_trips_bit_identical(tmp_path):
    cfg = tiny_config()
    sd = _lavis_checkpoint(cfg)
    path = tmp_path / "stage1.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    for src in (path, {"model": sd}, sd):
        model = Blip2Stage1.from_lavis(src, cfg)
        back = model.to_lavis_state_dict()
        assert set(back) == set(sd)
        for k in sd:
            assert torch.equal(back[k], sd[k]), k
    # the buffers and the frozen ViT of a real LAVIS checkpoint are not part of stage 1: ignored
    extra = dict(sd, **{"Qformer.bert.embeddings.position_ids": torch.arange(40)[None],
                        "visual_encoder.blocks.0.norm1.weight": torch.randn(40)})
    Blip2Stage1.from_lavis(extra, cfg)


def test_lavis_checkpoint_errors_name_the_keys():
    cfg = tiny_config()
    sd = _lavis_checkpoint(cfg)
    with pytest.raises(ValueError, match="Qformer.bert.encoder.layer.1.output.dense.weight"):
        Blip2Stage1.from_lavis({k: v for k, v in sd.items() if k != "Qformer.bert.encoder.layer.1.output.dense.weight"}, cfg)
    with pytest.raises(ValueError, match="opt_projection_typo"):
        Blip2Stage1.from_lavis(dict(sd, opt_projection_typo=torch.zeros(1)), cfg)
    with pytest.raises(ValueError, match="shape"):
        Blip2Stage1.from_lavis(sd, tiny_config(embed_dim=8) if False else Blip2Stage1Config(
            qformer=dict(cfg.qformer.to_dict(), intermediate_size=64), num_query_tokens=6, embed_dim=16, bos_token_id=119))
    bad = dict(sd)
    bad["Qformer.cls.predictions.decoder.weight"] = torch.randn_like(bad["Qformer.cls.predictions.decoder.weight"])
    with pytest.raises(ValueError, match="tied"):
        Blip2Stage1.from_lavis(bad, cfg)


def test_from_hf_retrieval_model():
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    qc = dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=2, encoder_hidden_size=32,
              vocab_size=120, use_qformer_text_input=True)
    hf = Blip2ForImageTextRetrieval(Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16), qformer_config=qc, num_query_tokens=5,
        image_text_hidden_size=16)).eval()
    model = Blip2Stage1.from_hf(hf, Blip2Stage1Config(qformer=qc, num_query_tokens=5, embed_dim=16, bos_token_id=119,
                                                      ln_vision_eps=hf.config.vision_config.layer_norm_eps))
    assert torch.equal(model.ln_vision.weight, hf.vision_model.post_layernorm.weight)
    assert torch.equal(model.query_tokens, hf.query_tokens)
    for k, v in hf.qformer.state_dict().items():
        assert torch.equal(model.qformer.state_dict()[k], v), k
    # the retrieval model's ITM score equals the stage-1 model's pieces over pre-post_layernorm features
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 119, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        itm = hf(pixels, ids, mask, use_image_text_matching_head=True).logits_per_image
        pre = hf.vision_model(pixels, output_hidden_states=True).hidden_states[-1]
        ones = torch.ones(2, 5, dtype=torch.long)
        out = model.qformer(model.query_embeds(ids, 2), query_length=5, attention_mask=torch.cat([ones, mask], 1),
                            encoder_kv=model.image_kv(pre), query_output_only=True)
        torch.testing.assert_close(model.itm_logits(out.last_hidden_state), itm, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# validation


def test_config_defaults_and_errors():
    cfg = Blip2Stage1Config()
    assert cfg.qformer.vocab_size == 30523 and cfg.qformer.use_qformer_text_input and cfg.num_query_tokens == 32
    assert Blip2Stage1Config(**cfg.to_dict()) == cfg
    assert Blip2Stage1Config(qformer=QFormerConfig(use_qformer_text_input=False, vocab_size=30523)).qformer.use_qformer_text_input
    with pytest.raises(ValueError, match="bos_token_id"):
        Blip2Stage1Config(qformer=dict(vocab_size=100))
    with pytest.raises(ValueError, match="num_query_tokens"):
        Blip2Stage1Config(num_query_tokens=0)
    with pytest.raises(ValueError, match="itc_label_smoothing"):
        Blip2Stage1Config(itc_label_smoothing=1.5)
    with pytest.raises(TypeError, match="qformer"):
        Blip2Stage1Config(qformer=3)


def test_forward_validates_its_arguments():
    model = Blip2Stage1(tiny_config()).eval()
    img, ids, mask = make_batch(2, 5)
    with pytest.raises(ValueError, match="image_embeds"):
        model(img[..., :-1], ids, mask)
    with pytest.raises(ValueError, match="input_ids"):
        model(img, ids[:1], mask)
    with pytest.raises(ValueError, match="input_ids"):
        model(img, ids.float(), mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model(img, ids, mask[:, :3])
    with pytest.raises(TypeError, match="attention_mask"):
        model(img, ids, mask.to(torch.complex64))
    with pytest.raises(ValueError, match="image_ids"):
        model(img, ids, mask, image_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="negatives"):
        model(img, ids, mask, negatives=(torch.tensor([1, 0]),))
    with pytest.raises(ValueError, match="input_ids"):
        model(img, torch.ones(2, 41, dtype=torch.long), torch.ones(2, 41))


# ----------------------------------------------------------------------------------------------
# on a GPU: the fused kernels, bf16 autocast, torch.compile and CUDA-graph capture of the whole training step


@pytest.mark.gpu
def test_parity_on_gpu_kernels():
    """fp32 on CUDA (Triton attention/ITC, CUDA epilogue/sampler) vs the float64 baseline, the fp32 baseline's
    error as yardstick."""
    img, ids, mask, fast, base, which = _case("padded")
    model = Blip2Stage1(tiny_config()).eval()
    cuda = [t.cuda() for t in (img, ids, mask)]
    kw_neg = (torch.tensor(CASES["padded"][4][0]).cuda(), torch.tensor(CASES["padded"][4][1]).cuda())
    fo, fg = _run(model.cuda(), lambda m, x, i, mk: m(x, i, mk, negatives=kw_neg), torch.float32, *cuda)
    model = model.cpu()
    lo, lg = _run(model, base, torch.float32, img, ids, mask)
    ro, rg = _run(model, base, F64, img, ids, mask)
    for k in LOSSES:
        assert_within_torch_error(fo[k].cpu().reshape(1), ro[k].reshape(1), lo[k].reshape(1), dtype=torch.float32,
                                  name=k)
    _check_gradients(fg, rg, lg, model.temp)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_step_within_the_baselines_autocast_error(device, dtype):
    """Autocast as LAVIS trains (fp16 on CUDA; bf16 too) vs the float64 baseline on the CPU, yardstick the baseline's
    own error under the same autocast on the same device: each loss, and the gradients as _check_gradients holds
    them. On the CPU (the torch backends) it holds the ops to their accumulation dtype under autocast and the
    recomputing LM loss to the forward's GEMM dtype in its backward."""
    img, ids, mask, _, base, _ = _case("padded")
    neg = tuple(torch.tensor(t, device=device) for t in CASES["padded"][4])
    model = Blip2Stage1(tiny_config()).eval()
    dev = [t.to(device) for t in (img, ids, mask)]
    fo, fg = _run(model.to(device), autocast(lambda m, x, i, mk: m(x, i, mk, negatives=neg), device, dtype),
                  torch.float32, *dev)
    lo, lg = _run(model, autocast(lambda m, x, i, mk: lavis_stage1_forward(m, x, i, mk, negatives=neg), device, dtype),
                  torch.float32, *dev)
    model = model.cpu()
    ro, rg = _run(model, lambda m, x, i, mk: lavis_stage1_forward(m, x, i, mk, negatives=tuple(t.cpu() for t in neg)),
                  F64, img, ids, mask)
    for k in LOSSES:
        assert_within_torch_error(fo[k].float().cpu().reshape(1), ro[k].reshape(1), lo[k].float().cpu().reshape(1),
                                  dtype=dtype, name=k)
    _check_gradients(fg, rg, lg, model.temp, dtype)


@pytest.mark.gpu
def test_compiled_step_on_cuda_never_syncs():
    model = Blip2Stage1(tiny_config()).cuda().train()
    img, ids, mask = (t.cuda() for t in make_batch(4, 7, pad_rows=(1,)))
    step = torch.compile(lambda a, b, c: model(a, b, c).loss, fullgraph=True)
    step(img, ids, mask).backward()  # compile and tune outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(img, ids, mask)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@pytest.mark.gpu
def test_training_step_captures_in_a_cuda_graph():
    """Forward, backward and AdamW of a stage-1 step in one torch.cuda.CUDAGraph (static inputs; sampling and
    dropout draw fresh seeds from the graph-safe CUDA generator at every replay), against eager steps from the
    state the first replay starts from: the model after the warm-up steps, AdamW's state and the generators' states
    (so every eager step draws the sampling and dropout seeds its replay drew). Every step's loss and every
    parameter after the last AdamW update agree within same-precision rounding (assert_close): the step's kernels
    are deterministic at this size (ITC's d text_feats takes fp32 atomics only when the gathered batch spans several
    column tiles), while a replay that reused the captured seeds, skipped the optimizer or read stale buffers is off
    by far more."""
    torch.manual_seed(0)
    model = Blip2Stage1(tiny_config()).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    img, ids, mask = (t.cuda() for t in make_batch(8, 7, pad_rows=(1, 5)))

    def train_step(m, o):
        o.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(img, ids, mask).loss
        loss.backward()
        o.step()
        return loss.detach()

    start = {}

    def snapshot():  # after the warm-up and the capture (which runs nothing): where the first replay starts
        start["model"], start["opt"] = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
        start["rng"] = torch.get_rng_state(), torch.cuda.get_rng_state()

    losses = replay_captured_step(lambda: train_step(model, opt), 20, on_captured=snapshot)
    assert torch.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean(), losses  # it trains on the fixed batch

    eager = start["model"]
    eager_opt = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)
    eager_opt.load_state_dict(start["opt"])
    torch.set_rng_state(start["rng"][0])
    torch.cuda.set_rng_state(start["rng"][1])
    eager_losses = torch.stack([train_step(eager, eager_opt) for _ in range(len(losses))])
    assert_close(losses, eager_losses, name="loss of each replay vs the eager step")
    params = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p, params[name], name=f"{name} after {len(losses)} steps")
