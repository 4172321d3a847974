"""Does replaying stages after a deletion equal from-scratch training on this device? Checks
every finetuning strategy, DP on and off, on scikit-learn digits; prints one JSON object.

    python bench/replay_exactness.py [--device cpu|cuda]

On CPU this is guaranteed (and tested). On CUDA, bitwise equality also needs deterministic
kernels: this script sets torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.core import finetune, models, privacy
from pipeline.core.train import ShardTrainer  # noqa: E402
from pipeline.data import datasets  # noqa: E402
from pipeline.data.partition import partition  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    base = config_mod.load(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "digits.yaml")
    data = datasets.load(base.data)
    cols = partition(data.private.ids, data.private.y, 2, 3, "uniform", seed=0)
    mine = cols["shard"] == 0
    slices = [cols["sample_id"][mine & (cols["slice"] == r)] for r in range(3)]
    forgotten = slices[1][[0, 5, 9]]
    kept = [s[~np.isin(s, forgotten)] for s in slices]
    results = {}
    for strategy in ("fc", "fc_gn", "fc_gn_conv", "full"):
        for epsilon in ("1.0", "null"):
            config = base.with_overrides({"finetune.strategy": strategy, "privacy.epsilon": None if epsilon == "null" else 1.0})
            model = models.build("gn_cnn", data.input_shape, data.num_classes, 8, seed=0)
            plan = finetune.plan_for(model, strategy, 0.05)
            recipe = privacy.make_recipe(config, 0, [len(s) for s in slices])
            trainer = ShardTrainer(model, plan, recipe, seed=0, shard=0, device=args.device)
            start = time.perf_counter()
            first_stage: list = []
            trainer.train([(data.private.x[s], data.private.y[s]) for s in slices],
                          on_stage=lambda j, state, keep=first_stage: keep.append(state) if j == 0 else None)
            replayed = trainer.train([(data.private.x[s], data.private.y[s]) for s in kept], 1, first_stage[0])
            oracle = trainer.train([(data.private.x[s], data.private.y[s]) for s in kept])
            diff = max(float((replayed.params[k] - oracle.params[k]).abs().max()) for k in oracle.params)
            results[f"{strategy}/eps={epsilon}"] = {"exact": diff == 0.0, "max_abs_diff": diff,
                                                    "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps({"benchmark": "replay_exactness", "device": args.device,
                      "torch": torch.__version__, "all_exact": all(r["exact"] for r in results.values()),
                      "results": results}))


if __name__ == "__main__":
    main()
