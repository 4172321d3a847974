"""`dpsisa demo`: the whole story in one command — train, evaluate, forget, verify, track."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline import config as config_mod
from pipeline import runs

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fmnist.yaml"


def demo(config_path: str | None, overrides: list[str], run_dir: str | None, log: Callable[[str], None]) -> dict:
    config = config_mod.load(config_path or DEFAULT_CONFIG, overrides)
    path = runs.resolve_run_dir(run_dir, config)
    log(f"== 1/4 train: {config.shards.count} shards × {config.shards.slices} slices, "
        f"{config.finetune.strategy}, ε={config.privacy.epsilon}, δ={config.privacy.delta} → {path}")
    trained = runs.train(config, path, log=log)
    log(f"   test accuracy {trained['accuracy']:.4f} (vote {trained['vote_accuracy']:.4f}), "
        f"full training {trained['full_train_seconds']:.1f}s")
    ids = path.ledger().sample_ids(config.forget.demo_count, config.seed)
    log(f"== 2/4 forget {len(ids)} random training ids: {ids}")
    forgot = runs.forget(path, ids, log=log).to_dict()
    log(f"   retrained shard(s) {forgot['shards_retrained']}, stages replayed {forgot['slices_retrained']}, "
        f"{forgot['seconds']:.1f}s vs full training {forgot['full_train_seconds']:.1f}s (×{forgot['speedup']:.1f}); "
        f"{forgot['work_fraction']:.0%} of the training work replayed (ids in early slices force long replays)")
    log("== 3/4 evaluate the unlearned ensemble")
    evaluated = runs.evaluate_run(path, log=log)
    log("== 4/4 verify: retrain touched shards from scratch without the ids, compare bit for bit")
    verified = runs.verify(path, log=log)
    uri = __import__("pipeline.tracking", fromlist=["x"]).tracking_uri(config)
    print("\n".join([
        "",
        "dpsisa demo summary",
        f"  run directory        {path}",
        f"  test accuracy        {trained['accuracy']:.4f} before forgetting, {evaluated['accuracy']:.4f} after",
        f"  privacy              ε ≤ {max(evaluated['epsilon_spent'] or [0]):.3f} per shard "
        f"(target {config.privacy.epsilon}, δ={config.privacy.delta})" if config.privacy.epsilon else
        "  privacy              no DP",
        f"  forgot               {len(ids)} ids → shards {forgot['shards_retrained']} retrained in "
        f"{forgot['seconds']:.1f}s (full training {forgot['full_train_seconds']:.1f}s; "
        f"{forgot['work_fraction']:.0%} of the training work replayed)",
        f"  unlearning exact     {verified['exact']} (shards checked {verified['shards_checked']})",
        f"  MLflow               mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)",
    ]))
    return {"train": trained, "forget": forgot, "evaluate": evaluated, "verify": verified}
