"""The engine of ``blipfast caption`` / ``blipfast vqa``: inputs, the model, batched generation, JSONL output.

Before the model loads, the inputs are checked (every row, every image file present and not empty, the model
folder: a generation model with its weights, tokenizer and image processor), so a mistake costs no model load. An
image that cannot be read is reported and skipped, as ``blipfast train`` and ``capfilt`` do; an empty generated text
is written (it is the model's answer) and counted in the report. An ``--output`` file grows by whole batches (one
write and an fsync each): a second invocation keeps its rows, cuts a partial last line and does only the rows it
lacks; the settings it was written with are kept beside it (``<stem>.settings.json``) and another model, prompt or
generation setting is refused (``--restart`` starts the output again).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..files import append_lines, check_settings, read_jsonl_rows
from ..options import (EXIT_OK, EXIT_USAGE, add_device_argument, add_dtype_argument, auto_dtype_name, dtype_name,
                       resolve_device, resolve_dtype)

GENERATION_CLASSES = ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

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


def check_images(items: list) -> tuple[list, list]:
    """(the items whose image file exists and is not empty, one message per other item)."""
    good, bad = [], []
    for it in items:
        if not it.path.is_file():
            bad.append(f"image {it.path}: cannot be read: no such file (skipped)")
        elif it.path.stat().st_size == 0:
            bad.append(f"image {it.path}: cannot be read: the file is empty (skipped)")
        else:
            good.append(it)
    return good, bad


def check_model_folder(model_dir) -> None:
    """Refuse (ValueError naming ``--model`` and the file) a folder that is not a BLIP-2 / InstructBLIP generation
    model with its weights, tokenizer and image processor, nor a fine-tuned BLIP-2 run whose LLM is there
    (:func:`blipfast.models.blip2_finetuned.finetuned_run`), before anything loads."""
    from ..models.blip2_finetuned import finetuned_run

    folder = Path(model_dir)
    if folder.exists() and finetuned_run(folder) is not None:
        return
    if not folder.is_dir():
        raise ValueError(f"--model: {folder} is not a folder (a save_pretrained folder of a "
                         f"{' or '.join(GENERATION_CLASSES)})")
    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"--model: {folder} has no config.json (a save_pretrained folder of a "
                         f"{' or '.join(GENERATION_CLASSES)})") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: {cfg_file} cannot be read ({e})") from None
    arch = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    if arch and not set(arch) & set(GENERATION_CLASSES):
        raise ValueError(f"--model: {folder} holds a {arch[0]}, which does not generate text; caption and vqa need a "
                         f"{' or '.join(GENERATION_CLASSES)} folder")
    missing = [what for what, names in (("weights (model.safetensors)", WEIGHT_FILES),
                                        (f"tokenizer files ({', '.join(TOKENIZER_FILES)})", TOKENIZER_FILES),
                                        ("preprocessor_config.json (the image processor)",
                                         ("preprocessor_config.json",)))
               if not any((folder / n).is_file() for n in names)]
    if missing:
        raise ValueError(f"--model: {folder} has no {' and no '.join(missing)}; save the model with its processor "
                         f"(Blip2Processor / InstructBlipProcessor .save_pretrained into the same folder)")


def _load_image(path: Path):
    from ..data.vision import load_image

    return load_image(str(path))


class Generator:
    """A BLIP-2 / InstructBLIP folder (or a fine-tuned BLIP-2 run: :mod:`blipfast.models.blip2_finetuned`) ready to
    generate: ``Generator(model_dir)(images, prompts, **kwargs)``. ``eos_token_id``: where a caption ends when the
    model was trained with an end of its own (a run's ``--text-suffix``, "\\n" for OPT as LAVIS' ``eos_token_id``;
    an exported folder's ``blipfast.text_suffix``), else None (the LLM's own)."""

    def __init__(self, model_dir, *, device=None, dtype=None, attn_implementation: Optional[str] = "auto"):
        from transformers import AutoTokenizer

        from ..data.vision import default_blip_processor, load_image_processor
        from ..models.blip2_finetuned import finetuned_run, load_finetuned
        from ..models.blip2_stage2 import Blip2Stage2

        model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, self.device)
        check_model_folder(model_dir)
        run = finetuned_run(model_dir)
        try:
            if run is not None:
                self.model = load_finetuned(run, dtype=dtype, device=self.device,
                                            attn_implementation=attn_implementation)
            else:
                self.model = Blip2Stage2.from_hf(model_dir, dtype=dtype, attn_implementation=attn_implementation,
                                                 device=self.device).eval()
        except ValueError:
            raise
        except Exception as e:  # transformers / safetensors raise many kinds for a damaged folder
            raise ValueError(f"--model: cannot load {model_dir} ({type(e).__name__}: {e}); is a file missing, "
                             f"empty or truncated?") from None
        self.tokenizer = AutoTokenizer.from_pretrained(run.tokenizer if run is not None else model_dir)
        if not self.tokenizer("a photo of a dog", add_special_tokens=False)["input_ids"]:
            raise ValueError(f"--model: the tokenizer of {model_dir} is empty (it turns text into no tokens): its "
                             f"tokenizer files are missing or broken")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # decoder-only prompts are left-padded ([queries | pad | prompt], as LAVIS); encoder prompts right-padded
        self.tokenizer.padding_side = "right" if self.model.is_encoder_decoder else "left"
        if run is not None:  # the run's evaluation transform (LAVIS' blip_image_eval at its resolution)
            self.image_processor = default_blip_processor(run.image_size)
            suffix = run.text_suffix
        else:
            self.image_processor = load_image_processor(model_dir)
            suffix = (getattr(self.model.model.config, "blipfast", None) or {}).get("text_suffix")
        end = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        self.eos_token_id = end[0] if end and not self.model.is_encoder_decoder else None
        self.run, self.qformer_tokenizer, self.qformer_max_length = run, None, None
        if self.model.is_instructblip:
            sub = Path(run.qformer_tokenizer) if run is not None else model_dir / "qformer_tokenizer"
            if not sub.is_dir():
                raise ValueError(f"--model: {model_dir} is an InstructBLIP model without its qformer_tokenizer/ folder")
            self.qformer_tokenizer = AutoTokenizer.from_pretrained(sub)
            self.qformer_tokenizer.padding_side = "right"
            if run is not None:  # a blip2-vqa run: its question cut on the left at --max-txt-len, as it trained
                self.qformer_tokenizer.truncation_side, self.qformer_max_length = "left", run.max_txt_len

    def __call__(self, images: Sequence, prompts: Sequence[str], questions: Optional[Sequence[str]] = None,
                 **generate_kwargs) -> list:
        """One text per image (a list of texts per image with ``num_return_sequences`` > 1). ``questions``: the
        Q-Former's text of a ``blip2-vqa`` run (the question alone, as it trained; an HF InstructBLIP folder reads
        the prompt, as its processor feeds it)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        tok = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        if ids.shape[1] == 0:  # empty prompts and a tokenizer that adds nothing: the model's default start
            ids = mask = None
        extra = {}
        if self.qformer_tokenizer is not None:
            qtexts = list(questions) if self.run is not None and questions is not None else list(prompts)
            if len(qtexts) != len(images):
                raise ValueError(f"{len(images)} images for {len(qtexts)} questions")
            q = self.qformer_tokenizer(qtexts, padding=True, truncation=self.qformer_max_length is not None,
                                       max_length=self.qformer_max_length, return_tensors="pt")
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
                   "InstructBlipForConditionalGeneration (save_pretrained), with its tokenizer and image processor, "
                   "or a blipfast train run (or checkpoint) of blip2-caption")
    src = p.add_mutually_exclusive_group(required=True)
    if not questions:
        src.add_argument("--images", help="a folder of images (every image file in it, sorted by name)")
    src.add_argument("--data", help='a JSONL file of {"image": path' + (', "question": text' if questions else "")
                     + ", ...} rows (other fields are copied to the output)")
    p.add_argument("--image-root", help="folder that relative image paths of --data are under (default: the JSONL's)")
    p.add_argument("--output", default="-", help="JSONL file to write (default: standard output); a file that "
                   "holds rows is continued (its rows are kept, the missing ones added)")
    p.add_argument("--restart", action="store_true", help="start --output again (its rows are dropped) instead of "
                   "continuing it")
    add_decoding_arguments(p, settings=settings, questions=questions)
    p.epilog = (f"Exit codes: {EXIT_OK} done (unreadable images are reported and skipped); {EXIT_USAGE} refused (the "
                f"message names the option, file or row). See docs/troubleshooting.md.")


def add_decoding_arguments(p, *, settings: Sequence[str], questions: bool) -> None:
    """The decoding, batching and device flags of ``blipfast caption`` / ``vqa`` (also ``blipfast eval``'s end to
    end mode): LAVIS' ``--settings`` (the first of ``settings`` by default), the flags that win over them, and
    ``--generate-kwargs`` over everything (:func:`decoding` resolves them)."""
    p.add_argument("--settings", default=settings[0], choices=tuple(settings),
                   help=f"LAVIS' decoding settings, resolved for the model's LLM (default {settings[0]}; "
                   "docs/blip2-stage2.md): prompt, beams, lengths as new-token counts, penalties")
    p.add_argument("--prompt", default=None, help=f"prompt{' template ({} = the question)' if questions else ''} "
                   "(default: the settings')")
    p.add_argument("--batch-size", type=int, default=16, help="images per generate call (default 16)")
    p.add_argument("--num-beams", type=int, default=None, help="beams of the beam search (1: greedy; default: the "
                   "settings', 5)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens generated per text (default: the "
                   "settings')")
    p.add_argument("--min-new-tokens", type=int, default=None, help="fewest tokens generated per text (default: "
                   "the settings')")
    p.add_argument("--length-penalty", type=float, default=None, help="beam search's length penalty (default: "
                   "the settings')")
    p.add_argument("--generate-kwargs", default="{}", help="JSON object of further transformers generate() "
                   "arguments (they win over the flags above), e.g. '{\"repetition_penalty\": 1.15}'")
    add_device_argument(p)
    add_dtype_argument(p, "dtype of the ViT and the LLM", note="the Q-Former stays fp32")
    p.add_argument("--attn-implementation", default="auto", choices=("auto", "flash_attention_2", "sdpa", "eager"),
                   help="the LLM's attention (auto: FlashAttention-2 when flash-attn is installed and usable)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


def _generate_kwargs(args, base: dict) -> dict:
    """The generate arguments: ``base`` (the settings'), the flags given over them (None: not given) and
    ``--generate-kwargs`` over everything, checked."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        extra = json.loads(args.generate_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--generate-kwargs is not JSON ({e.msg})") from None
    if not isinstance(extra, dict):
        raise ValueError("--generate-kwargs must be a JSON object")
    flags = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty")}
    kw = {**base, **{k: v for k, v in flags.items() if v is not None}, **extra}
    for name, low in (("num_beams", 1), ("max_new_tokens", 1), ("min_new_tokens", 0), ("num_return_sequences", 1)):
        v = kw.get(name)
        where = "--generate-kwargs" if name in extra else f"--{name.replace('_', '-')}"
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ValueError(f"{where}: {name} must be an integer >= {low}, got {v!r}")
    n, beams = kw.get("num_return_sequences") or 1, kw.get("num_beams")
    if beams is not None and n > beams and not kw.get("do_sample"):
        raise ValueError(f"--generate-kwargs: num_return_sequences ({n}) must be <= num_beams ({beams}) without "
                         f"sampling")
    return kw


def decoding(gen: Generator, args) -> tuple:
    """(prompt, generate kwargs) of a run: LAVIS' ``--settings`` for the model's LLM, the flags given over them."""
    settings = gen.model.decoding_settings(args.settings) if gen.run is None else \
        gen.run.decoding_settings(gen.model, args.settings)
    prompt = settings.prompt if args.prompt is None else args.prompt
    base = settings.generate_kwargs()
    if gen.eos_token_id is not None:  # a fine-tuned caption's end, as the run's own evaluation stops
        base["eos_token_id"] = gen.eos_token_id
    return prompt, _generate_kwargs(args, base)


def _key(row: dict, text_key: str) -> str:
    """What identifies an input row in the output: every field but the generated text."""
    return json.dumps({k: v for k, v in row.items() if k != text_key}, sort_keys=True)


def _open_output(args, settings: dict, key: str) -> tuple:
    """(file to append to, the keys of the rows it holds, how many); --restart empties it."""
    if args.output == "-":
        return sys.stdout, set(), 0
    out = Path(args.output)
    if out.is_dir():
        raise ValueError(f"--output: {out} is a folder (give a file name)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = str(out)[:-len(".jsonl")] if str(out).endswith(".jsonl") else str(out)
    if args.restart and out.exists():
        out.unlink()
    rows = read_jsonl_rows(str(out))
    check_settings(stem + ".settings.json", settings, output=f"--output {out}", resumed=bool(rows))
    return open(out, "a"), {_key(r, key) for r in rows if isinstance(r, dict)}, len(rows)


def run_task(args, *, task: str) -> int:
    """Run ``blipfast caption`` (task "caption") or ``blipfast vqa`` (task "vqa") on parsed arguments."""
    from tqdm import tqdm

    vqa = task == "vqa"
    key = "answer" if vqa else "caption"
    start = time.perf_counter()
    out = None
    try:
        _generate_kwargs(args, {})  # the flags checked before anything is loaded
        if vqa and args.prompt is not None and "{}" not in args.prompt:
            raise ValueError(f"--prompt must contain {{}} for the question, got {args.prompt!r}")
        items = read_items(images=getattr(args, "images", None), data=args.data, image_root=args.image_root,
                           need_question=vqa)
        items, bad = check_images(items)
        for msg in bad:
            print(f"blipfast {task}: {msg}", file=sys.stderr)
        if not items:
            raise ValueError(f"no image of the input can be read ({len(bad)} missing or empty)")
        check_model_folder(args.model)
        device = resolve_device(args.device)
        gen = Generator(args.model, device=device, dtype=args.dtype, attn_implementation=args.attn_implementation)
        prompt, kwargs = decoding(gen, args)
        dtype_shown = dtype_name(args.dtype) if args.dtype not in (None, "auto") else auto_dtype_name(device)
        settings = {"task": task, "model": os.path.abspath(args.model), "prompt": prompt, "generate": kwargs,
                    "dtype": dtype_shown}
        out, done, kept = _open_output(args, settings, key)
        rows = [(it, {"image": it.name, **({"question": it.question} if vqa else {}),
                      **{k: v for k, v in it.extra.items() if k != key}}) for it in items]
        todo = [(it, row) for it, row in rows if _key(row, key) not in done]
        if not todo:
            print(f"blipfast {task}: {args.output} already holds every row ({kept}); --restart writes it again",
                  file=sys.stderr)
            return EXIT_OK
    except ValueError as e:
        print(f"blipfast {task}: {e}", file=sys.stderr)
        if out is not None and out is not sys.stdout:
            out.close()
        return EXIT_USAGE
    written, empty, unreadable = 0, [], list(bad)
    try:
        with tqdm(total=len(todo), desc=f"blipfast {task}", unit="img", file=sys.stderr,
                  disable=not getattr(args, "progress", True)) as bar:
            for i in range(0, len(todo), args.batch_size):
                batch, images = [], []
                for it, row in todo[i:i + args.batch_size]:
                    try:
                        images.append(_load_image(it.path))
                        batch.append((it, row))
                    except ValueError as e:
                        print(f"blipfast {task}: {e} (skipped)", file=sys.stderr, flush=True)
                        unreadable.append(str(e))
                if batch:
                    prompts = [prompt.format(it.question) if vqa else prompt for it, _ in batch]
                    try:
                        texts = gen(images, prompts, questions=[it.question for it, _ in batch] if vqa else None,
                                    **kwargs)
                    except (ValueError, TypeError) as e:  # transformers' checks of the generate() arguments
                        raise ValueError(f"generate() refused the arguments (--generate-kwargs, --num-beams, ...): "
                                         f"{e}") from None
                    lines = []
                    for (it, row), text in zip(batch, texts):
                        if text == "" or (isinstance(text, list) and "" in text):
                            empty.append(it.name)
                        lines.append(json.dumps({**row, key: text}) + "\n")
                    if out is sys.stdout:
                        out.write("".join(lines))
                        out.flush()
                    else:
                        append_lines(out, lines)
                    written += len(lines)
                bar.update(len(todo[i:i + args.batch_size]))
    except ValueError as e:
        print(f"blipfast {task}: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if out is not sys.stdout:
            out.close()
    where = "standard output" if args.output == "-" else args.output
    notes = [f"{kept} already in the output"] if kept else []
    if unreadable:
        notes.append(f"{len(unreadable)} unreadable image(s) skipped")
    if empty:
        notes.append(f"{len(empty)} empty {key}(s): {', '.join(empty[:5])}" + (" ..." if len(empty) > 5 else ""))
    print(f"blipfast {task}: {written} rows -> {where} in {time.perf_counter() - start:.1f} s (device {gen.device}, "
          f"{str(gen.dtype).replace('torch.', '')})" + (f"; {'; '.join(notes)}" if notes else ""), file=sys.stderr)
    return EXIT_OK
