"""Choosing the clipping norm C and the learning rate without spending private ε (issue 19, lever 4):
run the config's DP recipe on a *public* proxy of one shard's task and pick the best (C, lr) on a
public validation split. No private sample is touched, so nothing is added to ε.

The proxy is the public held-out set (all its classes, also those the source task left out),
split by a seeded permutation into a proxy-train part of one shard's size (capped at what the
public set holds after the validation part) and a validation part. Each (C, lr) trains one shard
with the same ε, δ, S-dependent shard size, R, B and epochs as the config (σ calibrated for the
proxy's own size), through the pipeline's training core (ShardTrainer, no Ray).

    python bench/public_proxy.py [--config jobs/configs/fmnist_transfer.yaml] [--clip 0.1,0.5,1,2]
                                 [--lr 0.025,0.05,0.1,0.2] [--validation 2000] [key=value ...]

Prints one JSON object: every cell's proxy-validation accuracy and the best (C, lr). Then measure
the choice on the private task with `dpsisa train CONFIG privacy.max_grad_norm=C train.lr=LR --json`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.core import finetune, privacy  # noqa: E402
from pipeline.core.pretrain import pretrained_model  # noqa: E402
from pipeline.core.train import ShardTrainer, predict_proba  # noqa: E402
from pipeline.data import datasets  # noqa: E402
from pipeline.logs import show as show_messages  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def proxy_split(config, data, validation: int) -> tuple[np.ndarray, np.ndarray]:
    """(proxy-train, validation) indices into the public set: a seeded permutation; the train part
    has one private shard's size when the public set holds that many, else what is left."""
    n_public = len(data.public.y)
    if validation >= n_public:
        raise SystemExit(f"--validation {validation} leaves no proxy-train images (the public set holds {n_public}).")
    order = np.random.default_rng(config.seed + 7_919).permutation(n_public)
    shard_size = len(data.private.y) // config.shards.count
    return order[validation: validation + min(shard_size, n_public - validation)], order[:validation]


def cell(config, data, model, train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    start = time.perf_counter()
    slices = np.array_split(train_idx, config.shards.slices)  # the proxy's own slices, in its seeded order
    recipe = privacy.make_recipe(config, 0, [len(s) for s in slices])
    plan = finetune.plan_for(model, config.finetune.strategy, config.finetune.conv_fraction)
    trainer = ShardTrainer(model, plan, recipe, config.seed, 0, torch.device("cpu"))
    trained = trainer.model(trainer.train([(data.public.x[s], data.public.y[s]) for s in slices]))
    predicted = predict_proba(trained, torch.from_numpy(data.public.x[val_idx])).argmax(1).numpy()
    return {"max_grad_norm": config.privacy.max_grad_norm, "lr": config.train.lr,
            "proxy_accuracy": round(float((predicted == data.public.y[val_idx]).mean()), 4),
            "noise_multiplier": round(recipe.noise_multiplier, 4), "steps": sum(s.steps for s in recipe.stages),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/fmnist_transfer.yaml")
    parser.add_argument("--clip", default="0.1,0.5,1,2", help="clipping norms C to try")
    parser.add_argument("--lr", default="0.025,0.05,0.1,0.2", help="learning rates to try")
    parser.add_argument("--validation", type=int, default=2000, help="public images held out to score each cell")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    show_messages()
    base = config_mod.load(args.config, args.overrides)
    if base.data.public != "heldout":
        raise SystemExit("the proxy needs a held-out public split of the target data set (data.public: heldout).")
    data = datasets.load(base.data)
    model, _ = pretrained_model(base, data)
    train_idx, val_idx = proxy_split(base, data, args.validation)
    rows = []
    for clip, lr in itertools.product(floats(args.clip), floats(args.lr)):
        rows.append(cell(base.with_overrides({"privacy.max_grad_norm": clip, "train.lr": lr}), data, model, train_idx, val_idx))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    best = max(rows, key=lambda r: r["proxy_accuracy"])
    print(json.dumps({"benchmark": "public_proxy", "config": args.config, "overrides": args.overrides,
                      "epsilon": base.privacy.epsilon, "shards": base.shards.count, "strategy": base.finetune.strategy,
                      "proxy_train": int(len(train_idx)), "proxy_validation": int(len(val_idx)),
                      "default": {"max_grad_norm": base.privacy.max_grad_norm, "lr": base.train.lr},
                      "best": best, "rows": rows}))


if __name__ == "__main__":
    main()
