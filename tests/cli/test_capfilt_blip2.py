"""``blipfast capfilt --mode blip2`` (BLIP-2's caption bootstrapping) end to end on a CPU: the tiny random BLIP
captioner and CLIP ranker of blipfast/testing/blip.py, PNG images, list captions, a missing and a corrupt image.

Checked: the samples are HF ``BlipForConditionalGeneration.generate``'s own (``num_return_sequences``, same seed),
the kept set is the top ``--keep`` of an independent ranking (transformers' ``CLIPModel.get_image_features`` /
``get_text_features`` cosines, computed here), resume after an interrupted run writes what an uninterrupted one
writes, and bad options are refused naming the flag."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast.capfilt import load_blip, side_paths
from blipfast.capfilt_blip2 import Bootstrap, load_ranker
from blipfast.cli import main
from blipfast.data.annotations import read_annotations
from blipfast.options import EXIT_OK, EXIT_USAGE
from blipfast.testing.blip import write_demo

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)

NUM = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_demo(str(tmp_path_factory.mktemp("capfilt_blip2")))


@pytest.fixture(scope="module")
def full(tiny, tmp_path_factory):
    """An uninterrupted run's output path."""
    out = tmp_path_factory.mktemp("full") / "out.jsonl"
    assert _run(tiny, out) == EXIT_OK
    return out


def _run(tiny, out, *extra, mode=("--mode", "blip2", "--ranker")):
    args = ["capfilt", *mode, tiny["ranker"], "--data", tiny["data"], "--images", tiny["images"], "--captioner",
            tiny["captioner"], "--out", str(out), "--num-captions", str(NUM), "--batch-size", "3", "--no-progress",
            "--device", "cpu", *extra]
    return main(args)


def _read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_kept_texts_are_the_top_of_an_independent_clip_ranking(tiny, full):
    from transformers import AutoTokenizer, BlipForConditionalGeneration, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from blipfast.data.vision import load_image

    log = _read(side_paths(str(full))[0])
    assert len(log) == 7 and "img/corrupt.png" not in {r["image"] for r in log}
    clip = CLIPModel.from_pretrained(tiny["ranker"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["ranker"])
    proc = CLIPImageProcessorPil.from_pretrained(tiny["ranker"])
    web = {}
    for r in map(json.loads, open(tiny["data"])):
        web.setdefault(r["image"], []).extend(r["caption"] if isinstance(r["caption"], list) else [r["caption"]])
    kept = []
    with torch.no_grad():
        for r in log:
            texts = [t["caption"] for t in r["texts"]]
            assert [t["source"] for t in r["texts"]] == ["web"] * len(web[r["image"]]) + ["synthetic"] * NUM
            assert texts[:len(web[r["image"]])] == web[r["image"]]
            px = proc(images=[load_image(os.path.join(tiny["images"], r["image"]))], return_tensors="pt")
            enc = tok(texts, padding=True, return_tensors="pt")
            img = clip.get_image_features(pixel_values=px["pixel_values"]).pooler_output
            txt = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
            cos = torch.nn.functional.normalize(txt, dim=-1) @ torch.nn.functional.normalize(img, dim=-1)[0]
            torch.testing.assert_close(torch.tensor([t["clip"] for t in r["texts"]]), cos, rtol=0, atol=2e-6)
            top = set(cos.argsort(descending=True)[:2].tolist())
            assert {j for j, t in enumerate(r["texts"]) if t["keep"]} == top, r["image"]
            assert sorted(t["rank"] for t in r["texts"]) == list(range(len(texts)))
            kept += [{"image": r["image"], **{k: v for k, v in r["texts"][j].items() if k != "keep"}}
                     for j in range(len(texts)) if j in top]
    assert _read(full) == kept
    # the samples are HF generate's own: the first batch (seed 0 * 1000003 + 0), NUM per image
    cap = BlipForConditionalGeneration.from_pretrained(tiny["captioner"]).eval()
    part = load_blip(tiny["captioner"], "captioner", device="cpu")
    first = log[:3]
    bpx = part.processor(images=[load_image(os.path.join(tiny["images"], r["image"])) for r in first],
                         return_tensors="pt")["pixel_values"]
    prompt = part.tokenizer(["a picture of "] * 3, return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    ids = cap.generate(pixel_values=bpx, input_ids=prompt, do_sample=True, top_p=0.9, repetition_penalty=1.1,
                       max_length=20, min_length=5, num_beams=1, num_return_sequences=NUM)
    hf = [t[len("a picture of "):].strip() for t in part.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert [t["caption"] for r in first for t in r["texts"] if t["source"] == "synthetic"] == hf
    # the output trains: several captions per image
    ann = read_annotations(str(full), tiny["images"])
    assert len(ann) == 14 and len(ann.images) == 7 and not ann.bad
    summary = json.load(open(side_paths(str(full))[1]))
    assert summary["images"] == 7 and summary["keep"] == 2 and summary["settings"]["mode"] == "blip2"
    assert summary["web"]["kept"] + summary["synthetic"]["kept"] == 14


def test_resume_after_an_interrupted_run_gives_the_same_output(tiny, full, tmp_path, capsys):
    part = tmp_path / "part" / "out.jsonl"
    assert _run(tiny, part, "--max-images", "3") == EXIT_OK
    assert "images left" in capsys.readouterr().out
    log = side_paths(str(part))[0]
    assert len(_read(log)) == 3
    with open(log, "a") as fh:  # a crash while writing: a cut-off line in the log, a row missing from OUT
        fh.write('{"image": "img/0003.png", "texts": [{"capt')
    part.write_text("".join(part.read_text().splitlines(keepends=True)[:-1]))
    assert _run(tiny, part, "--keep", "3") == EXIT_USAGE  # other settings: refused
    assert "keep: 2 -> 3" in capsys.readouterr().err
    assert _run(tiny, part) == EXIT_OK
    assert part.read_text() == full.read_text()
    assert open(log).read() == open(side_paths(str(full))[0]).read()


@pytest.mark.parametrize("extra, flag", [
    (("--keep", "0"), "--keep"), (("--num-captions", "0"), "--num-captions"), (("--keep", "5"), "--keep 5"),
    (("--threshold", "0.5"), "--threshold"), (("--filter", "x"), "--filter"), (("--top-p", "0"), "--top-p")])
def test_bad_options_name_the_flag(tiny, tmp_path, capsys, extra, flag):
    assert _run(tiny, tmp_path / "o.jsonl", *extra) == EXIT_USAGE
    assert flag in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_missing_or_misplaced_ranker(tiny, tmp_path, capsys):
    assert _run(tiny, tmp_path / "o.jsonl", mode=("--mode", "blip2", "--tokenizer")) == EXIT_USAGE
    assert "--ranker is required" in capsys.readouterr().err
    assert _run(tiny, tmp_path / "o.jsonl", "--filter", tiny["filter"], mode=("--ranker",)) == EXIT_USAGE
    assert "--ranker is an option of --mode blip2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ranker"):
        load_ranker(tiny["images"])
    cap = load_blip(tiny["captioner"], "captioner", device="cpu")
    with pytest.raises(ValueError, match="--keep"):
        Bootstrap(cap, load_ranker(tiny["ranker"]), keep=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bootstrapping_on_cuda(tiny, full, tmp_path, dtype):
    """On CUDA: every image processed, --keep texts kept per image, and in fp32 the CLIP cosines of the web texts
    equal the CPU run's (the samples themselves come from CUDA's sampler)."""
    gpu = tmp_path / "gpu.jsonl"
    assert _run(tiny, gpu, "--device", "cuda", "--dtype", dtype) == EXIT_OK
    log = _read(side_paths(str(gpu))[0])
    assert len(log) == 7 and all(sum(t["keep"] for t in r["texts"]) == 2 for r in log)
    if dtype == "fp32":
        web = lambda lg: [t["clip"] for r in lg for t in r["texts"] if t["source"] == "web"]  # noqa: E731
        torch.testing.assert_close(torch.tensor(web(log)), torch.tensor(web(_read(side_paths(str(full))[0]))),
                                   rtol=0, atol=1e-4)
