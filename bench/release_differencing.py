"""Do consecutive model versions share their DP noise? A differencing attack on the releases
before and after a forget, with the replay's randomness shared (the original training's draws,
what dpsisa did before each release drew its own) or fresh (a new draw per release, as now).

Per trial (pure torch, no Ray): shard 0 of a digits run (2 shards × 3 slices, DP at --epsilon)
trained once; a target member t of the last slice is forgotten by replaying the last stage
without it. The attacker holds both versions and scores a candidate u by
loss_after(u) − loss_before(u): the forgotten sample's loss rises. Members forgotten vs
non-members (test samples) give the attack's AUC and TPR at low FPR; with shared randomness the
noise cancels in the difference, with fresh randomness it does not. Prints one JSON object.

    python bench/release_differencing.py [--trials 200] [--epsilon 1.0] [--strategy fc_gn]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.core import (
    finetune,
    models,
    privacy,  # noqa: E402
)
from pipeline.core.train import ShardTrainer  # noqa: E402
from pipeline.data import datasets  # noqa: E402
from pipeline.data.partition import partition  # noqa: E402
from pipeline.evaluation.attacks import threshold_attack  # noqa: E402

SLICES = 3


def _losses(trainer: ShardTrainer, state, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    model = trainer.model(state)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return F.cross_entropy(logits, torch.from_numpy(np.asarray(y, np.int64)), reduction="none").numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--strategy", default="fc_gn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = config_mod.load(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "digits.yaml",
                             [f"privacy.epsilon={args.epsilon}", f"finetune.strategy={args.strategy}"])
    data = datasets.load(config.data)
    cols = partition(data.private.ids, data.private.y, 2, SLICES, "uniform", seed=config.seed)
    mine = cols["shard"] == 0
    slices = [np.sort(cols["sample_id"][mine & (cols["slice"] == r)]) for r in range(SLICES)]
    model = models.build(config.model.name, data.input_shape, data.num_classes, config.model.width, config.seed)
    plan = finetune.plan_for(model, config.finetune.strategy, config.finetune.conv_fraction)
    recipe = privacy.make_recipe(config, 0, [len(s) for s in slices])
    trainer = ShardTrainer(model, plan, recipe, config.seed, 0)
    checkpoints: dict = {}
    started = time.perf_counter()
    original = trainer.train([(data.private.x[s], data.private.y[s]) for s in slices],
                             on_stage=lambda j, s: checkpoints.__setitem__(j, s))
    rng = np.random.default_rng(args.seed)
    targets = rng.choice(slices[-1], size=min(args.trials, len(slices[-1])), replace=False)
    others = rng.choice(len(data.test.y), size=len(targets), replace=False)
    scores: dict[str, dict[str, list[float]]] = {mode: {"forgotten": [], "non_member": []} for mode in ("shared", "fresh")}
    for k, (t, z) in enumerate(zip(targets, others)):
        kept = [s[s != t] for s in slices]
        inputs = [(data.private.x[s], data.private.y[s]) for s in kept]
        x = np.stack([data.private.x[t], data.test.x[z]])
        y = np.array([data.private.y[t], data.test.y[z]])
        before = _losses(trainer, original, x, y)
        for mode, draw in (("shared", 0), ("fresh", k + 1)):  # fresh: release k+1's own draw, as the product does
            after = trainer.train(inputs, start_stage=SLICES - 1, state=checkpoints[SLICES - 2], draws=[draw] * SLICES)
            diff = _losses(trainer, after, x, y) - before
            scores[mode]["forgotten"].append(float(diff[0]))
            scores[mode]["non_member"].append(float(diff[1]))
        if (k + 1) % 25 == 0:
            print(f"  {k + 1}/{len(targets)} trials ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    out = {"benchmark": "release_differencing", "dataset": config.data.name, "strategy": config.finetune.strategy,
           "epsilon": args.epsilon, "noise_multiplier": recipe.noise_multiplier, "trials": len(targets),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
           "seconds": round(time.perf_counter() - started, 1)}
    for mode, s in scores.items():
        attack = threshold_attack(np.asarray(s["forgotten"]), np.asarray(s["non_member"]))
        out[mode] = {"auc": round(attack.auc, 3), "advantage": round(attack.advantage, 3),
                     "tpr_at_1pct_fpr": round(attack.tpr_at_1pct_fpr, 3),
                     "mean_score_forgotten": round(float(np.mean(s["forgotten"])), 4),
                     "mean_score_non_member": round(float(np.mean(s["non_member"])), 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
