"""Training throughput (samples/s) per finetuning strategy, DP vs non-DP, and the fc strategy
with vs without feature caching: one shard's whole slice schedule (R cumulative stages, E epochs
each) on Fashion-MNIST-sized inputs, 1 thread.

    python bench/dp_throughput.py [--samples 4000] [--slices 4] [--epochs 1] [--width 32]

Prints one JSON object. Samples/s counts examples processed by SGD (Σ steps × expected batch).
Caching computes each sample's backbone features once per shard instead of at every step, so
its speed-up is bounded by how often a sample is seen: E·(R+1)/2 for equal slices.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import (
    finetune,
    models,  # noqa: E402
)
from pipeline.core.privacy import Recipe, schedule  # noqa: E402
from pipeline.core.train import ShardTrainer  # noqa: E402


def measure(model, plan, slices, stages, batch, sigma, device="cpu", repeats=2) -> float:
    recipe = Recipe(0, stages, batch, 0.1, 0.9, sigma, 1.0, None, None, 1e-5, "rdp")
    trainer = ShardTrainer(model, plan, recipe, seed=0, shard=0, device=device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.train(slices)  # feature caching (fc) is part of the cost
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return sum(s.steps for s in stages) * batch / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, args.samples).astype(np.int64)
    model = models.build("gn_cnn", (1, 28, 28), 10, args.width, seed=0)
    parts = np.array_split(np.arange(args.samples), args.slices)
    slices = [(x[p], y[p]) for p in parts]
    stages = schedule([len(p) for p in parts], args.batch, args.epochs)
    results: dict[str, dict[str, float]] = {}
    for strategy in ("fc", "fc_gn", "fc_gn_conv", "full"):
        plan = finetune.plan_for(model, strategy)
        dp = measure(model, plan, slices, stages, args.batch, sigma=1.0, device=args.device)
        plain = measure(model, plan, slices, stages, args.batch, sigma=None, device=args.device)
        results[strategy] = {"dp_samples_per_s": round(dp, 1), "non_dp_samples_per_s": round(plain, 1),
                             "dp_slowdown": round(plain / dp, 3)}
        print(f"{strategy}: DP {dp:.0f}/s, non-DP {plain:.0f}/s", file=sys.stderr, flush=True)
    # the same head-only training without caching: the frozen backbone runs at every step
    uncached_plan = finetune.FinetunePlan("fc_uncached", finetune.plan_for(model, "fc").trainable)
    uncached = measure(model, uncached_plan, slices, stages, args.batch, sigma=1.0, device=args.device)
    cached = results["fc"]["dp_samples_per_s"]
    print(json.dumps({
        "benchmark": "dp_throughput", "device": args.device, "model": "gn_cnn", "width": args.width, "threads": args.threads,
        "samples": args.samples, "slices": args.slices, "epochs_per_stage": args.epochs, "batch": args.batch,
        "samples_seen_per_sample": round(sum(s.steps for s in stages) * args.batch / args.samples, 2),
        "strategies": results,
        "fc_uncached_dp_samples_per_s": round(uncached, 1), "fc_caching_speedup": round(cached / uncached, 2),
        "fc_gn_dp_over_non_dp_time": results["fc_gn"]["dp_slowdown"],
    }))


if __name__ == "__main__":
    main()
