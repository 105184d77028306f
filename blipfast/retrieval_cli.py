"""``blipfast retrieval``: image -> text and text -> image recall@1/5/10 of a gallery with ITC top-k + ITM
re-ranking, on images or on cached image features: LAVIS' BLIP-2 evaluation, or Salesforce BLIP's
(``train_retrieval.py``) with BLIP (v1) models.

    blipfast retrieval --data coco_karpathy_test.json --images coco/ --model blip2-itm-vit-g/ [--k 128]
    blipfast retrieval --data ann.json --features feats/ --model stage1.pth --config stage1.json
    blipfast retrieval --data coco_karpathy_test.json --images coco/ --model model_base_retrieval_coco.pth \
        --tokenizer bert-base-uncased/

Prints the recall table; writes ``OUT/scores.safetensors`` (``score_i2t`` [N_img, N_txt], ``score_t2i``
[N_txt, N_img], float32) and ``OUT/metrics.json`` (the metrics, k, sizes, seconds per stage).

``--model``, BLIP-2: an HF ``Blip2ForImageTextRetrieval`` folder (``save_pretrained``; its vision model reads
--images), a LAVIS checkpoint (``.pth``; ``--vision-config`` builds its EVA ViT for --images), a
``blipfast.Blip2Stage1`` state dict (``.safetensors`` / ``.pt``), or a ``blipfast train`` stage-1 or
``blip2-retrieval`` run or checkpoint folder (its config and tokenizer are the run's; a ``blip2-retrieval`` run's
trained ViT reads --images). ``--config``: the ``Blip2Stage1Config`` of the LAVIS / blipfast
checkpoints as JSON (``config.to_dict()``; default: the run's, else BLIP-2's).

``--model``, BLIP (v1), scored by :class:`blipfast.models.blip_retrieval.BlipRetrieval` (``k`` defaults to its
``k_test``, 256 as BLIP's COCO recipe): an HF ``BlipForImageTextRetrieval`` folder, a Salesforce BLIP ``.pth``
(retrieval, ITM or pre-training checkpoints; sizes read from the weights, ``--config`` a ``BlipRetrievalConfig``
JSON over them; ``--tokenizer`` the BERT tokenizer, to which BLIP's [DEC] and [ENC] are added), or a ``blipfast
train`` run of ``blip-retrieval`` or ``blip-pretrain``. The tokenizer comes from ``--tokenizer``, the run or the
model's folder.

``--video`` (BLIP (v1) models): the annotation's ``image`` paths are videos under ``--images`` (folders of frames or
video files), ``--num-frames`` (8) sampled uniformly from each, scored as Salesforce BLIP's zero-shot text-video
retrieval (``eval_retrieval_video.py``; :func:`blipfast.retrieval.video_score_matrices`).

    blipfast retrieval --data msrvtt_test.json --images videos/ --video --model model_base_retrieval_coco.pth \
        --tokenizer bert-base-uncased/
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
    p.add_argument("--model", required=True, help="HF Blip2ForImageTextRetrieval or BlipForImageTextRetrieval "
                   "folder, LAVIS or Salesforce BLIP .pth, blipfast Blip2Stage1 state dict, or a blipfast train run")
    p.add_argument("--config", help="JSON file of the Blip2Stage1Config (LAVIS / blipfast checkpoints) or of the "
                   "BlipRetrievalConfig (Salesforce BLIP .pth; default: the sizes of its weights)")
    p.add_argument("--vision-config", help="JSON file of an HF Blip2VisionConfig: the LAVIS checkpoint's ViT, for "
                   "--images")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the --model folder)")
    p.add_argument("--k", type=int, help="candidates re-ranked with ITM per query (default: LAVIS' 128 for BLIP-2, "
                   "the model's k_test for BLIP: 256 as BLIP's COCO recipe)")
    p.add_argument("--batch-size", type=int, default=1024, help="image-text pairs per ITM pass (default 1024)")
    p.add_argument("--image-batch-size", type=int, default=64, help="images per ViT pass and per K/V group "
                   "(default 64)")
    p.add_argument("--max-txt-len", type=int, default=35, help="caption tokens kept (default 35, as LAVIS)")
    p.add_argument("--workers", type=int, default=4, help="image-reading processes (default 4)")
    p.add_argument("--video", action="store_true", help="BLIP (v1) models: the annotation's image paths are videos "
                   "under --images (folders of frames or video files): --num-frames frames each, ITC on the mean of "
                   "their projected [CLS] tokens, ITM on their tokens concatenated (BLIP's zero-shot video retrieval)")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly per video with --video "
                   "(default 8, as the BLIP paper)")
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


def blip_source(path):
    """(is a BLIP (v1) model, its state dict when ``path`` is a weights file that was read to tell, else None)."""
    from . import convert

    src = convert.resolve_source(path, what="--model")
    if src.run_config is not None:
        run = src.run_config
        return run.get("task") in ("blip-retrieval", "blip-pretrain") or (run.get("model") or {}).get("name") == \
            "blip", None
    if src.kind == "hf":
        return (src.hf_config or {}).get("model_type") == "blip", None
    sd = convert.load_state_dict(src.weights)
    return any(k.startswith(("text_encoder.", "text_decoder.")) for k in sd), sd


def load_blip_model(path, tokenizer, config=None, state_dict=None):
    """A ``BlipRetrieval`` from ``path`` (an HF ``BlipForImageTextRetrieval`` folder, a Salesforce BLIP ``.pth``, a
    ``blip-retrieval`` or ``blip-pretrain`` run; ``state_dict``: its weights when already read); ``config``: a
    ``BlipRetrievalConfig`` dict over what the run, the weights and the tokenizer (its [ENC]) tell."""
    from . import convert
    from .models.blip_retrieval import BlipRetrieval, BlipRetrievalConfig

    src = convert.resolve_source(path, what="--model")
    over = {"enc_token_id": tokenizer.convert_tokens_to_ids("[ENC]"), **(config or {})}
    if src.kind == "hf":
        from transformers import BlipForImageTextRetrieval

        model = BlipRetrieval.from_hf(BlipForImageTextRetrieval.from_pretrained(src.weights))
        model.config = BlipRetrievalConfig(**{**model.config.to_dict(), **over})  # fields read at run time
        return model.eval()
    sd = state_dict if state_dict is not None else convert.load_state_dict(src.weights)
    if src.run_config is not None:  # the run's sizes (a blip-pretrain run's fields that retrieval has)
        saved = src.run_config.get("model") or {}
        cfg = {k: v for k, v in saved.items() if k in BlipRetrievalConfig.FIELDS + ("text", "vision")}
    else:
        ids = {"pad_token_id": tokenizer.pad_token_id, "sep_token_id": tokenizer.sep_token_id,
               "bos_token_id": tokenizer.bos_token_id}
        cfg = BlipRetrievalConfig.from_state_dict(convert.to_hf(sd)[0].state_dict, text=ids,
                                                  enc_token_id=over["enc_token_id"]).to_dict()
    model = BlipRetrieval(BlipRetrievalConfig(**{**cfg, **over}))
    model.load_lavis_state_dict(sd)
    return model.eval()


def load_model(path, config=None, vision_config=None, state_dict=None):
    """A ``Blip2Retrieval`` from ``path`` (see the module doc); ``config`` / ``vision_config`` as dicts;
    ``state_dict``: its weights when already read."""
    from . import convert
    from .models.blip2 import Blip2Stage1, Blip2Stage1Config
    from .models.blip2_retrieval import Blip2Retrieval

    src = convert.resolve_source(path, what="--model")
    tuned = ((src.hf_config or {}).get("blipfast") or {}).get("task") == "blip2-retrieval"  # its ViT trained
    if config is None and tuned:  # the stage-1 fields of its run (the run's model also records the ViT's)
        config = src.hf_config["blipfast"]["stage1"]
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
        sd = state_dict if state_dict is not None else convert.load_state_dict(src.weights)
    except (OSError, TypeError, ValueError) as e:
        raise ValueError(f"--model: {e}") from None
    if tuned:
        return _tuned_model(sd, cfg, src.hf_config["vision_config"])
    if "ln_vision.weight" in sd and any(k.startswith("qformer.") for k in sd):  # blipfast's own key space
        stage1 = Blip2Stage1(cfg)
        convert.load_into(stage1, sd, ignore=(r"qformer_lm_head\.",), what="--model")  # retrieval needs no LM head
        return Blip2Retrieval.from_stage1(stage1.eval())
    return Blip2Retrieval.from_lavis(sd, cfg, vision_config).eval()


def _tuned_model(sd, cfg, vision_config):
    """A ``blipfast train --task blip2-retrieval`` checkpoint (HF names, the ViT's config in its config.json)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from . import convert
    from .models.blip2 import Blip2Stage1
    from .models.blip2_retrieval import Blip2Retrieval

    ln = "vision_model.post_layernorm."
    stage1 = Blip2Stage1(cfg)
    convert.load_into(stage1, {k: v for k, v in sd.items() if not k.startswith("vision_model.") or k.startswith(ln)},
                      ignore=(r"qformer_lm_head\.",), what="--model")
    vm = Blip2VisionModel(Blip2VisionConfig(**vision_config))
    convert.load_into(vm, {k: v for k, v in sd.items() if k.startswith("vision_model.") and not k.startswith(ln)},
                      prefix="vision_model.", ignore=(r"post_layernorm\.",), what="--model")
    vm.post_layernorm = stage1.ln_vision
    return Blip2Retrieval.from_stage1(stage1.eval(), vm.eval())


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
        if getattr(args, name) is not None and getattr(args, name) < 1:  # --k None: the model's default
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_frames < 1:
        raise ValueError(f"--num-frames must be >= 1, got {args.num_frames}")
    if args.video and args.features is not None:
        raise ValueError("--video reads the videos under --images; --features holds image features")
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
        blip, sd = blip_source(args.model)
        if blip:
            from .data.tokenizer import add_enc_token, load_tokenizer

            tokenizer = add_enc_token(load_tokenizer(_tokenizer_dir(args)))
            model = load_blip_model(args.model, tokenizer, _json(args.config), sd).to(device=device, dtype=dtype)
            k = model.config.k_test if args.k is None else args.k
            args.max_txt_len = min(args.max_txt_len, model.config.text.max_position_embeddings)
        elif args.video:
            raise ValueError(f"--video needs a BLIP (v1) retrieval model (a blip-retrieval run, a Salesforce BLIP "
                             f".pth or an HF BlipForImageTextRetrieval folder); {args.model} is a BLIP-2 model, whose "
                             f"zero-shot video retrieval blipfast does not do")
        else:
            model = load_model(args.model, _json(args.config), _json(args.vision_config), sd).to(device=device,
                                                                                                    dtype=dtype)
            limit = model.config.qformer.max_position_embeddings
            if args.max_txt_len > limit:
                raise ValueError(f"--max-txt-len {args.max_txt_len} exceeds the model's max_position_embeddings "
                                 f"({limit})")
            tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(args))
            k = 128 if args.k is None else args.k
        items = f"videos ({args.num_frames} frames each)" if args.video else "images"
        print(f"blipfast retrieval: {len(gallery.images)} {items}, {len(gallery.texts)} captions, k = {k}, "
              f"{device.type} {str(dtype).replace('torch.', '')}", flush=True)
        res = evaluate(model, gallery, tokenizer, images=args.images, features=args.features, k=k,
                       batch_size=args.batch_size, image_batch_size=args.image_batch_size,
                       max_txt_len=args.max_txt_len, workers=args.workers, progress=not args.no_progress,
                       video=args.video, num_frames=args.num_frames)
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
    info = {"metrics": res["metrics"], "k": k, "images": len(gallery.images), "captions": len(gallery.texts),
            "seconds": res["seconds"], "model": str(args.model), "data": str(args.data), "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "warnings": gallery.problems, "nonfinite_images": bad,
            **({"video": True, "num_frames": args.num_frames} if args.video else {})}
    (out / "metrics.json").write_text(json.dumps(_finite_or_none(info), indent=1, allow_nan=False))
    s = res["seconds"]
    print(f"wrote {out / 'scores.safetensors'} and {out / 'metrics.json'} (scores {s['scores']:.1f} s, total "
          f"{s['total']:.1f} s)")
    return EXIT_NOT_FINITE if nonfinite else EXIT_OK
