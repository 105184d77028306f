"""The contract between the generic trainer (:mod:`blipfast.train.loop`) and what it trains: :class:`Task`.

A task is ONE file ``blipfast/train/tasks/<name with _>.py`` holding one subclass of :class:`Task` decorated with
:func:`register`; ``blipfast train --task NAME`` finds it by its file name (``blip-retrieval`` ->
``blip_retrieval.py``), so adding a task touches no other file. The trainer owns everything else: processes
(DDP), data reading, the frozen vision tower or feature cache, the optimizer and schedule, the step (eager,
compiled or CUDA graphs), logs, checkpoint folders and ``--resume``.

What the trainer calls, in order (every hook is declared on :class:`Task` with its default):

1. ``check_options(cfg)`` (class method) before anything is written: refuse options the task cannot use;
2. ``Task(cfg)``: the task of one run (it may keep state: the LLM's name, the alpha ramp, ...);
   ``synthetic(folder, size, seed)`` (rank 0, without ``--data``) writes the synthetic set and returns the
   options it fixes; ``read_data(cfg, features)`` reads ``--data`` (default: image-caption pairs; VQA reads
   questions with answers, NLVR2 image pairs);
3. ``image_processor(cfg, dist)`` when ``trains_vision`` (the ViT is part of the model: the batches hold pixels);
4. ``tokenizer(cfg, ann, dist) -> (tokenizer, folder)``: the folder is recorded as the run's ``tokenizer``
   (``ann``: the annotation file's pairs, None for a stream);
5. ``build(cfg, tok, width, device, fresh) -> (model, model_config)``: the model on ``device`` in train mode,
   its frozen parts frozen, from ``--init`` when ``fresh`` (not resuming); ``model_config`` (a dict) is recorded
   as the run's ``model`` option in ``config.yaml``, so that the saved file rebuilds the same model. Hooks never
   write into ``cfg``: what they derive, they return;
6. ``tokenize(model, tok, captions, cfg) -> dict``: the captions' tensors, one dict of [P, ...], each key of
   one width whatever the captions (``--max-txt-len``, or a width fixed by the options): every step has the same
   shapes. An annotation file's captions are tokenised once, all together, in the main process; a stream's
   (WebDataset shards, feature shards) one batch at a time in the loader workers (forked processes), so it must
   work on any list of captions and be a function of its arguments: what it writes on ``self`` stays in the
   worker (state a later hook needs is derived in ``build``); then ``dataset(ann, images, processor, text,
   report_path)`` (annotation files; default: one image per pair, :class:`blipfast.data.ImageTextDataset`;
   NLVR2: two);
7. per micro-step: ``step_inputs(micro_step, steps_per_epoch) -> dict`` of floats that travel with the batch as
   0-d tensors (a compiled step or a CUDA graph never sees a Python number change), then
   ``step_loss(model, embeds, inp, seed) -> (loss, logged)``: the loss to back-propagate and the detached float32
   losses [len(losses)] of one micro-batch, on the device, without a host sync (``embeds``: the ViT tokens
   before ``ln_vision``, or the pixels when ``trains_vision``; ``inp``: the batch, ``seed``: the int64 [1]
   seed of the step's random draws, the same on every rank);
8. ``save(model, folder, step, lavis)`` / ``load(model, folder)``: the weights of a checkpoint folder
   (``lavis``: also a LAVIS / Salesforce-named ``lavis.pth``);
9. with ``--eval-every N``, at the end of every N-th epoch on every rank: ``evaluate(model, cfg, dist, epoch) ->
   dict or None``: the metrics of the model (the unwrapped one, in train mode; the hook restores what it changes
   and draws no training randomness); rank 0 appends ``{"step", "epoch", **metrics}`` to ``RUN/eval.jsonl`` and logs
   it. Default: no evaluation. :meth:`Task.eval_data` (``--eval-data``, else the synthetic set's evaluation
   file) and :meth:`Task.evaluating` (eval mode, no gradient, the run's autocast, the RNG forked) are the helpers
   the BLIP fine-tuning tasks' hooks share.

Class attributes: ``name`` (the registry key), ``title`` (the log line), ``losses`` (the logged names; the first
is optimised), ``trains_vision``, ``vision_kind`` (the ViT of the synthetic set: "blip2" or "blip"),
``max_words`` (captions are cut to this many words), ``defaults`` (the task's recipe: option defaults over the
built-in ones, under the synthetic set's, a config file's and the flags), ``stage`` (the ``--stage`` value the
run records), ``spelling`` (how messages name the task), ``recipe`` (the reference recipe whose schedule and
weight-decay rule ``--schedule reference`` / ``--param-groups reference`` take: a key of
:data:`blipfast.train.schedules.REFERENCE_SHAPE` and :data:`blipfast.train.param_groups.REFERENCE_RULE`).

The defaults of ``tokenizer`` / ``tokenize`` / ``save`` / ``load`` / ``init_weights`` are those of a
BERT-tokenised model saved whole (BLIP-2 stage 1, BLIP): a new task of that kind implements ``build`` and
``step_loss`` and declares its class attributes. Model configurations come from :data:`PRESETS` (``--preset``)
< ``--model`` < what the data fixes, through :func:`model_config`; ``--init`` goes through :meth:`Task.init_weights`
(:func:`blipfast.convert.load_into`). A sketch (``blipfast/train/tasks/blip_caption.py``)::

    @register
    class BlipCaptionTask(Task):
        name, title, losses = "blip-caption", "BLIP captioning", ("loss",)
        trains_vision, vision_kind, spelling = True, "blip", "--task blip-caption"
        defaults = {"lr": 1e-5, "batch_size": 32}                        # the paper's recipe

        def image_processor(self, cfg, dist):                            # trains_vision: the pixels' processor
            return default_blip_processor(384)

        def build(self, cfg, tok, width, device, fresh):
            mcfg = model_config(BlipCaptionConfig, "blip", cfg, [({"text": {"vocab_size": len(tok)}}, "the tokenizer")],
                                nested={"text": ("BlipTextConfig", TEXT_FIELDS)})
            model = BlipCaptioner(mcfg).to(device).train()
            if cfg["init"] is not None and fresh:
                self.init_weights(model, cfg["init"])
            return model, mcfg.to_dict()

        def step_loss(self, model, pixel_values, inp, seed):
            loss = model(pixel_values, inp["input_ids"], inp["attention_mask"]).loss
            return loss, loss.detach().float().reshape(1)
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, ClassVar, Iterable, Optional

import torch

from ...data.annotations import MAX_WORDS
from ...data.shards import input_kind

_REGISTRY: dict = {}

# the tiny BLIP (v1) towers (the tests' and examples' size)
_BLIP_TINY = {"text": {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256, "num_hidden_layers": 2,
                       "max_position_embeddings": 64},
              "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "image_size": 32, "patch_size": 8}}

# --preset NAME of each model family: fields over its config class's defaults
PRESETS = {
    "blip2": {  # Blip2Stage1Config
        "base": {},  # LAVIS stage 1
        "tiny": {"num_query_tokens": 8, "embed_dim": 64,
                 "qformer": {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256,
                             "num_hidden_layers": 2, "max_position_embeddings": 64}},
    },
    "blip": {  # BlipPretrainConfig
        "base": {},  # ViT-B/16 at 224 px, BERT-base MED, queue 57600
        "tiny": {"embed_dim": 64, "queue_size": 1024, **_BLIP_TINY},
    },
    # the BLIP (v1) fine-tuning tasks (blipfast.train.tasks.blip_pretrain.BlipFinetuneTask); base: BLIP's recipe, the
    # ViT-B/16 at the task's size (retrieval, captioning, NLVR2 384 px, VQA 480 px), BERT-base MED
    "blip-retrieval": {"base": {}, "tiny": {"embed_dim": 64, "queue_size": 1024, **_BLIP_TINY}},  # BlipRetrievalConfig
    "blip-caption": {"base": {}, "tiny": _BLIP_TINY},  # BlipCaptionConfig
    "blip-task": {"base": {}, "tiny": _BLIP_TINY},  # BlipVQAConfig, BlipNLVRConfig (models.blip_config.BlipTaskConfig)
}


def _need(cond, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def register(cls: type) -> type:
    """Class decorator: make ``cls`` the task ``cls.name`` (its file must be ``<name with _>.py``)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)) or not cls.name:
        raise TypeError(f"register: expected a Task subclass with a name, got {cls!r}")
    _REGISTRY[cls.name] = cls
    return cls


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` on top, nested mappings merged."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_model_fields(user: dict, fields: Iterable[str], nested: dict, owner: str) -> None:
    """Refuse ``--model`` fields outside ``fields`` and the nested ``{name: (config class name, fields)}``."""
    unknown = sorted(set(user) - set(fields) - set(nested) - {"name"})
    for sub, (_, sub_fields) in nested.items():
        unknown += sorted(f"{sub}.{k}" for k in set(user.get(sub) or {}) - set(sub_fields))
    if unknown:
        subs = ", ".join(f"{sub} ({label}: {sorted(f)})" for sub, (label, f) in nested.items())
        raise ValueError(f"--model: unknown field(s) {unknown}; {owner} has {list(fields)} and {subs}")


def _check_derived(user: dict, derived: dict, why: str, where: str = "") -> None:
    for key, value in derived.items():
        if isinstance(value, dict):
            _check_derived(user.get(key) or {}, value, why, f"{where}{key}.")
        elif user.get(key) is not None and user[key] != value:
            raise ValueError(f"--model: {where}{key}={user[key]!r} contradicts {why} ({value!r}); leave it out")


def qformer_fields() -> tuple:
    """("QFormerConfig", its fields): the nested ``qformer`` entry of :func:`check_model_fields`."""
    from ...models.qformer import QFormerConfig

    return "QFormerConfig", tuple(QFormerConfig().to_dict())


def model_config(config_cls: type, family: str, cfg: dict, derived: list, nested: dict):
    """The model configuration of a run: ``PRESETS[family][--preset]`` < ``--model`` (``cfg["model"]``) < the
    fields ``derived`` fixes, a list of ``(fields, why)`` (e.g. the tokenizer's vocabulary, the ViT's width);
    ``nested``: ``{name: (config class name, fields)}`` of the nested configs. ValueError naming an unknown
    field, or a ``--model`` field that contradicts a derived one."""
    user = {k: v for k, v in (cfg["model"] or {}).items() if k != "name"}
    check_model_fields(user, config_cls.FIELDS, nested, config_cls.__name__)
    fixed: dict = {}
    for fields, why in derived:
        _check_derived(user, fields, why)
        fixed = merge(fixed, fields)
    try:
        return config_cls(**merge(merge(PRESETS[family][cfg["preset"]], user), fixed))
    except TypeError as exc:
        raise ValueError(f"--model: {exc}") from None


class Task:
    """One thing ``blipfast train`` trains; see the module docstring for the contract. Subclasses implement
    ``build`` and ``step_loss`` and override the hooks whose default does not fit."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    losses: ClassVar[tuple] = ("loss",)
    trains_vision: ClassVar[bool] = False
    vision_kind: ClassVar[str] = "blip2"
    max_words: ClassVar[int] = MAX_WORDS
    defaults: ClassVar[dict] = {}
    stage: ClassVar[int] = 1
    spelling: ClassVar[str] = ""
    #: trains from streamed image-caption pairs too (WebDataset shards, feature shards), not only annotation files
    streams: ClassVar[bool] = True
    #: BLIP's tokenizer: [ENC] added to the BERT tokenizer (see :meth:`tokenizer`)
    enc_token: ClassVar[bool] = False
    recipe: ClassVar[str] = ""
    #: the synthetic set's evaluation file (a name in its folder) that :meth:`eval_data` falls back to; "": the
    #: synthetic set's training annotation itself
    synthetic_eval: ClassVar[str] = ""
    #: takes ``--answer-list`` (the candidates of VQA rank inference)
    takes_answer_list: ClassVar[bool] = False

    def __init__(self, cfg: dict):
        self.image_ids = cfg["image_ids"]

    # ------------------------------------------------------------------------------------------
    # options

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        """Refuse (ValueError naming the flag) options this task cannot use. Default: a task that trains its ViT
        takes images (never a feature cache); one with a frozen tower takes a feature cache or images and a
        vision model; streamed captions need ``--tokenizer``; ``--llm``, ``--prompt`` and ``--text-suffix`` are
        stage 2's."""
        cls.check_image_options(cfg)
        cls.check_stream_options(cfg)
        _need(cfg["llm"] is None and not cfg["prompt"] and cfg["text_suffix"] is None,
              "--llm, --prompt and --text-suffix are options of --stage 2")

    @classmethod
    def check_stream_options(cls, cfg: dict) -> None:
        """Streamed data (WebDataset shards, feature shards): only for a task that ``streams`` image-caption pairs,
        and with ``--tokenizer`` (or an LLM's, with ``--llm``)."""
        if input_kind(cfg["data"], cfg["features"]) not in ("shards", "feature-shards"):
            return
        _need(cls.streams, f"{cls.spelling or '--task ' + cls.name} trains from its own annotation files, not from "
              f"WebDataset shards or feature shards (streams of image-caption pairs)")
        _need(cfg["tokenizer"] is not None or cfg.get("llm") is not None,  # (with --llm: the LLM's tokenizer)
              "--tokenizer DIR is needed with WebDataset shards and feature shards "
              "(a local BERT-style tokenizer folder, e.g. bert-base-uncased's): a vocabulary is trained only from "
              "the captions of an annotation file, and a stream's captions are never all in one place")

    @classmethod
    def check_image_options(cls, cfg: dict) -> None:
        """The image half of :meth:`check_options`."""
        need = _need
        kind = input_kind(cfg["data"], cfg["features"])
        if cls.trains_vision:
            need(cfg["features"] is None, f"--features cannot be used with {cls.spelling}: its ViT trains, so the "
                 f"image tokens change every step and cannot be cached; give --images DIR (the ViT's weights come "
                 f"from --vision VIT_DIR or --init CKPT)")
            need(kind != "annotations" or cfg["images"] is not None, f"--data needs --images DIR with {cls.spelling}")
        elif kind == "shards":
            need(cfg["vision"] is not None, "WebDataset shards need --vision MODEL_DIR (the frozen vision model "
                 "their images go through), or their features cached first (blipfast cache-features --data SHARDS "
                 "--vision MODEL_DIR --out FEATS, then --features FEATS)")
        elif kind == "annotations":
            need(cfg["features"] is not None or (cfg["images"] is not None and cfg["vision"] is not None),
                 "--data needs --features FEATS, or --images DIR and --vision MODEL_DIR")

    # ------------------------------------------------------------------------------------------
    # data (defaults: image-caption pairs)

    def synthetic(self, folder: str, size: int, seed: int) -> dict:
        """Write the synthetic set of a run without ``--data`` into ``folder`` (rank 0 only); returns the option
        values it fixes ({"data", "images"[, "vision"]})."""
        from ...data.synthetic import make_synthetic

        return make_synthetic(folder, size, seed, vision_kind=self.vision_kind)

    def read_data(self, cfg: dict, features: bool):
        """The training annotations of ``--data`` (image-caption pairs: :func:`blipfast.data.read_annotations`;
        with ``features``, the images need not exist under ``--images``). A task of another data format returns
        its own :class:`~blipfast.data.Annotations` subclass (``captions``: the texts a tokenizer is trained on)."""
        from ...data import read_annotations

        return read_annotations(cfg["data"], None if features else cfg["images"], check_images=not features,
                                max_words=self.max_words)

    def dataset(self, ann, images: str, processor, text: dict, report_path: Optional[str], augment=None):
        """The training dataset over image files (:class:`blipfast.data.ImageTextDataset`: one image per pair;
        ``augment``: the ``--augment`` train transform, or None for the processor's pixels)."""
        from ...data import ImageTextDataset

        return ImageTextDataset(ann, images, processor, text, report_path=report_path, augment=augment)

    # ------------------------------------------------------------------------------------------
    # set-up

    def image_processor(self, cfg: dict, dist):
        """The image processor of the pixels (called only when ``trains_vision``)."""
        raise NotImplementedError(f"{type(self).__name__} trains its ViT but has no image_processor")

    def tokenizer(self, cfg: dict, ann, dist) -> tuple[Any, Optional[str]]:
        """(tokenizer, its folder): ``--tokenizer`` (a BERT-style folder, [DEC] added as LAVIS does) or a
        WordPiece vocabulary trained on the captions by rank 0 into ``RUN/tokenizer``; with ``enc_token`` (BLIP),
        [ENC] added too, and the run's folder saved with it, as the model knows it."""
        from ...data import load_tokenizer, train_wordpiece
        from ...data.tokenizer import add_enc_token

        if cfg["tokenizer"] is not None:
            tok, folder = load_tokenizer(cfg["tokenizer"]), cfg["tokenizer"]
        else:
            if ann is None:  # (check_options refuses this first)
                raise ValueError("--tokenizer DIR is needed with streamed captions (WebDataset or feature shards)")
            folder = os.path.join(cfg["out"], "tokenizer")
            if dist.main:
                train_wordpiece(self.tokenizer_texts(ann), cfg["vocab_size"]).save_pretrained(folder)
            dist.barrier()
            tok = load_tokenizer(folder)
        if self.enc_token:
            tok = add_enc_token(tok)
            if cfg["tokenizer"] is None and dist.main:
                tok.save_pretrained(folder)
        return tok, folder

    def tokenizer_texts(self, ann) -> list:
        """The texts a WordPiece vocabulary is trained on without ``--tokenizer`` (default: the captions)."""
        return ann.captions

    def build(self, cfg: dict, tok, width: Optional[int], device: torch.device, fresh: bool
              ) -> tuple[torch.nn.Module, dict]:
        """(the model on ``device`` in train mode, the ``model`` option to record); ``width``: the vision
        tokens' width (None when ``trains_vision``)."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    def init_weights(self, model: torch.nn.Module, path: str) -> None:
        """``--init PATH`` (see :func:`blipfast.convert.resolve_source`): blipfast's safetensors (a run, a
        checkpoint, a file or folder) go in by :func:`blipfast.convert.load_into`, a LAVIS / Salesforce ``.pth``
        through the model's ``load_lavis_state_dict``."""
        from ... import convert

        src = convert.resolve_source(path, what="--init")
        if src.kind == "torch":
            model.load_lavis_state_dict(convert.load_state_dict(src.weights))
        else:
            convert.load_into(model, src, what="--init")

    def tokenize(self, model, tok, captions: list, cfg: dict) -> dict:
        """``input_ids`` int32 and ``attention_mask`` bool [P, ``--max-txt-len``] of the captions (all of an
        annotation file, or one batch of a stream)."""
        from ...data import tokenize

        ids, mask = tokenize(tok, captions, cfg["max_txt_len"])
        return {"input_ids": ids, "attention_mask": mask}

    # ------------------------------------------------------------------------------------------
    # steps

    def step_inputs(self, micro_step: int, steps_per_epoch: float) -> dict:
        """Floats that enter micro-step ``micro_step`` as 0-d tensors (default: none)."""
        return {}

    def step_loss(self, model, embeds: torch.Tensor, inp: dict, seed: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, detached float32 logged losses [len(losses)]); no host sync."""
        raise NotImplementedError(f"{type(self).__name__}.step_loss")

    def evaluate(self, model, cfg: dict, dist, epoch: int) -> Optional[dict]:
        """Metrics after epoch ``epoch`` (1-based) with ``--eval-every``, or None (see the module docstring)."""
        return None

    @staticmethod
    def synthetic_folder(cfg: dict) -> Optional[str]:
        """The synthetic set's folder (``RUN/synthetic``) when the run trains on it (``--data`` inside it, as a
        run without ``--data`` records), else None."""
        synthetic = os.path.abspath(os.path.join(cfg["out"], "synthetic"))
        data = cfg["data"]
        if data and os.path.commonpath([os.path.abspath(data), synthetic]) == synthetic:
            return synthetic
        return None

    def eval_data(self, cfg: dict) -> Optional[str]:
        """The evaluation annotation: ``--eval-data``, else the synthetic set's (``synthetic_eval`` in its folder,
        or its training annotation) when the run trains on it, else None (no evaluation)."""
        if cfg["eval_data"] is not None:
            return cfg["eval_data"]
        folder = self.synthetic_folder(cfg)
        if folder is None:
            return None
        return os.path.join(folder, self.synthetic_eval) if self.synthetic_eval else cfg["data"]

    @contextlib.contextmanager
    def evaluating(self, cfg: dict, model):
        """Eval mode, no gradient, the run's autocast; torch's RNG untouched (a resumed run trains the same)."""
        from ...options import DTYPES

        dev = next(model.parameters()).device
        amp = cfg["precision"] in ("bf16", "fp16") and dev.type == "cuda"
        was = model.training
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad(), \
                (torch.autocast(dev.type, dtype=DTYPES[cfg["precision"]]) if amp else contextlib.nullcontext()):
            model.eval()
            try:
                yield
            finally:
                model.train(was)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save(self, model, folder: str, step: int, lavis: bool) -> None:
        """``model.safetensors`` (every weight; tied ones once) and with ``lavis`` a ``lavis.pth`` of
        ``model.to_lavis_state_dict()``."""
        from safetensors.torch import save_model

        save_model(model, os.path.join(folder, "model.safetensors"), metadata={"step": str(step), "format": "blipfast"})
        if lavis:
            torch.save({"model": model.to_lavis_state_dict(), "step": step}, os.path.join(folder, "lavis.pth"))

    def load(self, model, folder: str) -> None:
        """The weights :meth:`save` wrote (``--resume``)."""
        from ... import convert

        convert.load_into(model, os.path.join(folder, "model.safetensors"), what="--resume")
