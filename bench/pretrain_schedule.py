"""Public pretraining schedules against time: the public model's own test accuracy (the demo's
DP-finetuned ensemble at ε=1 lands within a few tenths of a point of it) and the seconds each
schedule takes, pretrained by the product's own loop (`pipeline.core.pretrain`), nothing cached.

    python bench/pretrain_schedule.py                                   # fmnist.yaml, the grid below
    python bench/pretrain_schedule.py --schedules 30x128,20x64 --config jobs/configs/digits.yaml

A schedule is EPOCHSxBATCH[@LR] (LR defaults to the config's). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import config as config_mod  # noqa: E402
from pipeline.core import (
    models,
    pretrain,  # noqa: E402
)
from pipeline.core.train import predict_proba  # noqa: E402
from pipeline.data import datasets  # noqa: E402

GRID = "30x128,20x128,20x64,15x64,15x32"


def parse(spec: str) -> list[str]:
    shape, _, lr = spec.partition("@")
    epochs, batch = shape.split("x")
    return [f"pretrain.epochs={int(epochs)}", f"pretrain.batch_size={int(batch)}", *([f"pretrain.lr={float(lr)}"] if lr else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/fmnist.yaml")
    parser.add_argument("--schedules", default=GRID, help="comma-separated EPOCHSxBATCH[@LR]")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = config_mod.load(args.config, args.overrides)
    data = datasets.load(base.data)
    classes = int(data.public.y.max() + 1)
    rows = []
    for spec in args.schedules.split(","):
        config = config_mod.load(args.config, [*args.overrides, *parse(spec)])
        model = models.build(config.model.name, data.input_shape, classes, config.model.width, pretrain.seed(config))
        start = time.perf_counter()
        pretrain._fit(model, data.public.x, data.public.y, config)
        seconds = time.perf_counter() - start
        accuracy = None
        if classes == data.num_classes:  # the public model's head already predicts the private classes
            probs = predict_proba(model, torch.from_numpy(data.test.x)).numpy()
            accuracy = float((probs.argmax(1) == data.test.y).mean())
        rows.append({"schedule": spec, "epochs": config.pretrain.epochs, "batch_size": config.pretrain.batch_size,
                     "lr": config.pretrain.lr, "seconds": round(seconds, 1),
                     "seconds_per_epoch": round(seconds / config.pretrain.epochs, 2), "public_model_test_accuracy": accuracy})
        print(f"{spec}: test accuracy {accuracy}, {seconds:.1f}s", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "pretrain_schedule", "config": args.config, "public_samples": int(len(data.public.y)),
                      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                  "torch_threads": torch.get_num_threads()},
                      "rows": rows, "note": "CPU timings include nothing but the pretraining loop"}))


if __name__ == "__main__":
    main()
