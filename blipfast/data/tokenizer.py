"""The caption tokenizer of stage 1: a local BERT-style Hugging Face tokenizer, or one trained on the captions.

LAVIS tokenises with ``bert-base-uncased`` and adds ``[DEC]`` as the bos token (id 30522, vocabulary 30523):
the ITG decoder input starts with it. :func:`load_tokenizer` does the same with any local BERT-style tokenizer
folder. Without one, :func:`train_wordpiece` trains a WordPiece vocabulary (BERT's normaliser and
pre-tokeniser, lower case, ``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, then ``[DEC]``) on the
training captions with the ``tokenizers`` library, so that no download is ever needed; it is saved in the run
folder; the same captions always give the same vocabulary (see the note in :func:`train_wordpiece`). Either way the
Q-Former's ``vocab_size`` is ``len(tokenizer)`` and its ``bos_token_id`` the ``[DEC]`` id.
"""
from __future__ import annotations

import os

import torch

DEC = "[DEC]"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _check_bert_style(tok, where: str):
    for name in ("pad_token_id", "cls_token_id", "sep_token_id"):
        if getattr(tok, name, None) is None:
            raise ValueError(f"{where}: the tokenizer has no {name.replace('_id', '')} (stage 1 needs a BERT-style "
                             f"tokenizer: [CLS] text [SEP], padding)")
    ids = tok("a")["input_ids"]
    if not ids or ids[0] != tok.cls_token_id:
        raise ValueError(f"{where}: the tokenizer does not start a text with its [CLS] token (got ids {ids}); "
                         f"stage 1 reads the text feature at position 0")
    tok.add_special_tokens({"bos_token": DEC})  # LAVIS: tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def load_tokenizer(path: str):
    """A local BERT-style tokenizer folder with ``[DEC]`` added as bos (a no-op when it is there)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"--tokenizer: {path!r} is not a folder (a local Hugging Face tokenizer folder)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many kinds for a folder it cannot read
        raise ValueError(f"--tokenizer: cannot load a tokenizer from {path!r}: {exc}") from None
    return _check_bert_style(tok, f"--tokenizer {path}")


def add_enc_token(tok):
    """BLIP (v1)'s ``init_tokenizer``: ``[ENC]`` (the first token of image-grounded encoder inputs) added as an
    additional special token after ``[DEC]`` (a no-op when it is there); returns ``tok``. bert-base-uncased gives
    [DEC] = 30522, [ENC] = 30523."""
    if tok.convert_tokens_to_ids("[ENC]") in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def train_wordpiece(captions, vocab_size: int = 30522, min_frequency: int = 1):
    """A BERT-style WordPiece tokenizer (transformers ``BertTokenizerFast``) trained on ``captions``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(SPECIALS) + 1:
        raise ValueError(f"--vocab-size must be an int > {len(SPECIALS)}, got {vocab_size!r}")
    captions = list(captions)
    norm = normalizers.BertNormalizer(lowercase=True)
    # The trainer creates the continuing-subword pieces ("##x") in hash-map order and breaks merge ties by piece id,
    # so the same captions could give another vocabulary on every run (huggingface/tokenizers#1794). Handing it
    # every "##x" up front, sorted, numbers them deterministically; they are ordinary pieces of the result.
    chars = set()
    for s in range(0, len(captions), 10000):
        chars.update(norm.normalize_str("\n".join(captions[s:s + 10000])))
    cont = sorted("##" + ch for ch in chars if not ch.isspace())
    trainer = trainers.WordPieceTrainer(vocab_size=max(vocab_size, len(SPECIALS) + len(cont) + 1),
                                        special_tokens=SPECIALS + cont, min_frequency=min_frequency,
                                        show_progress=False)
    draft = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    draft.normalizer, draft.pre_tokenizer = norm, pre_tokenizers.BertPreTokenizer()
    draft.train_from_iterator(captions, trainer)
    # a fresh tokenizer over the trained pieces: only the five BERT tokens are special
    vocab = draft.get_vocab()
    pieces = sorted((t for t in vocab if t not in SPECIALS), key=lambda t: vocab[t])
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(SPECIALS + pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    hf = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                           sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
    return _check_bert_style(hf, "train_wordpiece")


def tokenize(tok, captions, max_len: int, *, longest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids int32 [P, max_len], attention_mask bool [P, max_len]) of all captions, padded to ``max_len``
    and truncated as LAVIS does (``padding="max_length", truncation=True``). ``longest``: cut to the longest
    caption instead (what ``padding="longest"`` gives, as LAVIS' retrieval evaluation tokenises)."""
    ids = torch.empty(len(captions), max_len, dtype=torch.int32)
    mask = torch.empty(len(captions), max_len, dtype=torch.bool)
    chunk = 4096
    for s in range(0, len(captions), chunk):
        enc = tok(list(captions[s:s + chunk]), padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="pt")
        ids[s:s + chunk] = enc["input_ids"]
        mask[s:s + chunk] = enc["attention_mask"].bool()
    if longest and len(captions):
        width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 0
        ids, mask = ids[:, :width].contiguous(), mask[:, :width].contiguous()
    return ids, mask
