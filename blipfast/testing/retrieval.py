"""Tiny random BLIP-2 retrieval models, tokenizer and data for the retrieval/captioning tests and the documentation's
retrieval example (CPU, seconds).

The weights are HF's initialisation plus N(0, 0.1) noise on every parameter: at HF's std 0.02 the image barely
moves a random Q-Former's outputs, and top-k choices and captions would hardly depend on the image."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 120  # ids 101 [CLS], 102 [SEP] and 0 [PAD] exist; 119 serves as [DEC]
QCFG = dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=3, encoder_hidden_size=32,
            vocab_size=VOCAB, max_position_embeddings=40, use_qformer_text_input=True)
VCFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)
NQ, EMBED = 5, 16


def stage1_config(**overrides):
    from blipfast import Blip2Stage1Config

    return Blip2Stage1Config(qformer={**QCFG, **overrides}, num_query_tokens=NQ, embed_dim=EMBED,
                             bos_token_id=VOCAB - 1, ln_vision_eps=1e-6)


def jitter_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def hf_retrieval_model():
    """An HF Blip2ForImageTextRetrieval with the tiny configs (eval mode, fp32)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    cfg = Blip2Config(vision_config=VCFG, qformer_config=QCFG, num_query_tokens=NQ, image_text_hidden_size=EMBED)
    return jitter_(Blip2ForImageTextRetrieval(cfg)).eval()


def texts(n: int, t: int, pad_rows=(), generator=None):
    """[CLS]-started random ids [n, t] with [SEP] at each row's end; rows in ``pad_rows`` are 2-4 tokens shorter."""
    ids = torch.randint(1, 100, (n, t), generator=generator)
    mask = torch.ones(n, t, dtype=torch.long)
    ids[:, 0] = 101
    for i in range(n):
        length = t - (2 + i % 3 if i in pad_rows else 0)
        ids[i, length - 1] = 102
        ids[i, length:] = 0
        mask[i, length:] = 0
    return ids, mask


WORDS = ["a", "dog", "cat", "red", "blue", "car", "on", "the", "grass", "man", "woman", "two", "is", "with",
         "sitting", "street", "table", "of", "and", "in"]


def write_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer (vocabulary of VOCAB tokens: WORDS, [CLS] = 101, [SEP] = 102) saved to
    ``folder``."""
    from transformers import BertTokenizer

    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", VOCAB - 1: "[DEC]"}
    words = iter(WORDS)
    vocab = [special.get(i) or next(words, None) or f"[unused{i}]" for i in range(VOCAB)]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert tok("Two dogs")["input_ids"] == [101, WORDS.index("two") + 1, 100, 102], "tokenizer vocabulary not taken"
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok


def write_gallery(folder: Path, n_images: int, captions_per_image, size: int = 32, seed: int = 0):
    """Random PNG images and a LAVIS retrieval annotation (a JSON list of {"image", "caption": [...]})."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ann = []
    for i in range(n_images):
        px = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        name = f"img_{i}.png"
        Image.fromarray(px).save(folder / "images" / name)
        n_cap = captions_per_image[i % len(captions_per_image)]
        caps = [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3 + (i + c) % 4,), generator=g))
                + ("." if c % 2 else "!") for c in range(n_cap)]
        ann.append({"image": name, "caption": caps})
    (folder / "ann.json").write_text(json.dumps(ann))
    return folder / "ann.json", folder / "images"


def write_demo(out) -> None:
    """The retrieval example's inputs under ``out``: a gallery of 20 random images with 5 captions each (ann.json,
    images/) and blip2-itm-tiny/ (an HF Blip2ForImageTextRetrieval folder with its BERT tokenizer)."""
    out = Path(out)
    torch.manual_seed(0)
    write_gallery(out, 20, [5])
    hf_retrieval_model().save_pretrained(out / "blip2-itm-tiny")
    write_tokenizer(out / "blip2-itm-tiny")


if __name__ == "__main__":  # python -m blipfast.testing.retrieval OUT_DIR
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "tiny-retrieval"
    write_demo(out)
    print(f"wrote a tiny random BLIP-2 retrieval model and gallery to {out}")
