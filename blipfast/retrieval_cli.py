"""``blipfast retrieval``: LAVIS' BLIP-2 retrieval evaluation of a gallery (image -> text and text -> image
recall@1/5/10 with ITC top-k + ITM re-ranking), on images or on cached image features.

    blipfast retrieval --data coco_karpathy_test.json --images coco/ --model blip2-itm-vit-g/ [--k 128]
    blipfast retrieval --data ann.json --features feats/ --model stage1.pth --config stage1.json

Prints the recall table; writes ``OUT/scores.safetensors`` (``score_i2t`` [N_img, N_txt], ``score_t2i``
[N_txt, N_img], float32) and ``OUT/metrics.json`` (the metrics, k, sizes, seconds per stage).

``--model``: an HF ``Blip2ForImageTextRetrieval`` folder (``save_pretrained``; its vision model reads --images),
a LAVIS checkpoint (``.pth``; ``--vision-config`` builds its EVA ViT for --images), a ``blipfast.Blip2Stage1``
state dict (``.safetensors`` / ``.pt``), or a ``blipfast train`` stage-1 run or checkpoint folder (its config and
tokenizer are the run's). ``--config``: the ``Blip2Stage1Config`` of the LAVIS / blipfast checkpoints as JSON
(``config.to_dict()``; default: the run's, else BLIP-2's). The tokenizer comes from ``--tokenizer``, the run or the
model's folder.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .files import share
from .options import (EXIT_NOT_FINITE, EXIT_OK, EXIT_USAGE, add_device_argument, add_dtype_argument, resolve_device,
                      resolve_dtype)


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="LAVIS retrieval annotation: JSON list (or JSON lines) of "
                   "{\"image\": path, \"caption\": [captions]}")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder that the annotation's image paths are relative to")
    src.add_argument("--features", help="feature cache of the images written by `blipfast cache-features` (ViT tokens "
                     "before ln_vision)")
    p.add_argument("--model", required=True, help="HF Blip2ForImageTextRetrieval folder, LAVIS .pth, or blipfast "
                   "Blip2Stage1 state dict")
    p.add_argument("--config", help="JSON file of the Blip2Stage1Config (LAVIS / blipfast checkpoints)")
    p.add_argument("--vision-config", help="JSON file of an HF Blip2VisionConfig: the LAVIS checkpoint's ViT, for "
                   "--images")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the --model folder)")
    p.add_argument("--k", type=int, default=128, help="candidates re-ranked with ITM per query (default 128, as LAVIS)")
    p.add_argument("--batch-size", type=int, default=1024, help="image-text pairs per ITM pass (default 1024)")
    p.add_argument("--image-batch-size", type=int, default=64, help="images per ViT pass and per K/V group "
                   "(default 64)")
    p.add_argument("--max-txt-len", type=int, default=35, help="caption tokens kept (default 35, as LAVIS)")
    p.add_argument("--workers", type=int, default=4, help="image-reading processes (default 4)")
    add_device_argument(p)
    add_dtype_argument(p, "model dtype")
    p.add_argument("--out", default="retrieval_out", help="folder for scores.safetensors and metrics.json (default: "
                   "./retrieval_out)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.epilog = (f"Exit codes: {EXIT_OK} done; {EXIT_NOT_FINITE} image features or scores are not finite (the "
                f"images are named; metrics.json holds null for the metrics); {EXIT_USAGE} refused (the message names "
                f"the option or file). See docs/troubleshooting.md.")


def _json(path):
    return None if path is None else json.loads(Path(path).read_text())


def load_model(path, config=None, vision_config=None):
    """A ``Blip2Retrieval`` from ``path`` (see the module doc); ``config`` / ``vision_config`` as dicts."""
    from . import convert
    from .models.blip2 import Blip2Stage1, Blip2Stage1Config
    from .models.blip2_retrieval import Blip2Retrieval

    src = convert.resolve_source(path, what="--model")
    if config is None and src.run_config is not None:
        config = src.run_config.get("model")
    cfg = None if config is None else Blip2Stage1Config(**config)
    if src.kind == "hf":
        from transformers import Blip2ForImageTextRetrieval

        try:
            hf = Blip2ForImageTextRetrieval.from_pretrained(src.weights)
        except Exception as e:  # transformers / safetensors raise many kinds for a damaged folder
            raise ValueError(f"--model: cannot load a Blip2ForImageTextRetrieval from {src.weights} "
                             f"({type(e).__name__}: {e}); is model.safetensors missing, empty or truncated?") from None
        return Blip2Retrieval.from_hf(hf.eval(), cfg)
    try:
        sd = convert.load_state_dict(src.weights)
    except (OSError, TypeError, ValueError) as e:
        raise ValueError(f"--model: {e}") from None
    if "ln_vision.weight" in sd and any(k.startswith("qformer.") for k in sd):  # blipfast's own key space
        stage1 = Blip2Stage1(cfg)
        convert.load_into(stage1, sd, ignore=(r"qformer_lm_head\.",), what="--model")  # retrieval needs no LM head
        return Blip2Retrieval.from_stage1(stage1.eval())
    return Blip2Retrieval.from_lavis(sd, cfg, vision_config).eval()


def _tokenizer_dir(args):
    """``--tokenizer``, else the run's tokenizer (a ``blipfast train`` run or checkpoint), else the model's folder."""
    from . import convert

    if args.tokenizer is not None:
        return args.tokenizer
    src = convert.resolve_source(args.model, what="--model")
    if src.run_config is not None and src.run_config.get("tokenizer"):
        return src.run_config["tokenizer"]
    if src.kind == "hf" or Path(args.model).is_dir():
        return args.model
    raise ValueError("--tokenizer is needed when --model is a file")


def _finite_or_none(obj):
    """``obj`` with NaN / Inf floats as None (JSON null: ``NaN`` is not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _check_args(args) -> None:
    for name in ("k", "batch_size", "image_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.max_txt_len < 2:
        raise ValueError(f"--max-txt-len must be >= 2 (a caption's tokens include its start and end tokens; LAVIS "
                         f"uses 35), got {args.max_txt_len}")


def run(args) -> int:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from .retrieval import evaluate, format_metrics, read_annotations

    try:
        _check_args(args)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        gallery = read_annotations(args.data)
        for msg in gallery.problems[:10]:
            print(f"blipfast retrieval: warning: {msg}", file=sys.stderr)
        if len(gallery.problems) > 10:
            print(f"blipfast retrieval: warning: ... {len(gallery.problems) - 10} more (in metrics.json)",
                  file=sys.stderr)
        model = load_model(args.model, _json(args.config), _json(args.vision_config)).to(device=device, dtype=dtype)
        limit = model.config.qformer.max_position_embeddings
        if args.max_txt_len > limit:
            raise ValueError(f"--max-txt-len {args.max_txt_len} exceeds the model's max_position_embeddings ({limit})")
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(args))
        print(f"blipfast retrieval: {len(gallery.images)} images, {len(gallery.texts)} captions, k = {args.k}, "
              f"{device.type} {str(dtype).replace('torch.', '')}", flush=True)
        res = evaluate(model, gallery, tokenizer, images=args.images, features=args.features, k=args.k,
                       batch_size=args.batch_size, image_batch_size=args.image_batch_size,
                       max_txt_len=args.max_txt_len, workers=args.workers, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        print(f"blipfast retrieval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    bad = res["nonfinite_images"]
    nonfinite = bool(bad) or not all(math.isfinite(v) for v in res["metrics"].values())
    if bad:
        print(f"blipfast retrieval: error: the features of {len(bad)} image(s) are not finite (NaN or Inf), so the "
              f"scores and the metrics are not: {', '.join(bad[:10])}" + (" ..." if len(bad) > 10 else ""),
              file=sys.stderr)
    elif nonfinite:
        print("blipfast retrieval: error: the scores are not finite (NaN or Inf) though the image features are: "
              "the model's weights?", file=sys.stderr)
    print(format_metrics(res["metrics"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"score_i2t": res["score_i2t"].float().contiguous(), "score_t2i": res["score_t2i"].float().contiguous()},
              str(out / "scores.safetensors"))
    share(str(out / "scores.safetensors"))  # safetensors writes 0600
    info = {"metrics": res["metrics"], "k": args.k, "images": len(gallery.images), "captions": len(gallery.texts),
            "seconds": res["seconds"], "model": str(args.model), "data": str(args.data), "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "warnings": gallery.problems, "nonfinite_images": bad}
    (out / "metrics.json").write_text(json.dumps(_finite_or_none(info), indent=1, allow_nan=False))
    s = res["seconds"]
    print(f"wrote {out / 'scores.safetensors'} and {out / 'metrics.json'} (scores {s['scores']:.1f} s, total "
          f"{s['total']:.1f} s)")
    return EXIT_NOT_FINITE if nonfinite else EXIT_OK
