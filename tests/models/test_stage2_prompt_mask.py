"""Stage 2's prompt mask against LAVIS' batch building (``Blip2OPT.forward`` restated in tests/helpers/lavis_stage2.py)
with real subword tokenizers trained here: byte-level BPE as GPT-2 / OPT (offsets trimmed or not) and
SentencePiece-style BPE as Llama, besides the word-level one of the other tests. ``Blip2Stage2.make_text_batch``
and the ``blip2-stage2`` trainer task must give LAVIS' ids and labels: the tokens of the prompt "a photo of" get
-100, the caption's first word (with the space in front of it) keeps its label."""
from __future__ import annotations

import pytest
import torch

from blipfast.models.blip2_stage2 import Blip2Stage2, prompt_token_counts
from blipfast.testing import blip2 as T
from tests.helpers import lavis_stage2 as lavis

CAPTIONS = ["a dog on the grass", "two cats sitting on a red table near the big tree with a small dog under it",
            "grass", "a man riding a bus"]
TOKENIZERS = {"byte-level": lambda: T.bpe_tokenizer("byte-level"),
              "byte-level-untrimmed": lambda: T.bpe_tokenizer("byte-level", trim_offsets=False),
              "metaspace": lambda: T.bpe_tokenizer("metaspace"),
              "word-level": lambda: T.tokenizer("opt", T.WORDS + ["\n"])}


def _opt_stage2(vocab: int) -> Blip2Stage2:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    vision, qformer, text = T.configs("opt")
    text.vocab_size = vocab
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=T.NUM_QUERY, image_token_index=T.IMAGE)
    return Blip2Stage2(T.sharpen(Blip2ForConditionalGeneration(cfg), 1.0)).eval()


def test_the_byte_level_tokenizer_is_the_case_of_the_issue():
    """The realistic tokenizer reproduces what made the old count wrong: "a photo of " alone ends with a "Ġ" token,
    while in the full text the space joins the next word."""
    tok = T.bpe_tokenizer("byte-level")
    alone = tok.convert_ids_to_tokens(tok("a photo of ").input_ids)
    full = tok.convert_ids_to_tokens(tok("a photo of a dog\n").input_ids)
    assert alone == ["<s>", "a", "Ġphoto", "Ġof", "Ġ"]
    assert full[:5] == ["<s>", "a", "Ġphoto", "Ġof", "Ġa"]


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@pytest.mark.parametrize("max_len", [32, 9])
def test_make_text_batch_equals_lavis_opt_batch(kind, max_len):
    """ids, mask and labels equal Blip2OPT.forward's (text processor prompt "a photo of ", model prompt "a photo
    of", "\\n" appended), also where truncation cuts captions; so the loss is LAVIS' loss bit for bit."""
    tok = TOKENIZERS[kind]()
    stage2 = _opt_stage2(len(tok))
    ids, mask, targets = lavis.opt_batch(tok, CAPTIONS, max_txt_len=max_len)
    batch = stage2.make_text_batch(tok, CAPTIONS, prompts="a photo of ", suffix="\n", max_length=max_len)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert torch.equal(batch["labels"], targets)
    n_prompt = len(tok("a photo of").input_ids)
    assert (targets[:, n_prompt] != -100).all() and (targets[:, :n_prompt] == -100).all()  # the caption's first token
    feats = torch.randn(len(CAPTIONS), 5, 24)
    with torch.no_grad():
        want = stage2(image_embeds=feats, input_ids=ids, attention_mask=mask, labels=targets).loss
        assert torch.equal(stage2.loss({"image_embeds": feats, **batch}), want)


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_one_prompt_per_row_and_lavis_count_without_offsets(kind):
    """Rows with different prompts (and none) are each masked as LAVIS masks a batch of that prompt alone; a
    tokenizer without offsets (a Python tokenizer) gets LAVIS' own count, the same numbers."""
    tok = TOKENIZERS[kind]()
    stage2 = _opt_stage2(len(tok))
    prompts = ["a photo of ", "question: what is the man riding? short answer: ", "", "a black and white photo of "]
    batch = stage2.make_text_batch(tok, CAPTIONS, prompts=prompts, suffix="\n")
    width = batch["input_ids"].shape[1]
    for i, (p, c) in enumerate(zip(prompts, CAPTIONS)):
        ids, _, targets = lavis.opt_batch(tok, [c], processor_prompt=p, model_prompt=p.rstrip())
        n = ids.shape[1]
        assert torch.equal(batch["input_ids"][i, :n], ids[0]) and torch.equal(batch["labels"][i, :n], targets[0])
        assert (batch["labels"][i, n:] == -100).all() and n <= width
    full = [p + c + "\n" for p, c in zip(prompts, CAPTIONS)]
    tok.padding_side = "right"
    with_offsets = tok(full, padding="longest", return_tensors="pt", return_offsets_mapping=True)
    plain = tok(full, padding="longest", return_tensors="pt")
    counts = prompt_token_counts(tok, prompts, with_offsets)
    assert torch.equal(counts, prompt_token_counts(tok, prompts, plain))
    assert counts[2] == 0 and (counts[[0, 1, 3]] > 1).all()


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_stage2_task_tokenisation_equals_lavis(kind):
    """``blipfast train --task blip2-stage2 --prompt "a photo of" --text-suffix "\\n"``: the task adds the space
    (LAVIS' text processor prompt) and its fixed-width tensors hold LAVIS' ids and labels (padding: the pad id,
    label -100, mask 0, up to --max-txt-len)."""
    from blipfast.train.tasks.blip2_stage2 import Blip2Stage2Task

    tok = TOKENIZERS[kind]()
    stage2 = _opt_stage2(len(tok))
    cfg = {"prompt": "a photo of", "max_txt_len": 20, "text_suffix": "\n"}
    task = Blip2Stage2Task.__new__(Blip2Stage2Task)  # tokenize reads only cfg
    out = task.tokenize(stage2, tok, CAPTIONS, cfg)
    ids, mask, targets = lavis.opt_batch(tok, CAPTIONS, max_txt_len=20)
    n = ids.shape[1]
    assert out["input_ids"].shape == (len(CAPTIONS), 20)
    assert torch.equal(out["input_ids"][:, :n].long(), ids) and (out["input_ids"][:, n:] == tok.pad_token_id).all()
    assert torch.equal(out["attention_mask"][:, :n].long(), mask) and (out["attention_mask"][:, n:] == 0).all()
    assert torch.equal(out["labels"][:, :n].long(), targets) and (out["labels"][:, n:] == -100).all()
