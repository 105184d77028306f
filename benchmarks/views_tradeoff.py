"""What augmented views in a feature cache cost and buy (docs/training.md#augmentation), on the synthetic set:

- disk: the cache of 1 view (the processor's pixels) and of N augmented views;
- the stage-1 training loss, per epoch, of the same tiny run (same seed, steps, batches) trained from images
  without augmentation, from images augmented at every visit (the ViT every step), from a cache of 1 view, and from
  a cache of N augmented views.

Run: ``python benchmarks/views_tradeoff.py --out /tmp/views [--pairs 128 --epochs 8 --views 4]``; it prints a
Markdown table and writes ``views_tradeoff.json`` into ``--out``. CPU-sized (a few minutes); not a pytest file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time


def _size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _epoch_losses(run: str, steps_per_epoch: int) -> list:
    with open(os.path.join(run, "log.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    by_epoch = {}
    for r in rows:
        by_epoch.setdefault((r["step"] - 1) // steps_per_epoch, []).append(r["loss"])
    return [round(sum(v) / len(v), 4) for _, v in sorted(by_epoch.items())]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    from blipfast.cli import main as cli
    from blipfast.data.synthetic import make_synthetic

    os.makedirs(args.out, exist_ok=True)
    syn = make_synthetic(os.path.join(args.out, "synthetic"), args.pairs, seed=0)
    steps_per_epoch = args.pairs // args.batch_size
    steps = steps_per_epoch * args.epochs
    common = ["--data", syn["data"], "--preset", "tiny", "--steps", str(steps), "--batch-size", str(args.batch_size),
              "--warmup-steps", str(steps_per_epoch), "--lr", "1e-3", "--min-lr", "1e-4", "--log-every", "1",
              "--save-every", "0", "--no-progress", "--device", "cpu", "--seed", "3", "--num-workers", "0"]
    caches = {}
    for name, views in (("cache-1", 1), (f"cache-{args.views}", args.views)):
        folder = os.path.join(args.out, name)
        t0 = time.perf_counter()
        assert cli(["cache-features", "--data", syn["data"], "--images", syn["images"], "--vision", syn["vision"],
                    "--out", folder, "--views", str(views), "--num-workers", "0", "--no-progress",
                    "--device", "cpu"]) == 0
        caches[name] = {"views": views, "bytes": _size(folder), "seconds": round(time.perf_counter() - t0, 1)}
    runs = {
        "images, --augment none": ["--images", syn["images"], "--vision", syn["vision"], "--augment", "none"],
        "images, --augment reference": ["--images", syn["images"], "--vision", syn["vision"]],
        "cache of 1 view": ["--features", os.path.join(args.out, "cache-1")],
        f"cache of {args.views} views": ["--features", os.path.join(args.out, f"cache-{args.views}")],
    }
    results = {}
    for label, extra in runs.items():
        run = os.path.join(args.out, "runs", label.replace(" ", "_").replace(",", "").replace("-", ""))
        t0 = time.perf_counter()
        assert cli(["train", "--out", run, *common, *extra]) == 0
        results[label] = {"epoch_losses": _epoch_losses(run, steps_per_epoch),
                          "seconds": round(time.perf_counter() - t0, 1)}
    report = {"machine": platform.processor() or platform.machine(), "pairs": args.pairs, "epochs": args.epochs,
              "batch_size": args.batch_size, "steps": steps, "caches": caches, "runs": results}
    with open(os.path.join(args.out, "views_tradeoff.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    print("| run | " + " | ".join(f"epoch {e}" for e in range(args.epochs)) + " | seconds |")
    print("| --- |" + " --- |" * (args.epochs + 1))
    for label, r in results.items():
        print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in r["epoch_losses"]) + f" | {r['seconds']} |")
    for name, c in caches.items():
        print(f"{name}: {c['views']} view(s), {c['bytes']} bytes, {c['seconds']} s")
    return report


if __name__ == "__main__":
    main()
