"""BLIP VQA rank inference: blipfast's :class:`~blipfast.BlipVQA` against Salesforce BLIP's ``BLIP_VQA.forward(
inference='rank')`` restated in PyTorch (blipfast/bench/blip_vqa_baseline.py: the question states tiled k times and
projected to K/V in every decoder layer for every candidate, every candidate position through the decoder and the
LM head, a loop over the questions, the boolean index of ``rank_answer``). Same weights on both sides; the ViT is
HF's ``BlipVisionModel`` with SDPA attention in blipfast and BLIP's timm ViT restated in the baseline.

Counted on every device (``counted_report``: Q = 32 questions, BLIP's ``batch_size_test``; 480 px ViT-B/16,
BERT-base MED, k = 128 candidates of 3,128 answers padded to 8 tokens, questions of 20 tokens, fp32, on meta tensors
with the GPU's dispatch, see blipfast/bench/counting.py): FLOPs, operators, host syncs of one inference
(``torch.no_grad``: nothing is saved for a backward).

Timed on CUDA (``cases``): questions/s of the same inference, bf16, against the restated BLIP inference.
"""
from __future__ import annotations

import contextlib

import torch

from .common import Case
from .counting import Cost, count_step, counting_gpu_path, format_cost_table

BASELINE = "BLIP rank inference (eager, SDPA)"
OURS = "blipfast BlipVQA.rank_answers"
GROUP = "blip_vqa rank"
SHAPE = dict(questions=32, k=128, answers=3128, answer_len=8, question_len=20)


def _inputs(config, questions, answers, answer_len, question_len, device=None, generator=None):
    from ..models.blip_vqa import BlipVQAConfig

    cfg = BlipVQAConfig.of(config)
    v = cfg.text.vocab_size
    s = cfg.vision.image_size
    px = torch.randn(questions, 3, s, s, device=device, generator=generator)
    q = torch.randint(1000, min(v, 30000), (questions, question_len), device=device, generator=generator)
    qm = torch.ones(questions, question_len, dtype=torch.long, device=device)
    a = torch.randint(1000, min(v, 30000), (answers, answer_len), device=device, generator=generator)
    am = torch.ones(answers, answer_len, dtype=torch.long, device=device)
    return px, q, qm, a, am


@contextlib.contextmanager
def _meta_boolean_index():
    """BLIP's ``topk_ids[max_topk_ids >= 0, max_topk_ids]`` on meta tensors: the mask is all true (an argmax is
    never negative), which is what the meta ``nonzero`` may then assume; the sync is counted all the same (the
    restatement writes the ``nonzero`` out)."""
    import torch.fx.experimental._config as fx_config

    old = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        yield
    finally:
        fx_config.meta_nonzero_assume_all_nonzero = old


def counted(questions: int = SHAPE["questions"], k: int = SHAPE["k"], answers: int = SHAPE["answers"],
            answer_len: int = SHAPE["answer_len"], question_len: int = SHAPE["question_len"],
            config=None) -> list[tuple[str, Cost]]:
    """[(name, Cost)] of one rank inference (ViT, question encoder, rank_answer) of the baseline and of blipfast,
    counted on meta tensors with the dispatch of a CUDA device (float32, eval)."""
    from ..models.blip_vqa import BlipVQA
    from .blip_vqa_baseline import blip_vqa_rank

    with torch.device("meta"):
        model = BlipVQA(config).eval()
        px, q, qm, a, am = _inputs(model.config, questions, answers, answer_len, question_len)
    keep = list(model.parameters()) + list(model.buffers()) + [px, q, qm, a, am]

    @torch.no_grad()
    def ours():
        states = model.question_states(model.image_embeds(px), q, qm)
        return model.rank_answers(states, qm, a, am, k)[0]

    @torch.no_grad()
    def base():
        return blip_vqa_rank(model, px, q, qm, a, am, k)[0]

    with counting_gpu_path(), _meta_boolean_index():
        return [(BASELINE, count_step(base, exclude=keep)), (OURS, count_step(ours, exclude=keep))]


def counted_report() -> tuple[str, dict]:
    rows = counted()
    ratio = rows[1][1].ratio(rows[0][1])
    payload = {**SHAPE, "image_size": 480, "dtype": "float32", "counted_on": "meta, GPU dispatch",
               "rows": {n: c.as_dict() for n, c in rows}, "ratio": ratio}
    s = SHAPE
    head = (f"BLIP VQA rank inference, counted (Q = {s['questions']}, k = {s['k']} of {s['answers']} answers of "
            f"{s['answer_len']} tokens, questions of {s['question_len']}, ViT-B/16 480 px, BERT-base MED, fp32)")
    return head + "\n" + format_cost_table(rows, BASELINE), payload


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False) -> list[Case]:
    """Timed cases (CUDA only): questions/s of the rank inference."""
    if device.type != "cuda":
        return []
    from ..models.blip_vqa import BlipVQA
    from .blip_vqa_baseline import blip_vqa_rank

    qn = 8 if quick else SHAPE["questions"]
    model = BlipVQA().to(device).eval()
    gen = torch.Generator(device).manual_seed(0)
    px, q, qm, a, am = _inputs(model.config, qn, SHAPE["answers"], SHAPE["answer_len"], SHAPE["question_len"],
                               device, gen)
    amp = torch.autocast("cuda", dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else contextlib.nullcontext()
    k = SHAPE["k"]
    flops = {name: c.flops for name, c in counted(qn)}

    @torch.no_grad()
    def ours():
        with amp:
            return model.rank_answers(model.question_states(model.image_embeds(px), q, qm), qm, a, am, k)[0]

    @torch.no_grad()
    def base():
        with amp:
            return blip_vqa_rank(model, px, q, qm, a, am, k)[0]

    params = dict(questions=qn, k=k, answers=SHAPE["answers"], image_size=480, dtype=str(dtype).replace("torch.", ""))
    g = f"{GROUP} Q={qn}"
    return [Case(g, BASELINE, base, flops=flops[BASELINE], baseline=True, params=params),
            Case(g, "blipfast", ours, flops=flops[OURS], params=params)]


def images_per_s(results) -> str:
    """Questions per second of the timed rank inference."""
    lines = []
    for r in results:
        if not r.group.startswith(GROUP) or r.ms is None:
            continue
        qps = r.params.get("questions", 0) / (r.ms / 1e3)
        lines.append(f"  {r.group:<24} {r.name:<36} {qps:9.1f} questions/s  peak {r.peak_mem_mb or 0:8.0f} MB")
    return "\n".join(lines)
