"""The data path of ``blipfast train``: one training step end to end (DataLoader batch, frozen ViT when training
from images, the stage-1 step with its optimizer update, the loss accumulation the loop logs) from cached ViT
tokens against from images through the ViT.

The images are PNG files written to a temporary folder (224 px on CUDA), the ViT is a randomly initialised
``Blip2VisionModel`` with EVA ViT-g's shape (1408 wide, 39 layers, 257 tokens: what LAVIS runs in stage 1) on
CUDA and a tiny one on the CPU, and the features come from ``cache-features`` over the same images; both
trainers are ``blipfast.train.Trainer`` with the same options (Q-Former ``base`` on CUDA, bf16 autocast; ``tiny``
on the CPU). A case's ms is one optimizer step; images/s = ``params["batch"]`` / (ms / 1000). The cached path is
the stage-1 step alone if the loader keeps up, which is what this measures.

The loaders alone, one worker (``num_workers=0``: the batches are made in the timing process, so a case's ms is
one worker's time per batch; ``samples_per_s_per_worker`` = batch / seconds), on any device (they are CPU work):

- feature shards (``blipfast cache-features`` output from shards: 257 x 1408 bf16 tokens per image, EVA ViT-g at
  224 px; one caption each), streamed through the shuffle buffer, read from the page cache (just written), the
  captions tokenised per batch;
- image-text WebDataset shards (JPEG, 512 x 384) at 224 and 364 px through the BLIP image processor, against the
  same images and processor over the JSONL + folder layout of the annotation-file path (its captions tokenised
  up front, as the trainer does).

``blipfast bench --only data`` runs this suite.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

import torch

from .common import Case

# EVA ViT-g as LAVIS' stage 1 runs it (39 of its 40 blocks), at 224 px: 16 x 16 patches + CLS = 257 tokens
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
             patch_size=14, initializer_range=0.02)
WORDS = ["red", "green", "blue", "dog", "cat", "car", "tree", "on", "a", "the", "next", "to", "small", "large"]
VIT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, initializer_range=0.02)


def _write_data(root: str, n: int, px: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    path = os.path.join(root, "ann.jsonl")
    with open(path, "w") as fh:
        for i in range(n):
            img = rng.integers(0, 255, (px, px, 3), dtype=np.uint8)
            name = f"img/{i:05d}.png"
            Image.fromarray(img).save(os.path.join(root, name))
            fh.write(json.dumps({"image": name, "caption": " ".join(rng.choice(WORDS, 12))}) + "\n")
    return path


def _vision(root: str, cfg: dict) -> str:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from ..data.vision import quiet_transformers

    path = os.path.join(root, "vit")
    with quiet_transformers():
        from transformers import BlipImageProcessor

        Blip2VisionModel(Blip2VisionConfig(**cfg)).save_pretrained(path)
        BlipImageProcessor(size={"height": cfg["image_size"], "width": cfg["image_size"]}).save_pretrained(path)
    return path


def _tokenizer(root: str):
    from ..data import load_tokenizer, train_wordpiece

    path = os.path.join(root, "tokenizer")
    train_wordpiece([" ".join(WORDS)] * 4, 256).save_pretrained(path)
    return load_tokenizer(path)


def _tokenize_fn(tok):
    from ..data import tokenize

    def fn(captions):
        ids, mask = tokenize(tok, captions, 32)
        return {"input_ids": ids.long(), "attention_mask": mask.long()}
    return fn


def _photo(rng, w: int = 512, h: int = 384):
    """A photo-like JPEG: smooth colour fields with some texture (compresses like a photo, not like noise)."""
    import io

    import numpy as np
    from PIL import Image

    base = rng.random((h // 32 + 1, w // 32 + 1, 3)) * 255
    img = np.kron(base, np.ones((32, 32, 1)))[:h, :w] + rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def loader_cases(quick: bool = False, root: str = None) -> list[Case]:
    """The loader-alone cases (see the module docstring)."""
    import numpy as np

    from ..data.feature_shards import FeatureShardWriter, feature_text_loader, write_index
    from ..data.image_stream import image_text_loader
    from ..testing.shards import sample_files, write_tar

    root = root or tempfile.mkdtemp(prefix="blipfast-bench-data-")
    if root.startswith(tempfile.gettempdir()):
        atexit.register(shutil.rmtree, root, True)
    rng = np.random.default_rng(0)
    tok = _tokenizer(root)
    tokenize = _tokenize_fn(tok)
    batch, n = (16, 128) if quick else (64, 1024)
    captions = [" ".join(rng.choice(WORDS, 12)) for _ in range(n)]
    out = []

    for dtype, size in (("bf16", 2), ("fp8", 1)):  # (a) 257 x 1408 tokens per image, as cache-features writes them
        feats = os.path.join(root, f"feats-{dtype}")
        writer = FeatureShardWriter(feats, dtype=dtype, shard_size=256)
        for lo in range(0, n, 64):
            k = list(range(lo, min(n, lo + 64)))
            writer.add(f"in-{lo // 256}", k, [f"{i:09d}" for i in k], k, [captions[i] for i in k],
                       torch.randn(len(k), 257, 1408, generator=torch.Generator().manual_seed(lo)))
            if (lo + 64) % 256 == 0 or lo + 64 >= n:
                writer.end_source(f"in-{lo // 256}")
        writer.close()
        write_index(feats)
        it = iter(feature_text_loader(feats, tokenize=tokenize, dtype=None, batch_size=batch, seed=0))
        params = dict(batch=batch, samples=n, tokens=f"257 x 1408 {dtype}", workers=1)
        out.append(Case("data loader, one worker: feature shards", f"feature shards, {dtype}",
                        _one_thread(lambda it=it: next(it)), bytes=batch * 257 * (1408 * size + 4 * (size == 1)),
                        params=params))

    jpegs = [_photo(rng) for _ in range(n // 4)]  # (b) the same JPEGs as shards and as a folder + JSONL
    shards = os.path.join(root, "shards")
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    os.makedirs(shards, exist_ok=True)
    rows = []
    for s in range(4):
        files = []
        for i in range(len(jpegs)):
            key = f"{s:05d}{i:04d}"
            files += sample_files(key, jpegs[i], captions[s * len(jpegs) + i], 512, 384)
            with open(os.path.join(root, "img", f"{key}.jpg"), "wb") as fh:
                fh.write(jpegs[i])
            rows.append({"image": f"img/{key}.jpg", "caption": captions[s * len(jpegs) + i]})
        write_tar(os.path.join(shards, f"{s:05d}.tar"), files)
    ann = os.path.join(root, "ann.jsonl")
    with open(ann, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    for px in (224, 364):
        proc = _processor(px)
        params = dict(batch=batch, samples=n, image="JPEG 512 x 384", size=px, workers=1)
        it = iter(image_text_loader(shards, tokenize=tokenize, image_transform=lambda im, p=proc: _pixels(p, im),
                                    batch_size=batch, seed=0))
        out.append(Case(f"data loader, one worker: images at {px} px", "WebDataset shards (stream)",
                        _one_thread(lambda it=it: next(it)), params=params))
        it = _folder_loader(ann, root, proc, tok, batch)
        out.append(Case(f"data loader, one worker: images at {px} px", "JSONL + image folder",
                        _one_thread(lambda it=it: next(it)), baseline=True, params=params))
    return out


def _one_thread(fn):
    """``fn`` with one torch thread, as in a DataLoader worker (which PyTorch runs with one)."""
    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)
    return run


def _processor(px: int):
    from transformers import BlipImageProcessor

    from ..data.vision import quiet_transformers

    with quiet_transformers():
        return BlipImageProcessor(size={"height": px, "width": px})


def _pixels(processor, image):
    from ..data.vision import preprocess

    return preprocess(processor, image)


def _folder_loader(ann_path: str, root: str, processor, tok, batch: int):
    """The annotation-file path of the trainer: captions tokenised up front, images read from the folder."""
    from torch.utils.data import DataLoader

    from ..data import GlobalBatchSampler, ImageTextDataset, collate, read_annotations, tokenize

    ann = read_annotations(ann_path, root)
    ids, mask = tokenize(tok, ann.captions, 32)
    ds = ImageTextDataset(ann, root, processor, {"input_ids": ids, "attention_mask": mask})
    sampler = GlobalBatchSampler(len(ds), batch, seed=0)
    return iter(DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=0))


def images_per_s(results) -> str:
    """The loader rows as samples/s per worker."""
    lines = []
    for r in results:
        if r.group.startswith("data loader") and r.ms:
            lines.append(f"  {r.group[len('data loader, one worker: '):]:<20} {r.name:<28} "
                         f"{r.params.get('batch', 0) / (r.ms / 1e3):9.1f} samples/s per worker")
    return "\n".join(lines)


def measure_loaders(repeats: int = 5, batches: int = 8, quick: bool = False, root: str = None) -> list[dict]:
    """Each loader case timed ``repeats`` times over ``batches`` batches (after one warm-up batch): the median
    samples/s per worker in wall time and in CPU time (``time.process_time``: what one dedicated core gives, little
    affected by other processes on a shared machine)."""
    import statistics
    import time

    rows = []
    for case in loader_cases(quick, root=root):
        case.fn()
        wall, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(batches):
                case.fn()
            n = batches * case.params["batch"]
            wall.append(n / (time.perf_counter() - t))
            cpu.append(n / max(time.process_time() - c, 1e-9))
        rows.append({"group": case.group, "name": case.name, "wall": statistics.median(wall),
                     "cpu": statistics.median(cpu), **case.params})
    return rows


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False) -> list[Case]:
    from ..data.features import cache_features
    from ..train.config import OPTIONS
    from ..train.loop import Trainer

    cuda = device.type == "cuda"
    batch = (16 if quick else 64) if cuda else 4
    n = batch * (4 if quick else 8)
    root = tempfile.mkdtemp(prefix="blipfast-bench-train-")
    atexit.register(shutil.rmtree, root, True)
    vit_cfg = VIT_G if cuda else VIT_TINY
    data = _write_data(root, n, vit_cfg["image_size"])
    vit = _vision(root, vit_cfg)
    prec = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32") if cuda else "fp32"
    feats = os.path.join(root, "feats")
    cache_features(data, root, vit, feats, batch_size=batch, device=str(device), progress=False,
                   vision_dtype="bf16" if cuda else "fp32", num_workers=4 if cuda else 0, log=lambda m: None)
    base = {k: v[1] for k, v in OPTIONS.items()}
    base.update(data=data, batch_size=batch, steps=10**6, warmup_steps=100, device=str(device), progress=False,
                preset="base" if cuda else "tiny", precision=prec, vocab_size=1000, max_txt_len=32,
                num_workers=None if cuda else 0, seed=0)
    params = dict(batch=batch, vit="EVA ViT-g shape (1408 x 39, 257 tokens)" if cuda else "tiny",
                  qformer=base["preset"], precision=prec, loader_workers=base["num_workers"] or "auto")
    out = []
    for name, extra, baseline in (("from images (ViT every step)", dict(images=root, vision=vit), True),
                                  ("from cached features", dict(features=feats), False)):
        cfg = dict(base, out=os.path.join(root, name.split()[1]), **extra)
        trainer = Trainer(cfg, log=lambda m: None)
        trainer.runlog.enabled = False

        def step(trainer=trainer, box=[]):  # noqa: B006 - the loop's running loss sum lives across calls
            m = trainer.train_step()
            box[:] = [m + box[0]] if box else [m]

        out.append(Case("stage-1 train loop, data path", name, step, baseline=baseline, params=params))
    return out + loader_cases(quick, root=os.path.join(root, "loaders"))


if __name__ == "__main__":  # python -m blipfast.bench.train_data [--quick]: the loaders' table of docs/data.md
    import sys

    print(f"{'loader (one worker)':<44} {'wall samples/s':>15} {'CPU samples/s':>14}")
    for r in measure_loaders(quick="--quick" in sys.argv):
        print(f"{r['group'][len('data loader, one worker: '):] + ': ' + r['name']:<44} {r['wall']:15.1f} "
              f"{r['cpu']:14.1f}")
