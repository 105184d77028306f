"""The engine of ``blipfast caption`` / ``blipfast vqa``: inputs, the model, batched generation, JSONL output."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..options import add_device_argument, add_dtype_argument, resolve_device, resolve_dtype

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class Item:
    """One input row: the image path as given (``name``), where it is (``path``), an optional question and the
    row's other JSONL fields (copied to the output)."""

    name: str
    path: Path
    question: Optional[str] = None
    extra: dict = field(default_factory=dict)


def read_items(*, images=None, data=None, image_root=None, need_question: bool = False) -> list:
    """The rows to run: every image file of the folder ``images`` (sorted by name), or every line of the JSONL
    file ``data`` (``{"image": path, ["question": text], ...}``; relative paths are under ``image_root``, default
    the JSONL's folder)."""
    if (images is None) == (data is None):
        raise ValueError("give exactly one of --images (a folder) and --data (a JSONL file)")
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"--images: {folder} is not a folder")
        if need_question:
            raise ValueError("--images: VQA needs a question per image; use --data with {\"image\", \"question\"} rows")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        return [Item(name=str(p), path=p) for p in files]
    data = Path(data)
    if not data.is_file():
        raise ValueError(f"--data: {data} is not a file")
    root = Path(image_root) if image_root is not None else data.parent
    items = []
    for n, line in enumerate(data.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--data: {data}:{n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ValueError(f"--data: {data}:{n} needs an \"image\" path (a string)")
        question = row.get("question")
        if need_question and not isinstance(question, str):
            raise ValueError(f"--data: {data}:{n} needs a \"question\" (a string)")
        extra = {k: v for k, v in row.items() if k not in ("image", "question")}
        path = Path(row["image"])
        items.append(Item(name=row["image"], path=path if path.is_absolute() else root / path, question=question,
                          extra=extra))
    if not items:
        raise ValueError(f"--data: {data} has no rows")
    return items


def _load_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"image {path}: cannot be read ({e})") from None


class Generator:
    """A BLIP-2 / InstructBLIP folder ready to generate: ``Generator(model_dir)(images, prompts, **kwargs)``."""

    def __init__(self, model_dir, *, device=None, dtype=None, attn_implementation: Optional[str] = "auto"):
        from transformers import AutoTokenizer
        # from its module: transformers 5.17's top level hides AutoImageProcessor without torchvision
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        from ..models.blip2_stage2 import Blip2Stage2

        model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, self.device)
        self.model = Blip2Stage2.from_hf(model_dir, dtype=dtype, attn_implementation=attn_implementation,
                                         device=self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # decoder-only prompts are left-padded ([queries | pad | prompt], as LAVIS); encoder prompts right-padded
        self.tokenizer.padding_side = "right" if self.model.is_encoder_decoder else "left"
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.qformer_tokenizer = None
        if self.model.is_instructblip:
            sub = model_dir / "qformer_tokenizer"
            if not sub.is_dir():
                raise ValueError(f"--model: {model_dir} is an InstructBLIP model without its qformer_tokenizer/ folder")
            self.qformer_tokenizer = AutoTokenizer.from_pretrained(sub)
            self.qformer_tokenizer.padding_side = "right"

    def __call__(self, images: Sequence, prompts: Sequence[str], **generate_kwargs) -> list:
        """One text per image (a list of texts per image with ``num_return_sequences`` > 1)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        tok = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        if ids.shape[1] == 0:  # empty prompts and a tokenizer that adds nothing: the model's default start
            ids = mask = None
        extra = {}
        if self.qformer_tokenizer is not None:
            q = self.qformer_tokenizer(list(prompts), padding=True, return_tensors="pt")
            extra = {"qformer_input_ids": q["input_ids"].to(self.device),
                     "qformer_attention_mask": q["attention_mask"].to(self.device)}
        out = self.model.generate(pixel_values=px.to(self.device, self.dtype), input_ids=ids, attention_mask=mask,
                                  **extra, **generate_kwargs)
        texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        n = generate_kwargs.get("num_return_sequences", 1) or 1
        return texts if n == 1 else [texts[i:i + n] for i in range(0, len(texts), n)]


def add_common_arguments(p, *, settings: Sequence[str], questions: bool) -> None:
    """The flags of ``blipfast caption`` / ``vqa``. The decoding defaults are LAVIS' ``--settings`` (the first of
    ``settings`` by default) for the model's LLM kind (:meth:`blipfast.Blip2Stage2.decoding_settings`); each flag
    given wins over them, ``--generate-kwargs`` over everything."""
    p.add_argument("--model", required=True, help="local folder of an HF Blip2ForConditionalGeneration or "
                   "InstructBlipForConditionalGeneration (save_pretrained), with its tokenizer and image processor")
    src = p.add_mutually_exclusive_group(required=True)
    if not questions:
        src.add_argument("--images", help="a folder of images (every image file in it, sorted by name)")
    src.add_argument("--data", help='a JSONL file of {"image": path' + (', "question": text' if questions else "")
                     + ", ...} rows (other fields are copied to the output)")
    p.add_argument("--image-root", help="folder that relative image paths of --data are under (default: the JSONL's)")
    p.add_argument("--output", default="-", help="JSONL file to write (default: standard output)")
    p.add_argument("--settings", default=settings[0], choices=tuple(settings),
                   help=f"LAVIS' decoding settings, resolved for the model's LLM (default {settings[0]}; "
                   "docs/blip2-stage2.md): prompt, beams, lengths as new-token counts, penalties")
    p.add_argument("--prompt", default=None, help=f"prompt{' template ({} = the question)' if questions else ''} "
                   "(default: the settings')")
    p.add_argument("--batch-size", type=int, default=16, help="images per generate call (default 16)")
    p.add_argument("--num-beams", type=int, default=None, help="beam width (default: the settings', 5)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="most new tokens (default: the settings')")
    p.add_argument("--min-new-tokens", type=int, default=None, help="fewest new tokens before the EOS (default: "
                   "the settings')")
    p.add_argument("--length-penalty", type=float, default=None, help="beam search's length penalty (default: "
                   "the settings')")
    p.add_argument("--generate-kwargs", default="{}", help="JSON object of further transformers generate() "
                   "arguments (they win over the flags above), e.g. '{\"repetition_penalty\": 1.15}'")
    add_device_argument(p)
    add_dtype_argument(p, "dtype of the ViT and the LLM", note="the Q-Former stays fp32")
    p.add_argument("--attn-implementation", default="auto", choices=("auto", "flash_attention_2", "sdpa", "eager"),
                   help="the LLM's attention (auto: FlashAttention-2 when flash-attn is installed and usable)")


def _generate_kwargs(args) -> dict:
    """The generate arguments the flags give (None: not given) and ``--generate-kwargs``, checked."""
    for name, low in (("batch_size", 1), ("num_beams", 1), ("max_new_tokens", 1), ("min_new_tokens", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    try:
        extra = json.loads(args.generate_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--generate-kwargs is not JSON ({e.msg})") from None
    if not isinstance(extra, dict):
        raise ValueError("--generate-kwargs must be a JSON object")
    flags = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty")}
    return {**{k: v for k, v in flags.items() if v is not None}, **extra}


def decoding(gen: Generator, args) -> tuple:
    """(prompt, generate kwargs) of a run: LAVIS' ``--settings`` for the model's LLM, the flags given over them."""
    settings = gen.model.decoding_settings(args.settings)
    prompt = settings.prompt if args.prompt is None else args.prompt
    return prompt, {**settings.generate_kwargs(), **_generate_kwargs(args)}


def run_task(args, *, task: str) -> int:
    """Run ``blipfast caption`` (task "caption") or ``blipfast vqa`` (task "vqa") on parsed arguments."""
    from tqdm import tqdm

    vqa = task == "vqa"
    try:
        _generate_kwargs(args)
        if vqa and args.prompt is not None and "{}" not in args.prompt:
            raise ValueError(f"--prompt must contain {{}} for the question, got {args.prompt!r}")
        items = read_items(images=getattr(args, "images", None), data=args.data, image_root=args.image_root,
                           need_question=vqa)
        gen = Generator(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation)
        prompt, kwargs = decoding(gen, args)
    except ValueError as e:
        print(f"blipfast {task}: {e}", file=sys.stderr)
        return 2
    key = "answer" if vqa else "caption"
    start = time.perf_counter()
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    try:
        with tqdm(total=len(items), desc=f"blipfast {task}", unit="img", file=sys.stderr) as bar:
            for i in range(0, len(items), args.batch_size):
                batch = items[i:i + args.batch_size]
                images = [_load_image(it.path) for it in batch]
                prompts = [prompt.format(it.question) if vqa else prompt for it in batch]
                for it, text in zip(batch, gen(images, prompts, **kwargs)):
                    row = {"image": it.name, **({"question": it.question} if vqa else {}), **it.extra, key: text}
                    out.write(json.dumps(row) + "\n")
                out.flush()
                bar.update(len(batch))
    except ValueError as e:
        print(f"blipfast {task}: {e}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
    where = "standard output" if args.output == "-" else args.output
    print(f"blipfast {task}: {len(items)} rows -> {where} in {time.perf_counter() - start:.1f} s "
          f"(device {gen.device}, {str(gen.dtype).replace('torch.', '')})", file=sys.stderr)
    return 0
