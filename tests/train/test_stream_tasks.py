"""Every task's ``tokenize`` on one batch of captions at a time (what a stream's loader workers call) gives the rows
that tokenising all captions at once gives, at the same fixed widths; stage 2 trains from shards with its
tokenize in forked loader workers (the keys its step reads are set in ``build``, not by ``tokenize``)."""
from __future__ import annotations

import os
import random

import pytest
import torch

from blipfast.cli import main
from blipfast.testing import blip2 as T
from blipfast.train.tasks import task_class, task_names
from tests.helpers.train import read_log

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("webdataset")


def _captions(words, n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 14))) for _ in range(n)]


def _check_batches(tokenize, captions):
    whole = tokenize(captions)
    for lo, hi in ((0, 3), (3, 4), (4, len(captions))):
        part = tokenize(captions[lo:hi])
        assert part.keys() == whole.keys()
        for k in whole:
            assert part[k].shape[1:] == whole[k].shape[1:], k  # fixed widths, whatever the batch
            assert torch.equal(part[k], whole[k][lo:hi]), k


def _bert_tokenizing(name: str) -> bool:
    """A streaming task with a BERT-style tokenizer (the stage-2 family tokenises with the LLM's: tested below)."""
    return task_class(name).streams and not issubclass(task_class(name), task_class("blip2-stage2"))


@pytest.mark.parametrize("name", [n for n in task_names() if _bert_tokenizing(n)])
def test_bert_tokenizing_tasks_tokenize_a_batch_as_all_captions(name, tmp_path):
    from blipfast.data import train_wordpiece

    captions = _captions(T.WORDS, 11)
    tok = train_wordpiece(captions, 64)
    cls = task_class(name)
    task = cls({"image_ids": True})
    cfg = {"max_txt_len": 9, "prompt": cls.defaults.get("prompt", "")}  # blip-caption: its prompt before each
    _check_batches(lambda caps: task.tokenize(None, tok, caps, cfg), captions)


def test_tasks_of_other_data_formats_refuse_streams(tmp_path):
    """VQA question lists and NLVR2 image pairs are annotation files, and blip2-retrieval and blip2-vqa train their
    ViT on an annotation file's images (their stream path is not wired yet): shards are refused with the reason."""
    refused = [n for n in task_names() if not task_class(n).streams]
    assert set(refused) == {"blip-vqa", "blip-nlvr", "blip2-retrieval", "blip2-vqa"}
    spec = str(tmp_path / "{00000..00001}.tar")
    for name in refused:
        with pytest.raises(ValueError, match="not from WebDataset shards or feature shards"):
            task_class(name).check_stream_options({"data": spec, "features": None, "tokenizer": None})


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_tokenizes_a_batch_as_all_captions(kind):
    from blipfast.models.blip2_stage2 import Blip2Stage2

    model = Blip2Stage2(T.blip2(kind))
    tok = T.tokenizer(kind)
    task = task_class("blip2-stage2")({"image_ids": True, "llm": None})
    for prompt in ("", "a photo of"):
        cfg = {"max_txt_len": 10, "prompt": prompt, "text_suffix": None}
        _check_batches(lambda caps: task.tokenize(model, tok, caps, cfg), _captions(T.WORDS, 11, seed=1))


def test_stage2_trains_from_shards_with_loader_workers(tmp_path):
    from blipfast.testing.shards import write_shards
    from tests.helpers.stage2 import stage2_args, write_lavis_stage1, write_llm
    from blipfast.testing.data import write_vision

    # the shard captions' words ("a small red circle at the top left on a white background"): the LLM knows them
    words = sorted({"a", "small", "large", "at", "the", "top", "bottom", "left", "right", "on", "in", "center",
                    "background", "circle", "square", "triangle", "cross", "red", "green", "blue", "yellow", "purple",
                    "orange", "white", "black", "gray"})
    import tests.helpers.stage2 as H

    old = H.WORDS
    H.WORDS = words
    try:
        llm = write_llm(tmp_path / "opt", "opt")
    finally:
        H.WORDS = old
    write_shards(str(tmp_path / "shards"), 2, 6)
    out = str(tmp_path / "run")
    args = stage2_args(out, llm, write_lavis_stage1(tmp_path / "s1.pth"), str(tmp_path / "shards"),
                       vision=write_vision(str(tmp_path / "vit")), steps=3,
                       extra=("--num-workers", "2", "--prompt", "a photo of"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0  # stage 2's tokenizer is the LLM's: no --tokenizer needed
    finally:
        torch.set_num_threads(n)
    rows = read_log(out)
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["bad_samples"] == 0 for r in rows)
    assert os.path.isdir(os.path.join(out, "checkpoint-00000003"))
