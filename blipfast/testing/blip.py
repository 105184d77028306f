"""Tiny random BLIP (v1) models for the CapFilt tests and the documentation's examples: a BERT-style WordPiece tokenizer
(with BLIP's [DEC] and [ENC]), an HF ``BlipForConditionalGeneration`` captioner and ``BlipForImageTextRetrieval``
filter saved as model folders (with the tokenizer and an image processor), their Salesforce-named ``.pth``
twins, a tiny ``CLIPModel`` ranker folder (``capfilt --mode blip2``), and a small web set (PNG images, list
captions, a repeated image, a missing and a corrupt image).

Heads are 64 wide and the ViT's LayerNorm eps is timm's 1e-6, so that the sizes read back from a ``.pth`` give
the same models. ``python -m blipfast.testing.blip OUT_DIR`` writes everything into OUT_DIR."""
from __future__ import annotations

import json
import os

import torch

from .data import write_images

IMAGE_SIZE = 16
PROMPT_WORDS = "a picture of"


def tokenizer(captions):
    from blipfast.data.tokenizer import add_enc_token, train_wordpiece

    return add_enc_token(train_wordpiece(list(captions) + [PROMPT_WORDS], 200))


def image_processor():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def config(tok):
    from transformers import BlipConfig

    dec, sep = tok.convert_tokens_to_ids("[DEC]"), tok.sep_token_id
    text = dict(vocab_size=len(tok), hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=96,
                max_position_embeddings=40, encoder_hidden_size=64, bos_token_id=dec, sep_token_id=sep,
                eos_token_id=sep, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=96,
                  image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def _sharpen(model, scale: float) -> None:
    """Larger weights than HF's init, so that captions and ITM scores depend on the image and the text."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embeddings" not in name:
                p.mul_(scale)


@torch.no_grad()
def _calibrate_itm(filt, tok, captions) -> None:
    """An ITM head whose p(match) spreads over (0, 1) on these captions and random images: the logit difference is
    a random direction of the [ENC] output, centred and scaled to a spread of about 2."""
    enc = tok(list(captions), padding=True, return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = tok.convert_tokens_to_ids("[ENC]")
    image = filt.vision_model(pixel_values=torch.randn(len(captions), 3, IMAGE_SIZE, IMAGE_SIZE)).last_hidden_state
    h = filt.text_encoder(ids, attention_mask=enc["attention_mask"], encoder_hidden_states=image).last_hidden_state[:, 0]
    d = torch.randn(h.shape[1])
    z = h @ d
    d = d * (2.0 / z.std())
    filt.itm_head.weight.copy_(torch.stack([-d / 2, d / 2]))
    filt.itm_head.bias.copy_(torch.stack([(h @ d).mean() / 2, -(h @ d).mean() / 2]))


def models(tok, captions, seed: int = 0):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    torch.manual_seed(seed)
    cap = BlipForConditionalGeneration(config(tok)).eval()
    filt = BlipForImageTextRetrieval(config(tok)).eval()
    _sharpen(cap, 2.0)
    _sharpen(filt, 2.5)
    _calibrate_itm(filt, tok, captions)
    return cap, filt


def save_folder(model, tok, path: str) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor().save_pretrained(path)
    return path


def clip_ranker(tok, path: str, seed: int = 0) -> str:
    """A tiny random transformers ``CLIPModel`` folder (the BLIP tokenizer as its tokenizer, [SEP] as the text's
    end token, a CLIP image processor at the images' size): the ranker of ``capfilt --mode blip2``."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    text = dict(vocab_size=len(tok), hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=48,
                max_position_embeddings=40, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=48,
                  image_size=IMAGE_SIZE, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def save_pth(model, path: str) -> str:
    from blipfast import convert

    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    convert.save_lavis_checkpoint(convert.hf_to_blip(sd, strict=True).state_dict, path)
    return path


def write_web(root: str, n: int = 7, seed: int = 1) -> dict:
    """n images with one or two captions each (a list, and a second row for image 0), a row whose image is
    missing and a corrupt image file."""
    rows = write_images(root, n, seed=seed)
    out = []
    for i, r in enumerate(rows):
        caps = [r["caption"]] if i % 2 else [r["caption"], r["caption"].replace(" on a ", " in front of a ")]
        out.append({"image": r["image"], "caption": caps})
    out.append({"image": rows[0]["image"], "caption": "A photo, of something!"})
    out.append({"image": "img/missing.png", "caption": "nothing here"})
    with open(os.path.join(root, "img", "corrupt.png"), "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\nnot really a png")
    out.append({"image": "img/corrupt.png", "caption": "a broken file"})
    data = os.path.join(root, "web.jsonl")
    with open(data, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in out)
    captions = [c for r in out for c in (r["caption"] if isinstance(r["caption"], list) else [r["caption"]])]
    return {"data": data, "images": root, "captions": captions}


def write_demo(root: str) -> dict:
    """Everything of the module docstring under ``root``; returns the paths."""
    os.makedirs(root, exist_ok=True)
    web = write_web(root)
    tok = tokenizer(web["captions"])
    cap, filt = models(tok, web["captions"])
    paths = dict(web)
    paths["captioner"] = save_folder(cap, tok, os.path.join(root, "blip-captioner"))
    paths["filter"] = save_folder(filt, tok, os.path.join(root, "blip-itm"))
    paths["ranker"] = clip_ranker(tok, os.path.join(root, "clip-ranker"))
    paths["tokenizer"] = os.path.join(root, "tokenizer")
    tok.save_pretrained(paths["tokenizer"])
    paths["captioner_pth"] = save_pth(cap, os.path.join(root, "blip_caption.pth"))
    paths["filter_pth"] = save_pth(filt, os.path.join(root, "blip_itm.pth"))
    return paths


if __name__ == "__main__":  # python -m blipfast.testing.blip OUT_DIR
    import sys

    print(json.dumps(write_demo(sys.argv[1]), indent=1))
