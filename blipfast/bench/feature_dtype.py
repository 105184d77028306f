"""What fp8 feature shards cost: ``python -m blipfast.bench.feature_dtype [OUT]`` (CPU, a few minutes).

On the synthetic set (the shapes of ``blipfast train``'s synthetic set written as WebDataset shards, its tiny
random ``Blip2VisionModel``), ``blipfast cache-features`` stores the tokens in fp32, bf16 and fp8 (e4m3 with a
per-token scale), and ``blipfast train`` trains the ``tiny`` stage-1 model from each with the synthetic set's
recipe (batch 16, lr 2e-3, the same seed: the same batches, dropout and negatives). Printed:

- the stored tokens' error against fp32: relative (Frobenius) over all tokens, and of the worst token;
- the stage-1 loss: the largest difference per step between the runs over the first 10 steps (before the runs
  drift apart) and over all, the mean difference, and each run's final loss (the mean of its last 10 steps);
- the ITC image features (the normalised query projections of :meth:`blipfast.Blip2Stage1.image_features`) over
  every image: of the bf16-trained model fed the fp8 tokens against the bf16 ones (what storing in fp8 changes in
  a forward pass), and of the fp8-trained model against the bf16-trained one, both fed the fp32 tokens (what
  training from fp8 changes in the model), as the mean and the largest cosine distance (1 - cos); bf16 against
  fp32 for scale.

docs/data.md shows its output.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

TRAIN = ["--steps", "150", "--batch-size", "16", "--lr", "2e-3", "--min-lr", "1e-4", "--warmup-steps", "10",
         "--max-txt-len", "16", "--preset", "tiny", "--log-every", "1", "--save-every", "0", "--plot-every", "0",
         "--no-progress", "--device", "cpu", "--seed", "0", "--num-workers", "0"]


def _rows(folder: str) -> dict:
    """{key: fp32 tokens} of a feature-shard folder."""
    from safetensors import safe_open

    from ..data.feature_shards import FeatureShards, decode

    out = {}
    for url in FeatureShards(folder).urls:
        with safe_open(url, framework="pt") as f:
            scale = f.get_tensor("scale") if "scale" in f.keys() else None
            tokens = decode(f.get_tensor("tokens"), scale, torch.float32)
            out.update(zip(json.loads(f.metadata()["keys"]), tokens))
    return out


def _model(run: str):
    from safetensors.torch import load_file

    from .. import Blip2Stage1, Blip2Stage1Config
    from ..train.checkpoint import list_checkpoints
    from ..train.config import read_config_file

    cfg = read_config_file(os.path.join(run, "config.yaml"))
    model = Blip2Stage1(Blip2Stage1Config(**cfg["model"]))
    model.load_state_dict(load_file(os.path.join(list_checkpoints(run)[-1], "model.safetensors")), strict=False)
    return model.eval()


@torch.no_grad()
def _itc(model, tokens: torch.Tensor) -> torch.Tensor:
    q = model.qformer(model.query_embeds(None, tokens.shape[0]), encoder_kv=model.image_kv(tokens)).last_hidden_state
    return model.image_features(q)


def _cos(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(mean, largest) cosine distance 1 - cos between the rows (the features are normalised), in float64."""
    d = 1 - (a.double() * b.double()).sum(-1).flatten()
    return d.mean().item(), d.max().item()


def measure(root: str, n_shards: int = 8, per_shard: int = 64, log=print) -> dict:
    from ..cli import main
    from ..data.cache_shards import cache_feature_shards
    from ..data.synthetic import make_synthetic
    from ..data.tokenizer import train_wordpiece
    from ..data.vision import quiet_transformers
    from ..testing.shards import captions_of, write_shards
    from ..train.logger import LOSSES

    vision = make_synthetic(os.path.join(root, "synthetic"), 2, 0)["vision"]  # the synthetic set's ViT
    shards = write_shards(os.path.join(root, "shards"), n_shards, per_shard, image_size=64)
    tok = os.path.join(root, "tokenizer")
    with quiet_transformers():
        train_wordpiece(captions_of(shards), 256).save_pretrained(tok)
    dtypes = ("fp32", "bf16", "fp8")
    tokens, logs, models = {}, {}, {}
    for dt in dtypes:
        feats = os.path.join(root, f"feats-{dt}")
        cache_feature_shards(shards, vision, feats, dtype=dt, device="cpu", progress=False, log=lambda m: None)
        tokens[dt] = _rows(feats)
        run = os.path.join(root, f"run-{dt}")
        assert main(["train", "--features", feats, "--tokenizer", tok, "--out", run] + TRAIN) == 0
        with open(os.path.join(run, "log.jsonl")) as fh:
            logs[dt] = [json.loads(line) for line in fh]
        models[dt] = _model(run)
    keys = sorted(tokens["fp32"])
    stacked = {dt: torch.stack([tokens[dt][k] for k in keys]) for dt in dtypes}
    ref = stacked["fp32"]
    res = {"tokens": list(ref.shape), "images": len(keys)}
    for dt in ("bf16", "fp8"):
        err = stacked[dt] - ref
        res[f"token_error_{dt}"] = (err.norm() / ref.norm()).item()
        res[f"token_error_worst_{dt}"] = (err.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()
    for a, b in (("fp8", "bf16"), ("bf16", "fp32")):
        d = [abs(x["loss"] - y["loss"]) for x, y in zip(logs[a], logs[b])]
        res[f"loss_diff_{a}_vs_{b}"] = {"max": max(d), "mean": sum(d) / len(d), "max_first_10": max(d[:10])}
    for dt in dtypes:
        res[f"final_loss_{dt}"] = {k: sum(r[k] for r in logs[dt][-10:]) / 10 for k in LOSSES}
    base = _itc(models["bf16"], stacked["bf16"])
    res["itc_forward_fp8_vs_bf16_tokens"] = _cos(_itc(models["bf16"], stacked["fp8"]), base)
    res["itc_forward_bf16_vs_fp32_tokens"] = _cos(base, _itc(models["bf16"], ref))
    res["itc_trained_fp8_vs_bf16"] = _cos(_itc(models["fp8"], ref), _itc(models["bf16"], ref))
    res["itc_trained_bf16_vs_fp32"] = _cos(_itc(models["bf16"], ref), _itc(models["fp32"], ref))
    return res


def report(res: dict) -> str:
    n, t, w = res["images"], *res["tokens"][1:]
    lines = [f"{n} images, {t} tokens x {w} (the synthetic set's ViT), stage 1 tiny, 150 steps, batch 16", "",
             f"{'stored tokens vs fp32':<34} {'relative error':>15} {'worst token':>12}"]
    for dt in ("bf16", "fp8"):
        lines.append(f"{dt:<34} {res[f'token_error_{dt}']:15.4f} {res[f'token_error_worst_{dt}']:12.4f}")
    lines += ["", f"{'stage-1 loss per step, |diff|':<34} {'max, steps 1-10':>15} {'max':>12} {'mean':>12}"]
    for a, b in (("fp8", "bf16"), ("bf16", "fp32")):
        d = res[f"loss_diff_{a}_vs_{b}"]
        lines.append(f"{a + ' vs ' + b:<34} {d['max_first_10']:15.2e} {d['max']:12.2e} {d['mean']:12.2e}")
    lines += ["", f"{'final loss (last 10 steps)':<34} {'loss':>8} {'itc':>8} {'itm':>8} {'lm':>8}"]
    for dt in ("fp32", "bf16", "fp8"):
        f = res[f"final_loss_{dt}"]
        lines.append(f"{dt:<34} {f['loss']:8.4f} {f['loss_itc']:8.4f} {f['loss_itm']:8.4f} {f['loss_lm']:8.4f}")
    lines += ["", f"{'ITC image features, 1 - cosine':<50} {'mean':>9} {'max':>9}"]
    for key, what in (("itc_forward_fp8_vs_bf16_tokens", "bf16-trained model: fp8 tokens vs bf16 tokens"),
                      ("itc_forward_bf16_vs_fp32_tokens", "bf16-trained model: bf16 tokens vs fp32 tokens"),
                      ("itc_trained_fp8_vs_bf16", "trained from fp8 vs from bf16 (fp32 tokens)"),
                      ("itc_trained_bf16_vs_fp32", "trained from bf16 vs from fp32 (fp32 tokens)")):
        mean, high = res[key]
        lines.append(f"{what:<50} {mean:9.2e} {high:9.2e}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m blipfast.bench.feature_dtype [OUT]
    import sys

    torch.set_num_threads(1)  # one summation order: the numbers repeat
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="blipfast-fp8-")
    print(report(measure(out)))
