"""Tiny random BLIP-2 / InstructBLIP models, tokenizers and image processors for the stage-2 and generation tests.

Everything is built from configs (no downloads) and saved/loaded through the real loading code when a test needs
a folder. Weights are random but "sharp" (large enough that generation depends on the image and beam search
differs from greedy), so a token-equality test can fail.
"""
from __future__ import annotations

import json

import torch

WORDS = ("a photo of the cat dog man woman child sitting standing on in with table street field red blue green "
         "two three question: short answer: what is color how many there are grass sky car bus tree big small "
         "white black near under next to riding running eating yes no").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD, BOS, EOS, UNK, IMAGE = range(5)
VOCAB = SPECIALS + WORDS
NUM_QUERY = 4
IMAGE_SIZE = 16


def tokenizer(kind: str = "opt", words=WORDS):
    """A word-level fast tokenizer: OPT-style prepends <s>, T5-style appends </s>; lower-cases. ``words``: the
    vocabulary after the special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + list(words))}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "opt":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", BOS)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>",
                                                           special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


SENTENCES = ("a photo of a dog on the grass", "a photo of two cats sitting on a red table",
             "a man riding a red bus down the street", "a woman standing next to a blue car",
             "question: what is the man riding? short answer: a bus", "three children eating near the big tree",
             "a black and white photo of a small dog under the table", "how many dogs are there? two")


def bpe_tokenizer(kind: str = "byte-level", *, sentences=SENTENCES, vocab_size: int = 320, trim_offsets: bool = True):
    """A real subword tokenizer trained here on ``sentences`` (tokenizers' BPE trainer), with a BOS in front of
    every text and the special tokens of :data:`SPECIALS` at the ids of the tiny configs (PAD 0, BOS 1, EOS 2):

    - ``"byte-level"``: GPT-2 / OPT's byte-level BPE (transformers' ``GPT2Tokenizer`` with ``add_bos_token``), so a
      space belongs to the word after it (``"Ġa"``) and ``"a photo of "`` ends with a token ``"Ġ"`` of its own;
      ``trim_offsets`` as GPT-2's post-processor (the offsets leave the space out) or not;
    - ``"metaspace"``: SentencePiece-style BPE as Llama's (``"▁a"``), a ``PreTrainedTokenizerFast``.

    Its vocabulary is ``len(tokenizer)`` (a few hundred); build the LLM with ``vocab_size=len(tokenizer)``."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer, processors
    from transformers import GPT2Tokenizer, PreTrainedTokenizerFast

    if kind not in ("byte-level", "metaspace"):
        raise ValueError(f"kind must be 'byte-level' or 'metaspace', got {kind!r}")
    trainer = ByteLevelBPETokenizer() if kind == "byte-level" else SentencePieceBPETokenizer()
    trainer.train_from_iterator(list(sentences) * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS,
                                show_progress=False)
    names = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                 additional_special_tokens=["<image>"])
    bos = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    if kind == "metaspace":
        trainer._tokenizer.post_processor = bos
        return PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, **names)
    spec = json.loads(trainer._tokenizer.to_str())["model"]
    tok = GPT2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]], add_bos_token=True, **names)
    if trim_offsets:
        tok._tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True), bos])
    return tok


def image_processor():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def configs(kind: str = "opt", *, qformer_hidden: int = 32, heads: int = 2, layers: int = 2, instruct: bool = False):
    from transformers import (Blip2QFormerConfig, Blip2VisionConfig, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig, OPTConfig, T5Config)

    vcls, qcls = ((InstructBlipVisionConfig, InstructBlipQFormerConfig) if instruct
                  else (Blip2VisionConfig, Blip2QFormerConfig))
    vision = vcls(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8)
    qformer = qcls(hidden_size=qformer_hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   intermediate_size=48, encoder_hidden_size=24, vocab_size=len(VOCAB), max_position_embeddings=64)
    if kind == "opt":
        text = OPTConfig(vocab_size=len(VOCAB), hidden_size=40, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                         word_embed_proj_dim=40, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS, dropout=0.0, attention_dropout=0.0)
    else:
        text = T5Config(vocab_size=len(VOCAB), d_model=40, d_kv=20, d_ff=64, num_layers=2, num_heads=2,
                        decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS, dropout_rate=0.0,
                        tie_word_embeddings=False)
    return vision, qformer, text


def sharpen(model: torch.nn.Module, scale: float = 3.0) -> torch.nn.Module:
    """Random weights far from HF's N(0, 0.02) init, so that outputs depend strongly on the inputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            low = name.lower()
            if ("layernorm" in low or "layer_norm" in low) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() > 1:  # matrices and embeddings: entries of scale / sqrt(fan-in)
                p.copy_(scale * torch.randn_like(p) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def blip2(kind: str = "opt", *, instruct: bool = False, **kw):
    """A sharp random Blip2ForConditionalGeneration (or InstructBLIP) in eval mode, HF's Q-Former inside."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig,
                              InstructBlipForConditionalGeneration)

    vision, qformer, text = configs(kind, instruct=instruct, **kw)
    ccls, mcls = (InstructBlipConfig, InstructBlipForConditionalGeneration) if instruct else \
        (Blip2Config, Blip2ForConditionalGeneration)
    cfg = ccls(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
               num_query_tokens=NUM_QUERY, image_token_index=IMAGE)
    return sharpen(mcls(cfg)).eval()


def save_folder(model, path, kind: str = "opt", *, instruct: bool = False):
    """An HF folder as ``save_pretrained`` + processors write it (InstructBLIP: with ``qformer_tokenizer/``)."""
    model.save_pretrained(path)
    tokenizer(kind).save_pretrained(path)
    image_processor().save_pretrained(path)
    if instruct:
        tokenizer("opt").save_pretrained(f"{path}/qformer_tokenizer")
    return path


def write_images(folder, n: int, *, size: int = 20, seed: int = 0):
    """n random RGB PNG files (pillow), named img0.png, img1.png, ...; returns their paths."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        p = f"{folder}/img{i}.png"
        pixels = torch.randint(0, 256, (size, size + i, 3), generator=gen, dtype=torch.uint8)
        Image.frombytes("RGB", (size + i, size), bytes(pixels.flatten().tolist())).save(p)
        paths.append(p)
    return paths


def write_demo(out) -> None:
    """Everything the examples of docs/blip2-stage2.md read, tiny and random, under ``out``:
    blip2-opt/, blip2-t5/, instructblip/ (HF folders with tokenizer and image processor), stage1.pth (a LAVIS
    stage-1 checkpoint), llm-opt/ (an OPT folder with its tokenizer), vit/ (a Blip2VisionModel folder),
    images/ (4 PNGs) and questions.jsonl."""
    from pathlib import Path

    from transformers import Blip2Config, Blip2ForImageTextRetrieval, OPTForCausalLM

    from blipfast import convert

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, kind, instruct in (("blip2-opt", "opt", False), ("blip2-t5", "t5", False), ("instructblip", "opt", True)):
        save_folder(blip2(kind, instruct=instruct), out / name, kind, instruct=instruct)
    vision, qformer, text = configs("opt", qformer_hidden=64, heads=1)
    qformer.use_qformer_text_input = True  # a stage-1 Q-Former has the text path too
    stage1 = Blip2ForImageTextRetrieval(Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                                    text_config=text.to_dict(), num_query_tokens=NUM_QUERY,
                                                    image_text_hidden_size=16))
    sharpen(stage1, 1.0)
    convert.save_lavis_checkpoint(convert.hf_to_lavis(stage1.state_dict()).state_dict, out / "stage1.pth")
    stage1.vision_model.save_pretrained(out / "vit")
    sharpen(OPTForCausalLM(text), 1.0).save_pretrained(out / "llm-opt")
    tokenizer("opt").save_pretrained(out / "llm-opt")
    paths = write_images(out / "images", 4)
    questions = ["what is the man riding", "how many dogs are there", "what color is the car", "is it a cat"]
    (out / "questions.jsonl").write_text("".join(json.dumps({"image": f"images/{Path(p).name}", "question": q,
                                                             "question_id": i}) + "\n"
                                                 for i, (p, q) in enumerate(zip(paths, questions))))


if __name__ == "__main__":  # python -m blipfast.testing.blip2 OUT_DIR
    import sys

    write_demo(sys.argv[1] if len(sys.argv) > 1 else "tiny-blip2")
    print(f"wrote tiny random BLIP-2 demo files to {sys.argv[1] if len(sys.argv) > 1 else 'tiny-blip2'}")
