"""The pieces of the ``blipfast train --stage 2`` tests: tiny random OPT-style and T5-style LLM folders (with a
word-level tokenizer that knows the captions' words), a LAVIS-named stage-1 checkpoint, and the stage-1 run folder
that ``blipfast train`` itself writes."""
from __future__ import annotations

import torch

from blipfast.testing import blip2 as T
from blipfast.testing.data import COLORS, SHAPES
from tests.helpers.train import tiny_args

# the captions of blipfast.testing.data.write_images: "a {colour} {shape} on a {colour} background"
WORDS = list(T.WORDS) + sorted({*COLORS, *SHAPES, "background"} - set(T.WORDS))


def write_llm(path, kind: str, seed: int = 0) -> str:
    """A tiny random OPT (kind "opt") or T5 ("t5") LM folder with its tokenizer, as ``save_pretrained`` writes it."""
    from transformers import OPTForCausalLM, T5ForConditionalGeneration

    text = T.configs(kind)[2]
    text.vocab_size = len(T.SPECIALS) + len(WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = T.sharpen((OPTForCausalLM if kind == "opt" else T5ForConditionalGeneration)(text), 1.0)
    lm.save_pretrained(path)
    T.tokenizer(kind, WORDS).save_pretrained(path)
    return str(path)


def write_lavis_stage1(path, seed: int = 0) -> str:
    """A LAVIS-named stage-1 .pth (Q-Former 64 wide with one 64-wide head, so its config follows from the
    shapes; ln_vision 24 wide, the width of blipfast.testing.data.write_vision's ViT)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    from blipfast import convert

    vision, qformer, text = T.configs("opt", qformer_hidden=64, heads=1)
    qformer.use_qformer_text_input = True
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=T.NUM_QUERY, image_text_hidden_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T.sharpen(Blip2ForImageTextRetrieval(cfg), 1.0)
    convert.save_lavis_checkpoint(convert.hf_to_lavis(model.state_dict()).state_dict, path)
    return str(path)


def stage2_args(out: str, llm: str, init: str, data: str, images: str = None, vision: str = None,
                features: str = None, steps: int = 6, extra: tuple = ()) -> list:
    """``blipfast train --stage 2`` flags of a tiny CPU run (the stage-1 run's flags without its --model)."""
    args = tiny_args(out, data, images, vision, features, steps=steps)
    i = args.index("--model")
    del args[i:i + 2]
    i = args.index("--vocab-size")
    del args[i:i + 2]
    return args + ["--stage", "2", "--llm", llm, "--init", init, "--max-txt-len", "12"] + list(extra)
