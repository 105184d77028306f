"""The options of ``blipfast train``: one table gives the command-line flags, the config-file keys, their types,
defaults and help, and the resolved ``config.yaml`` written into every run folder.

Precedence: built-in defaults < the task's recipe (:attr:`Task.defaults <blipfast.train.tasks.base.Task>`: LAVIS'
``pretrain_stage2`` for ``blip2-stage2``, Salesforce BLIP's ``configs/pretrain.yaml`` for ``blip-pretrain``) < the
synthetic set's defaults (only without ``--data``) < ``--config FILE`` < flags given on the command line. A config
file is YAML (``.yaml``/``.yml``) or TOML (``.toml``) with the flags' names as keys (``batch_size`` or
``batch-size``); an unknown key or a value of the wrong type is refused before anything starts.

``task`` names what is trained (:mod:`blipfast.train.tasks`); ``--stage 2`` and ``--model blip`` are the older
spellings of ``blip2-stage2`` and ``blip-pretrain`` and keep working (:func:`task_of`); the resolved task and its
``stage`` are recorded. ``model`` is a mapping of the task's model configuration fields over the ``preset``
(stage 1: :class:`blipfast.Blip2Stage1Config` fields with a nested ``qformer`` mapping of
:class:`blipfast.QFormerConfig` fields; the fields that follow from the tokenizer and the vision model and
``max_txt_len`` are filled in by the task); the run's ``config.yaml`` records the configuration the task resolved.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Any

from ..data.image_stream import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEY
from ..data.shards import input_kind
from ..data.transforms import TRAINING_RECIPES
from ..options import DTYPES, EXIT_STOPPED
from .optim import PARAM_GROUPS, SCHEDULES
from .param_groups import REFERENCE_RULE
from .schedules import REFERENCE_SHAPE
from .tasks import task_class, task_names

DTYPE_NAMES = tuple(sorted(DTYPES))
STREAMS = ("shards", "feature-shards")  # the input kinds (blipfast.data.shards.input_kind) that are streamed

# name -> (type, default, help); type is one of int, float, str, bool, "floats" (a pair), "mapping".
# None as default: unset (derived or optional).
OPTIONS: dict = {
    # what is trained
    "task": (str, None, "what is trained: blip2-stage1 (BLIP-2 stage 1, the default), blip2-stage2 (what --stage 2 "
             "names) or blip-pretrain (what --model blip names); see blipfast.train.tasks"),
    "stage": (int, 1, "1: BLIP-2 stage 1 (ITC + ITM + ITG of the Q-Former, blipfast.Blip2Stage1); 2: stage 2 "
              "(blipfast.Blip2Stage2: the Q-Former bridged to the frozen LLM of --llm by an LM loss on the "
              "captions; needs --init, a stage-1 checkpoint); the older spelling of --task blip2-stage1 / "
              "blip2-stage2"),
    "llm": (str, None, "stage 2: local Hugging Face LLM folder (decoder-only such as OPT, or seq2seq such as "
            "Flan-T5) with its tokenizer; frozen"),
    "llm_dtype": (str, "auto", "stage 2: dtype the frozen LLM runs in: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 "
                  "or fp32"),
    "prompt": (str, "", "stage 2: text before every caption whose tokens get no loss (label -100), e.g. 'a photo "
               "of'; decoder-only LLMs read prompt + ' ' + caption, seq2seq LLMs take the prompt in the encoder"),
    "text_suffix": (str, None, "stage 2, decoder-only LLMs: appended to every caption (default: the tokenizer's "
                    "EOS token; LAVIS' OPT recipe appends a newline)"),
    # data
    "data": (str, None, "annotation file: JSONL or the JSON list of LAVIS/BLIP, rows {'image': path relative to "
             "--images, 'caption': text or list of texts}; or WebDataset shards, streamed (img2dataset's layout: "
             "'shards/{00000..01743}.tar', a folder of .tar files, a text file listing shards, URLs or 'pipe:' "
             "commands; with --vision, or --model blip; needs --tokenizer); without it (and without feature shards) "
             "a synthetic set is generated"),
    "images": (str, None, "folder the annotation's image paths are relative to (with --vision)"),
    "vision": (str, None, "local Hugging Face vision model folder (Blip2VisionModel, CLIPVisionModel, "
               "SiglipVisionModel, a composite BLIP-2/CLIP/SigLIP checkpoint or an AutoModel tower) with its "
               "image processor config; frozen. With --model blip: a BlipVisionModel or BLIP folder whose weights "
               "start the trainable ViT (optional: without it the ViT starts from random weights or --init)"),
    "features": (str, None, "vision features written by `blipfast cache-features` (instead of --images/--vision; not "
                 "with --model blip, whose ViT trains): feature shards (from shards: they hold the captions, no "
                 "--data; streamed, needs --tokenizer) or the cache of an annotation file (with that --data)"),
    "tokenizer": (str, None, "stage 1: local BERT-style Hugging Face tokenizer folder ([DEC] is added as bos, as "
                  "LAVIS does); default: train a WordPiece vocabulary on the captions and save it in the run folder. "
                  "Stage 2: the LLM's tokenizer (default: the --llm folder's)"),
    "shuffle_buffer": (int, 1000, "shards and feature shards: samples in each loader worker's shuffle buffer "
                       "(the shard order is shuffled every pass too; deterministic under --seed)"),
    "samples_per_epoch": (int, None, "shards and feature shards: samples in an epoch (steps per epoch = this // "
                          "(batch x processes)); default: what a sizes.json, __len__ or img2dataset's *_stats.json "
                          "beside the shards says (feature shards: their pairs); required for a stream without them"),
    "resampled": (bool, False, "shards and feature shards: draw the shards with replacement (as OpenCLIP's "
                  "--dataset-resampled) instead of reading each once per pass"),
    "image_key": (str, DEFAULT_IMAGE_KEY, "WebDataset shards: the image is the first present of these "
                  "';'-separated extensions"),
    "caption_key": (str, DEFAULT_CAPTION_KEY, "WebDataset shards: the caption is the first present of these "
                    "';'-separated candidates (an extension's text, or EXT:FIELD, a field of a JSON file)"),
    "log_keys": (bool, False, "write the sample keys of every micro-batch to RUN/keys-rank<R>.txt (an audit of "
                 "the data order; pair numbers for an annotation file)"),
    "vocab_size": (int, 30522, "stage 1: WordPiece vocabulary size when training the tokenizer"),
    "max_txt_len": (int, 32, "caption tokens (padded/truncated; LAVIS: 32, BLIP: 30)"),
    "image_ids": (bool, True, "stage 1: pairs showing the same image (annotation 'image_id', else the image path) are "
                  "ITC positives and never each other's ITM negatives, as LAVIS does with image ids (default off with "
                  "--model blip: BLIP_Pretrain has none)"),
    "feature_dtype": (str, "bf16", "dtype the vision tokens are rounded to when training from images (the "
                      "dtype cache-features stores; bf16, fp16 or fp32)"),
    "vision_dtype": (str, "auto", "dtype the frozen vision model runs in: auto (bf16 on CUDA, fp32 on CPU), "
                     "bf16, fp16 or fp32"),
    "num_workers": (int, None, "DataLoader workers per process (default: 0 on CPU, min(8, cores / processes) "
                    "on CUDA; streams: at most shards / processes). A stream resumes exactly with the same number"),
    "synthetic_size": (int, 512, "pairs in the synthetic set (without --data)"),
    "eval_data": (str, None, "annotation of the evaluation split (images under --images; e.g. BLIP's "
                  "coco_karpathy_test.json: {'image', 'caption': [references]}; blip-vqa: questions with their human "
                  "answers, LAVIS' vqa_val_eval.json; blip-nlvr: nlvr_dev.json) for --eval-every; without --data the "
                  "synthetic set's evaluation file"),
    "eval_every": (int, 0, "evaluate the model at the end of every N-th epoch (tasks with an evaluation: "
                   "blip-retrieval, blip-caption, blip-vqa, blip-nlvr), written to RUN/eval.jsonl; 0: never"),
    "answer_list": (str, None, "blip-vqa: the candidate answers of the evaluation's rank inference (BLIP's "
                    "answer_list.json, a JSON list of strings); needed by --eval-every unless the run trains on the "
                    "synthetic set (then its answer list)"),
    # model
    "preset": (str, "auto", "stage 1: Q-Former size: base (LAVIS stage 1: BERT-base, 32 queries, 256-d ITC; --model "
               "blip: ViT-B/16 at 224 px, BERT-base MED), tiny (a CPU-sized test model) or auto (tiny for the "
               "synthetic set, else base)"),
    "model": ("mapping", None, "stage 1: Blip2Stage1Config fields over the preset, JSON on the command line, e.g. "
              "'{\"num_query_tokens\": 16, \"qformer\": {\"num_hidden_layers\": 6}}'; stage 2: the stage-1 "
              "checkpoint's {\"qformer\": {QFormerConfig fields}, \"ln_vision_eps\": x} over what its run folder "
              "or config.json says (e.g. dropout). `blip` (or {\"name\": \"blip\", ...BlipPretrainConfig fields}) "
              "trains BLIP (v1) pre-training instead (--task blip-pretrain: ITC with momentum queues, ITM, LM; the "
              "ViT trains; BlipPretrainConfig fields)"),
    "init": (str, None, "stage 1: start from these weights: a LAVIS stage-1 .pth (Blip2Stage1.from_lavis) or a "
             "blipfast run or checkpoint folder / model.safetensors. Stage 2 (required): the stage-1 checkpoint: a "
             "blipfast run or checkpoint folder, a LAVIS .pth, or an HF/blipfast-named safetensors file or folder. "
             "--model blip: a Salesforce BLIP .pth (model_base.pth) or a blipfast run or checkpoint"),
    # optimisation (docs/semantics.md#stage-1-recipe)
    "batch_size": (int, 100, "image-text pairs per process and micro-step (LAVIS: 100 per GPU; stage 2: 64)"),
    "grad_accum": (int, 1, "micro-steps per optimizer step (the loss is averaged over them)"),
    "steps": (int, None, "optimizer steps (unset: what --epochs gives)"),
    "epochs": (float, None, "passes over the data when --steps is not given (unset: 10)"),
    "lr": (float, 1e-4, "peak learning rate"),
    "warmup_lr": (float, 1e-6, "learning rate of the first step; linear warm-up from it to --lr"),
    "warmup_steps": (int, 5000, "linear warm-up steps (--schedule reference: iterations of epoch 0)"),
    "min_lr": (float, 1e-5, "learning rate at the end of the cosine decay"),
    "weight_decay": (float, 0.05, "AdamW weight decay (on the parameters --param-groups says)"),
    "schedule": (str, "reference", "learning-rate shape: reference (the default: the task recipe's reference, "
                 "BLIP pre-training a warm-up in epoch 0 then lr * 0.9 ** epoch, BLIP fine-tuning and BLIP-2 a "
                 "warm-up in epoch 0 then a cosine per epoch; docs/training.md) or cosine-per-step (linear warm-up, "
                 "then a cosine evaluated at every step)"),
    "param_groups": (str, "reference", "weight-decay groups: reference (the default: the task recipe's reference "
                     "rule, BLIP decays every parameter, BLIP-2 LAVIS' Blip2Base rule) or lavis (no decay on biases "
                     "and parameters under 2 dimensions) or layer-decay (the reference groups with LAVIS' layer-wise lr_scale "
                     "of a trained ViT multiplied into their learning rate, which LAVIS' schedulers do not)"),
    "augment": (str, "auto", "train-time image augmentation: reference (the task recipe's: a random resized crop and "
                "a flip, with BLIP's RandomAugment for BLIP; docs/training.md#augmentation), none (the vision model's "
                "evaluation processor) or auto (reference where images are decoded, none with --features: a "
                "feature cache holds its views, augmented ones with cache-features --views N)"),
    "caption_sampling": (str, "all", "an image's captions: all (each its own pair, every one trained every epoch) or "
                         "random (one drawn per visit of the image, deterministic under --seed, an epoch one pass "
                         "over the images: BLIP-2's use of `capfilt --mode blip2`'s two captions; docs/training.md)"),
    "betas": ("floats", [0.9, 0.999], "AdamW betas (LAVIS: 0.9 0.999; the paper: 0.9 0.98)"),
    "eps": (float, 1e-8, "AdamW epsilon"),
    "grad_clip": (float, 0.0, "clip the gradient norm to this (0: off, as LAVIS)"),
    "precision": (str, "auto", "fp32, bf16 or fp16 autocast (fp16 with a GradScaler); auto: bf16 on CUDA, fp32 "
                  "on CPU"),
    "compile": (bool, False, "torch.compile the model step"),
    "compile_backend": (str, "inductor", "torch.compile backend"),
    "cuda_graph": (bool, False, "stage 1: capture forward + backward + optimizer step in CUDA graphs (capturable "
                   "AdamW, static input buffers; CUDA, one process, bf16/fp32, no --grad-clip)"),
    "fsdp": (bool, False, "shard the model over the torchrun processes with FSDP2 instead of DDP (the frozen LLM, "
             "the trained weights and their AdamW states; DCP sharded checkpoints; docs/fsdp.md): blip2-stage1, "
             "blip2-stage2, blip2-caption; not with --cuda-graph, --precision fp16 or --eval-every"),
    "device": (str, "auto", "cpu, cuda or auto (cuda when available; cuda:LOCAL_RANK under torchrun)"),
    "seed": (int, 42, "random seed (weights, data order, dropout, negatives)"),
    # output
    "out": (str, None, "run folder (default ./runs/<timestamp>)"),
    "save_every": (int, 1000, "write a checkpoint every this many steps (0: only at the end)"),
    "keep": (int, 3, "checkpoints kept (the oldest are deleted)"),
    "save_lavis": (bool, False, "also write each checkpoint's weights as a LAVIS .pth (LAVIS names; stage 2: the "
                   "trained parts, with opt_proj / t5_proj)"),
    "log_every": (int, 10, "steps per row of log.jsonl and per progress-bar update"),
    "plot_every": (int, 100, "steps between refreshes of loss.png"),
    "progress": (bool, True, "tqdm progress bar"),
    "stop_after": (int, None, "stop this invocation after this step, with a checkpoint (the schedule still runs to "
                   f"--steps; continue with --resume); the command then exits {EXIT_STOPPED}, as when SIGTERM or "
                   f"SIGINT stops it"),
}

AUGMENTS = ("auto", "reference", "none")  # --augment (resolved by the trainer: auto -> reference or none)
# what a run folder whose config.yaml lacks these options trained with (the defaults before they existed / changed)
LEGACY_DEFAULTS = {"augment": "none", "schedule": "cosine-per-step", "param_groups": "lavis"}

# the keys a --resume may change (the others are the run's and must stay as config.yaml has them)
RESUME_MUTABLE = {"save_every", "keep", "save_lavis", "log_every", "plot_every", "progress", "stop_after",
                  "num_workers", "log_keys", "compile", "compile_backend", "cuda_graph", "device", "eval_every",
                  "eval_data", "answer_list"}

MODEL_NAMES = ("blip2", "blip")  # --model NAME; a mapping names its model with "name" (absent: blip2)


def model_name(model) -> str:
    """The model a ``model`` option trains: "blip2" (BLIP-2, the default) or "blip" (BLIP v1 pre-training)."""
    name = (model or {}).get("name", "blip2") if isinstance(model, dict) else "blip2"
    if name not in MODEL_NAMES:
        raise ValueError(f"--model: unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    return name


def task_of(options: dict) -> str:
    """The task ``options`` train: ``task``, or what its older spellings say (``stage`` 2: blip2-stage2, a
    ``model`` named blip: blip-pretrain), else blip2-stage1; ValueError when they contradict each other."""
    stage, blip = options.get("stage"), model_name(options.get("model")) == "blip"
    if stage == 2 and blip:
        raise ValueError("--model blip is BLIP (v1) pre-training; --stage 2 is BLIP-2's")
    legacy = "blip2-stage2" if stage == 2 else "blip-pretrain" if blip else None
    task = options.get("task")
    if task is not None and legacy is not None and task != legacy:
        raise ValueError(f"--task {task} contradicts {'--stage 2' if stage == 2 else '--model blip'} (the task "
                         f"{legacy})")
    return task or legacy or "blip2-stage1"


# defaults that change without --data: the synthetic set trains a tiny model for a couple of minutes on a CPU
SYNTHETIC_DEFAULTS = {"batch_size": 16, "steps": 150, "warmup_steps": 10, "lr": 2e-3, "min_lr": 1e-4,
                      "vocab_size": 256, "max_txt_len": 16, "save_every": 0, "log_every": 5, "plot_every": 20}

CHOICES = {"stage": (1, 2), "feature_dtype": DTYPE_NAMES, "vision_dtype": ("auto", *DTYPE_NAMES),
           "llm_dtype": ("auto", *DTYPE_NAMES), "preset": ("auto", "base", "tiny"),
           "precision": ("auto", *DTYPE_NAMES), "task": task_names(), "schedule": SCHEDULES,
           "param_groups": PARAM_GROUPS, "augment": AUGMENTS, "caption_sampling": ("all", "random")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_help(name: str, default) -> str:
    """The help's "(default: ...)": the built-in default, each task recipe's own, and the synthetic set's (what a
    run without --data uses)."""
    shown = [json.dumps(default)] if default is not None else []
    for task in task_names():
        if name in task_class(task).defaults and task_class(task).defaults[name] != default:
            shown.append(f"--task {task}: {json.dumps(task_class(task).defaults[name])}")
    if name in SYNTHETIC_DEFAULTS:
        shown.append(f"without --data (the synthetic set): {json.dumps(SYNTHETIC_DEFAULTS[name])}")
    return f" (default: {'; '.join(shown)})" if shown else ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option as a flag (default: unset, so that config files and defaults can be told apart); the help shows
    which default applies when (built in, a task's recipe, the synthetic set's)."""
    p.add_argument("--config", help="YAML or TOML file with any of the options below as keys")
    p.add_argument("--resume", help="continue the run in this folder (or from this checkpoint folder) from its "
                   "last checkpoint; the run's config.yaml is used, flags may change only "
                   + ", ".join(_flag(k) for k in sorted(RESUME_MUTABLE)))
    for name, (typ, default, help_) in OPTIONS.items():
        kw: dict = {"dest": name, "default": argparse.SUPPRESS, "help": help_ + _default_help(name, default)}
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typ == "floats":
            kw.update(type=float, nargs=2, metavar=("B1", "B2"))
        elif typ == "mapping":
            kw.update(type=str, metavar="JSON")
        else:
            kw["type"] = typ
            if name in CHOICES:
                kw["choices"] = CHOICES[name]
        p.add_argument(_flag(name), **kw)


def _coerce(name: str, value: Any, where: str) -> Any:
    """``value`` checked (and converted where harmless: '1e-4' strings of YAML 1.1, ints for floats)."""
    typ = OPTIONS[name][0]

    def bad(want):
        return ValueError(f"{where}: {name} must be {want}, got {value!r}")

    if value is None:
        return None
    if typ is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif typ is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            raise bad("a string")
    elif typ == "floats":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise bad("a list of two numbers")
        value = [_coerce_float(name, v, where) for v in value]
    elif typ == "mapping":
        if isinstance(value, str) and name == "model" and value.strip() in MODEL_NAMES:  # --model blip
            value = {"name": value.strip()}
        elif isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                if name == "model":
                    raise ValueError(f"{where}: {value!r} is neither a model ({', '.join(MODEL_NAMES)}) nor a JSON "
                                     f"mapping ({exc.msg})") from None
                raise ValueError(f"{where}: {name} is not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise bad("a mapping")
    if name in CHOICES and value not in CHOICES[name]:
        raise bad(f"one of {', '.join(CHOICES[name])}")
    return value


def _coerce_float(name, v, where):
    try:
        if isinstance(v, bool):
            raise TypeError
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must hold numbers, got {v!r}") from None


def read_config_file(path: str) -> dict:
    """The options in a YAML or TOML file (keys normalised to underscores; unknown keys refused)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config: {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        elif ext in (".yaml", ".yml"):
            import yaml

            with open(path) as fh:
                raw = yaml.safe_load(fh) or {}
        else:
            raise ValueError(f"--config: {path!r} must end in .yaml, .yml or .toml")
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError (a ValueError), UnicodeDecodeError
        if str(exc).startswith("--config: "):  # the extension message above
            raise
        raise ValueError(f"--config: cannot parse {path!r}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config: {path!r} must hold a mapping of options, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            near = difflib.get_close_matches(name, list(OPTIONS), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"--config: unknown key {key!r} in {path!r}{hint}; known keys: {', '.join(OPTIONS)}")
        out[name] = _coerce(name, value, f"--config {path}")
    return out


def resolve(args: argparse.Namespace) -> tuple[dict, dict]:
    """(options, explicitly given ones) from defaults, the synthetic defaults, --config and the flags."""
    given = {k: _coerce(k, v, _flag(k)) for k, v in vars(args).items() if k in OPTIONS}
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    cfg = {k: v[1] for k, v in OPTIONS.items()}
    chosen = {**from_file, **given}
    task = task_class(task_of(chosen))
    cfg.update(task.defaults)
    if chosen.get("data") is None and chosen.get("features") is None:
        cfg.update(SYNTHETIC_DEFAULTS)
    cfg.update(from_file)
    cfg.update(given)
    cfg["task"], cfg["stage"] = task.name, task.stage
    # the references' recipes are the defaults; a task whose recipe has none keeps the alternative unless asked
    for key, fallback, references in (("schedule", "cosine-per-step", REFERENCE_SHAPE),
                                      ("param_groups", "lavis", REFERENCE_RULE)):
        if key not in chosen and cfg[key] == "reference" and task.recipe not in references:
            cfg[key] = fallback
    return cfg, {**from_file, **given}



def validate(cfg: dict) -> None:
    """Refuse inconsistent or out-of-range options before anything starts (ValueError naming the flag)."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    for name in ("batch_size", "grad_accum", "max_txt_len", "vocab_size", "log_every", "keep", "synthetic_size"):
        need(cfg[name] >= 1, f"{_flag(name)} must be >= 1, got {cfg[name]}")
    need(cfg["max_txt_len"] >= 2, f"--max-txt-len must be >= 2 (a caption's tokens include its start and end "
         f"tokens; LAVIS uses 32), got {cfg['max_txt_len']}")
    for name in ("warmup_steps", "save_every", "plot_every", "shuffle_buffer"):
        need(cfg[name] >= 0, f"{_flag(name)} must be >= 0, got {cfg[name]}")
    for name in ("steps", "stop_after", "num_workers", "samples_per_epoch"):
        need(cfg[name] is None or cfg[name] >= (0 if name == "num_workers" else 1),
             f"{_flag(name)} must be >= {0 if name == 'num_workers' else 1}, got {cfg[name]}")
    need(cfg["epochs"] is None or cfg["epochs"] > 0, f"--epochs must be > 0, got {cfg['epochs']}")
    for name in ("lr", "warmup_lr", "eps"):
        need(cfg[name] > 0, f"{_flag(name)} must be > 0, got {cfg[name]}")
    need(cfg["min_lr"] >= 0, f"--min-lr must be >= 0, got {cfg['min_lr']}")  # BLIP's fine-tuning decays to 0
    need(cfg["eval_every"] >= 0, f"--eval-every must be >= 0, got {cfg['eval_every']}")
    need(cfg["weight_decay"] >= 0 and cfg["grad_clip"] >= 0, "--weight-decay and --grad-clip must be >= 0")
    need(all(0 <= b < 1 for b in cfg["betas"]), f"--betas must lie in [0, 1), got {cfg['betas']}")
    kind = input_kind(cfg["data"], cfg["features"])
    need(not (cfg["features"] and kind == "synthetic"), f"--features {cfg['features']}: a feature cache of an "
         f"annotation file needs that --data (the captions); feature shards (`blipfast cache-features` on "
         f"WebDataset shards) hold their captions")
    need(not (kind == "feature-shards" and cfg["data"] is not None), "--features: feature shards hold their "
         "captions; leave out --data")
    need(not (kind == "shards" and cfg["images"] is not None), "--images is for annotation files: WebDataset "
         "shards hold their images")
    need(kind in STREAMS or (cfg["samples_per_epoch"] is None and not cfg["resampled"]),
         "--samples-per-epoch and --resampled are options of streamed data (WebDataset shards, feature shards)")
    task = task_class(task_of(cfg))
    need(cfg["schedule"] != "reference" or task.recipe in REFERENCE_SHAPE,
         f"--schedule reference: {task.spelling or task.name} has no reference schedule (its recipe is "
         f"{task.recipe!r}); use --schedule cosine-per-step")
    need(cfg["param_groups"] not in ("reference", "layer-decay") or task.recipe in REFERENCE_RULE,
         f"--param-groups {cfg['param_groups']}: {task.spelling or task.name} has no reference rule (its recipe is "
         f"{task.recipe!r}); use --param-groups lavis")
    need(not (cfg["augment"] == "reference" and cfg["features"] is not None),
         "--augment reference: a feature cache holds the views computed before training (augmented ones with "
         "`blipfast cache-features --views N`, which training cycles through); augment the images with --images DIR "
         "--vision MODEL_DIR, or train on the cache with --augment none")
    need(cfg["augment"] != "reference" or task.recipe in TRAINING_RECIPES,
         f"--augment reference: {task.spelling or task.name} has no reference train transform (its recipe is "
         f"{task.recipe!r}); use --augment none")
    need(cfg["caption_sampling"] == "all" or kind not in STREAMS, "--caption-sampling random draws among an "
         "annotation file's captions of an image; streamed shards hold one sample per caption (use --caption-sampling "
         "all)")
    need(cfg["answer_list"] is None or task.takes_answer_list,
         f"--answer-list is an option of --task blip-vqa (the candidates of VQA rank inference), not of "
         f"{task.spelling or '--task ' + task.name}")
    task.check_options(cfg)  # before the generic pairing: a task's refusal names its reason
    need(not (cfg["features"] and (cfg["images"] or cfg["vision"])),
         "give either --features or --images/--vision, not both")
    if cfg["cuda_graph"]:
        need(cfg["precision"] != "fp16", "--cuda-graph does not support --precision fp16 (GradScaler syncs); use bf16")
        need(cfg["grad_clip"] == 0, "--cuda-graph does not support --grad-clip")
    if cfg.get("fsdp"):
        from .fsdp import TASKS

        need(task.name in TASKS, f"--fsdp: {task.spelling or '--task ' + task.name} cannot be sharded (BLIP's "
             f"momentum encoders and queues are updated outside the step's forward); --fsdp trains "
             f"{', '.join(TASKS)}; use DDP (leave out --fsdp)")
        need(not cfg["cuda_graph"], "--fsdp does not support --cuda-graph (its collectives run outside a capture)")
        need(cfg["precision"] != "fp16", "--fsdp does not support --precision fp16 (GradScaler over sharded "
             "gradients); use bf16 (FSDP2's mixed precision: bf16 gathers, fp32 gradient reduction) or fp32")


def write_config(path: str, cfg: dict) -> None:
    """The resolved options as YAML (atomically)."""
    import yaml

    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("# blipfast train: resolved options of this run (reusable with --config; --resume reads it)\n")
        yaml.safe_dump({k: cfg[k] for k in OPTIONS}, fh, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


def is_run_config(path: str) -> bool:
    """Whether ``path`` is a ``config.yaml`` that ``blipfast train`` wrote (valid, with the options every version
    writes)."""
    try:
        return {"data", "out", "seed", "steps"} <= set(read_config_file(path))
    except ValueError:
        return False


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"--resume: {run_dir!r} has no config.yaml (not a blipfast train run folder)")
    cfg = {k: v[1] for k, v in OPTIONS.items()}
    saved = read_config_file(path)
    cfg.update(saved)
    # a run written before these options existed (or had today's defaults) trained the old way
    cfg.update({k: v for k, v in LEGACY_DEFAULTS.items() if k not in saved})
    return cfg
