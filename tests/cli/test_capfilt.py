"""``blipfast capfilt`` end to end on a CPU: tiny random HF BLIP captioner and ITM filter saved by the test
(blipfast/testing/blip.py), PNG images the test writes, list captions, a repeated image, a missing and a corrupt image.

Checked: the rows and the keep rule, determinism under a seed, the synthetic captions and ITM scores against the
unswapped HF models (HF's own ``generate`` with the same seed, HF's ITM head on [ENC]-first texts), resume after an
interrupted run (a cut-off line in the log, a row missing from the output) giving the uninterrupted output, the
same output from Salesforce ``.pth`` twins of the models, a ``blipfast train --model blip`` run as both models, and
clear errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast.capfilt import CapFilt, load_blip, side_paths
from blipfast.cli import main
from blipfast.data.annotations import pre_caption, read_annotations
from blipfast.testing.blip import write_demo
from tests.helpers.runtime import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_demo(str(tmp_path_factory.mktemp("capfilt")))


def _run(tiny, out, *extra, captioner=None, filt=None):
    return main(["capfilt", "--data", tiny["data"], "--images", tiny["images"], "--captioner",
                 captioner or tiny["captioner"], "--filter", filt or tiny["filter"], "--out", str(out), "--batch-size",
                 "3", "--no-progress", "--device", "cpu", *extra])


def _read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_end_to_end_deterministic(tiny, tmp_path, capsys):
    a, b = tmp_path / "a" / "out.jsonl", tmp_path / "b" / "out.jsonl"
    assert _run(tiny, a) == 0
    err = capsys.readouterr()
    assert "corrupt.png" in err.err and "missing.png" in err.err and "7 images (1 unreadable" in err.out
    assert _run(tiny, b) == 0
    assert a.read_text() == b.read_text()
    log_a, log_b = (side_paths(str(p))[0] for p in (a, b))
    assert open(log_a).read() == open(log_b).read()
    rows, log = _read(a), _read(log_a)
    images = {r["image"] for r in log}
    assert len(images) == 7 and "img/corrupt.png" not in images and "img/missing.png" not in images
    for r in log:  # every web caption of the image (both rows of img/0000.png merged) and one synthetic text
        web = [t["caption"] for t in r["texts"] if t["source"] == "web"]
        assert [t["source"] for t in r["texts"]].count("synthetic") == 1 and len(web) == (3 if r["image"] ==
                                                                                          "img/0000.png" else
                                                                                          2 if int(r["image"][4:8]) % 2 == 0
                                                                                          else 1)
        for t in r["texts"]:
            assert 0.0 <= t["itm"] <= 1.0 and t["keep"] == (t["itm"] >= 0.5)
    kept = [{"image": r["image"], "caption": t["caption"], "source": t["source"], "itm": t["itm"]}
            for r in log for t in r["texts"] if t["keep"]]
    assert rows == kept and set(rows[0]) == {"image", "caption", "source", "itm"}
    assert any(not t["keep"] for r in log for t in r["texts"]), "the tiny filter should remove something"
    summary = json.load(open(side_paths(str(a))[1]))
    n = {s: sum(t["source"] == s and t["keep"] for r in log for t in r["texts"]) for s in ("web", "synthetic")}
    assert summary["images"] == 7 and summary["unreadable"] == ["img/corrupt.png"]
    assert summary["web"]["kept"] == n["web"] and summary["synthetic"]["kept"] == n["synthetic"]
    # the output is a training annotation file for the same image folder
    ann = read_annotations(str(a), tiny["images"])
    assert len(ann) == len(rows) and not ann.bad
    # another seed samples other captions; a higher threshold keeps fewer texts
    c = tmp_path / "c" / "out.jsonl"
    assert _run(tiny, c, "--seed", "1", "--threshold", "0.9") == 0
    log_c = _read(side_paths(str(c))[0])
    syn = lambda lg: [t["caption"] for r in lg for t in r["texts"] if t["source"] == "synthetic"]  # noqa: E731
    assert syn(log_c) != syn(log) and len(_read(c)) < len(rows)


def test_captions_and_scores_equal_the_hf_models(tiny, tmp_path):
    """The synthetic captions are HF BlipForConditionalGeneration.generate's own samples (same seed, prompt,
    nucleus, repetition penalty), the scores HF BlipForImageTextRetrieval's ITM head on [ENC]-first texts."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from blipfast.data.vision import load_image

    out = tmp_path / "out.jsonl"
    assert _run(tiny, out) == 0
    log = _read(side_paths(str(out))[0])
    cap = BlipForConditionalGeneration.from_pretrained(tiny["captioner"]).eval()
    filt = BlipForImageTextRetrieval.from_pretrained(tiny["filter"]).eval()
    part = load_blip(tiny["filter"], "filter", device="cpu")
    tok, proc = part.tokenizer, part.processor
    first = log[:3]  # the first batch (seed 0 * 1000003 + 0)
    px = proc(images=[load_image(os.path.join(tiny["images"], r["image"])) for r in first],
              return_tensors="pt")["pixel_values"]
    prompt = tok(["a picture of "] * 3, return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    ids = cap.generate(pixel_values=px, input_ids=prompt, do_sample=True, top_p=0.9, repetition_penalty=1.1,
                       max_length=20, min_length=5, num_beams=1)
    hf_caps = [t[len("a picture of "):].strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    ours = [t["caption"] for r in first for t in r["texts"] if t["source"] == "synthetic"]
    assert ours == hf_caps
    enc_id = tok.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        for i, r in enumerate(first):
            texts = [t["caption"] for t in r["texts"]]
            enc = tok([pre_caption(t, 30) for t in texts], padding="longest", truncation=True, max_length=35,
                      return_tensors="pt")
            x = enc["input_ids"].clone()
            x[:, 0] = enc_id
            logits = filt(input_ids=x, attention_mask=enc["attention_mask"], pixel_values=px[i:i + 1].expand(
                len(texts), -1, -1, -1), use_itm_head=True).itm_score
            p = logits.softmax(-1)[:, 1]
            torch.testing.assert_close(torch.tensor([t["itm"] for t in r["texts"]]), p, rtol=0, atol=2e-6)


def test_resume_after_an_interrupted_run_gives_the_same_output(tiny, tmp_path, capsys):
    full, part = tmp_path / "full" / "out.jsonl", tmp_path / "part" / "out.jsonl"
    assert _run(tiny, full) == 0
    assert _run(tiny, part, "--max-images", "3") == 0
    assert "images left" in capsys.readouterr().out
    log = side_paths(str(part))[0]
    assert len(_read(log)) == 3
    # a crash while writing: a cut-off line in the log, the batch's last row missing from the output
    with open(log, "a") as fh:
        fh.write('{"image": "img/0003.png", "texts": [{"capt')
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-1]))
    assert _run(tiny, part) == 0
    assert part.read_text() == full.read_text()
    assert open(log).read() == open(side_paths(str(full))[0]).read()
    s_full, s_part = (json.load(open(side_paths(str(p))[1])) for p in (full, part))
    assert {k: v for k, v in s_part.items() if k != "unreadable"} == {k: v for k, v in s_full.items()
                                                                       if k != "unreadable"}
    assert _run(tiny, part) == 0  # nothing left to do: unchanged
    assert part.read_text() == full.read_text()


def test_salesforce_checkpoints_give_the_same_output(tiny, tmp_path, capsys):
    hf, pth = tmp_path / "hf.jsonl", tmp_path / "pth.jsonl"
    assert _run(tiny, hf) == 0
    assert _run(tiny, pth, "--tokenizer", tiny["tokenizer"], captioner=tiny["captioner_pth"],
                filt=tiny["filter_pth"]) == 0
    assert pth.read_text() == hf.read_text()
    capsys.readouterr()
    assert _run(tiny, tmp_path / "x.jsonl", captioner=tiny["captioner_pth"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert _run(tiny, tmp_path / "x.jsonl", "--tokenizer", tiny["tokenizer"], captioner=tiny["filter_pth"]) == 2
    assert "not a captioning" in capsys.readouterr().err
    assert _run(tiny, tmp_path / "x.jsonl", captioner=str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_blip_training_run_captions_and_filters(tiny, tmp_path, capsys):
    from blipfast.testing.data import write_images, write_jsonl
    from tests.helpers.train import TINY_BLIP, tiny_args, write_blip_vision

    root = str(tmp_path / "train")
    data = write_jsonl(os.path.join(root, "ann.jsonl"), write_images(root, 8, seed=2))
    vit = write_blip_vision(os.path.join(root, "vit"))
    run = os.path.join(root, "run")
    assert main(tiny_args(run, data, root, vit, steps=2, model=TINY_BLIP, extra=("--max-txt-len", "10"))) == 0
    cap, filt = load_blip(run, "captioner"), load_blip(run, "filter")
    pipe = CapFilt(cap, filt, max_length=12)
    assert pipe.shared_vit and filt.model.vision_model is cap.model.vision_model
    out = tmp_path / "out.jsonl"
    assert _run(tiny, out, captioner=run, filt=run) == 2  # the run's text model has 16 positions
    assert "--max-length 20 exceeds" in capsys.readouterr().err
    assert _run(tiny, out, "--max-length", "12", captioner=run, filt=run) == 0
    assert len(_read(side_paths(str(out))[0])) == 7
    # a BLIP-2 run is refused with the reason
    bogus = tmp_path / "blip2run"
    (bogus / "checkpoint-00000001").mkdir(parents=True)
    (bogus / "checkpoint-00000001" / "state.pt").write_bytes(b"")
    (bogus / "config.yaml").write_text("model: {num_query_tokens: 4}\ntokenizer: x\n")
    capsys.readouterr()
    assert _run(tiny, tmp_path / "y.jsonl", captioner=str(bogus)) == 2
    assert "BLIP-2 run" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_capfilt_on_cuda(tiny, tmp_path, dtype):
    """On CUDA (the Triton/CUDA kernels): every image processed, and in fp32 the ITM scores of the texts equal the CPU
    run's for the same texts (the captions themselves come from CUDA's sampler)."""
    gpu = tmp_path / "gpu.jsonl"
    assert main(["capfilt", "--data", tiny["data"], "--images", tiny["images"], "--captioner", tiny["captioner"],
                 "--filter", tiny["filter"], "--out", str(gpu), "--batch-size", "3", "--no-progress", "--device",
                 "cuda", "--dtype", dtype]) == 0
    log = _read(side_paths(str(gpu))[0])
    assert len(log) == 7
    if dtype == "fp32":
        cpu = tmp_path / "cpu.jsonl"
        assert _run(tiny, cpu) == 0
        web = lambda lg: [t["itm"] for r in lg for t in r["texts"] if t["source"] == "web"]  # noqa: E731
        torch.testing.assert_close(torch.tensor(web(log)), torch.tensor(web(_read(side_paths(str(cpu))[0]))),
                                   rtol=0, atol=1e-4)
