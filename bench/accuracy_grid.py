"""The seed's main question without Ray: test accuracy of the DP SISA ensemble per (finetuning
strategy, ε, shard count), the posterior-attack advantage of the ensemble and of a monolithic
non-DP model, and the effect of the partition strategy. It uses the same training core as the
pipeline (ShardTrainer, recipes, partitions) on one device, shard after shard; `dpsisa sweep`
runs the same grid as Ray Tune trials with MLflow tracking.

    python bench/accuracy_grid.py [--device cuda] [--config jobs/configs/fmnist.yaml] [--rows all|grid|partitions] [key=value ...]

`--rows partitions` runs only the partition comparison (three S=10 ensembles, no DP): minutes on a
CPU where the whole grid takes hours.

Prints one JSON object (rows of the table).
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
from pipeline.core import (
    finetune,
    privacy,  # noqa: E402
)
from pipeline.core.pretrain import pretrained_model  # noqa: E402
from pipeline.core.train import ShardTrainer, predict_proba  # noqa: E402
from pipeline.data import datasets  # noqa: E402
from pipeline.data.partition import partition  # noqa: E402
from pipeline.evaluation import attacks
from pipeline.logs import show as show_messages  # noqa: E402


def ensemble(config, data, model, device) -> tuple[np.ndarray, np.ndarray]:
    """Mean-softmax outputs of the S-shard ensemble on (test, member sample)."""
    cols = partition(data.private.ids, data.private.y, config.shards.count, config.shards.slices,
                     config.partition.strategy, config.seed, data.private.x)
    plan = finetune.plan_for(model, config.finetune.strategy, config.finetune.conv_fraction)
    members = np.random.default_rng(0).choice(data.private.ids, 2000, replace=False)
    test_x = torch.from_numpy(data.test.x).to(device)
    member_x = torch.from_numpy(data.private.x[members]).to(device)
    test_probs, member_probs = [], []
    for shard in range(config.shards.count):
        mine = cols["shard"] == shard
        slices = [cols["sample_id"][mine & (cols["slice"] == r)] for r in range(config.shards.slices)]
        recipe = privacy.make_recipe(config, shard, [len(s) for s in slices])
        trainer = ShardTrainer(model, plan, recipe, config.seed, shard, device)
        shard_model = trainer.model(trainer.train([(data.private.x[s], data.private.y[s]) for s in slices]))
        test_probs.append(predict_proba(shard_model, test_x).cpu().numpy())
        member_probs.append(predict_proba(shard_model, member_x).cpu().numpy())
    return np.mean(test_probs, 0), np.mean(member_probs, 0), members


def row(config, data, model, device) -> dict:
    start = time.perf_counter()
    test_probs, member_probs, members = ensemble(config, data, model, device)
    nonmembers = np.random.default_rng(1).choice(len(data.test.y), len(members), replace=False)
    mia = attacks.posterior_attack(member_probs, data.private.y[members], test_probs[nonmembers], data.test.y[nonmembers])
    return {"strategy": config.finetune.strategy, "epsilon": config.privacy.epsilon, "shards": config.shards.count,
            "partition": config.partition.strategy,
            "accuracy": round(float((test_probs.argmax(1) == data.test.y).mean()), 4),
            "mia_advantage": round(mia.advantage, 4), "mia_auc": round(mia.auc, 4),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="jobs/configs/fmnist.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", choices=("all", "grid", "partitions"), default="all",
                        help="grid: the monolithic row and the strategy × ε × S grid; partitions: the partition comparison")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    show_messages()  # the verbs' progress on stderr (stdout: one JSON object)
    base = config_mod.load(args.config, args.overrides)
    data = datasets.load(base.data)
    model, _ = pretrained_model(base, data)
    rows = []

    def run(**overrides) -> None:
        config = base.with_overrides(overrides)
        rows.append(row(config, data, model, args.device))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    if args.rows in ("all", "grid"):
        # monolithic, non-private, everything trains: the leakiest reference point
        run(**{"shards.count": 1, "privacy.epsilon": None, "finetune.strategy": "full", "train.epochs": 3})
        for shards, strategy, epsilon in itertools.product((1, 5, 10), ("fc", "fc_gn", "fc_gn_conv"), (0.5, 1.0, 1.5, None)):
            run(**{"shards.count": shards, "finetune.strategy": strategy, "privacy.epsilon": epsilon})
    if args.rows in ("all", "partitions"):
        # data-dependent partitions are refused under DP (they break parallel composition): compared
        # without DP, next to the keyed-hash uniform partition at the same settings
        for strategy in ("uniform", "class_balanced", "kmeans"):
            run(**{"shards.count": 10, "finetune.strategy": "fc_gn", "privacy.epsilon": None, "partition.strategy": strategy})
    print(json.dumps({"benchmark": "accuracy_grid", "device": args.device, "dataset": base.data.name,
                      "pretrain_epochs": base.pretrain.epochs, "slices": base.shards.slices,
                      "epochs_per_stage": base.train.epochs, "which": args.rows, "rows": rows}))


if __name__ == "__main__":
    main()
