"""The product's own rows: `retrain` (the oracle), `sisa` (exact sharded forgetting through the
product's `Shard`) and `dp_nothing` (a DP model that does nothing, with its group-privacy certificate).
The two exact rows are scored against their procedure retrained at independent seeds (`oracle`)."""
from __future__ import annotations

import math
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from pipeline.baselines.base import Method, Outcome, Problem, register
from pipeline.baselines.problem import original_config
from pipeline.core.checkpoints import ShardStore
from pipeline.core.finetune import plan_for
from pipeline.core.privacy import make_recipe
from pipeline.core.train import ShardTrainer
from pipeline.data.partition import partition
from pipeline.sisa.shard import Shard
from pipeline.storage.ledger import Ledger


def _train(trainer: ShardTrainer, problem: Problem, ids: np.ndarray):
    return _train_slices(trainer, problem, [ids])


def _train_slices(trainer: ShardTrainer, problem: Problem, slices: list[np.ndarray]):
    start = time.perf_counter()
    state = trainer.train([(problem.x[ids], problem.y[ids]) for ids in slices])
    return trainer.model(state), time.perf_counter() - start


@register
class Retrain(Method):
    """Train from the public model on the retain set with the original's recipe and seeds: the oracle."""

    name = "retrain"
    family = "exact"
    description = "oracle: the original's recipe and seeds on the retain set"

    def unlearn(self, problem: Problem, seed: int, record=None) -> Outcome:
        model, seconds = _train(problem.trainer(seed), problem, problem.retain_order)
        return Outcome([model], seconds, 0, {"samples": int(len(problem.retain_order))})

    def oracle(self, problem: Problem, seed: int) -> Outcome:
        """Itself at another seed: the row is scored against retrains it does not contain."""
        return self.unlearn(problem, seed)


@register
class Sisa(Method):
    """This product's forgetting: an S-shard, R-slice ensemble (same recipe as the original,
    `baselines.sisa_shards` × `baselines.sisa_slices`) trained through `Shard`, which forgets by
    replaying from the last checkpoint that never saw the ids. It is scored against independently
    seeded SISA ensembles trained from scratch without the forget set (`oracle`). Each replay is also
    checked against its shard retrained with the same seed and the replay's draws (what `dpsisa verify`
    compares with): `replay_equals_same_seed_retrain`, bit for bit."""

    name = "sisa"
    family = "exact"
    description = "SISA: replay the owning shards from their last clean slice checkpoint"

    def unlearn(self, problem: Problem, seed: int, record=None) -> Outcome:
        b = problem.config.baselines
        config = original_config(problem.config).with_overrides(
            {"seed": seed, "shards.count": b.sisa_shards, "shards.slices": b.sisa_slices})
        root = Path(problem.workdir or tempfile.mkdtemp(prefix="dpsisa-sisa-"))
        run_dir = root / f"sisa-seed{seed}-{uuid.uuid4().hex[:8]}"
        ids = np.sort(problem.train_order)
        ledger = Ledger(run_dir)
        columns = partition(ids, problem.y[ids], b.sisa_shards, b.sisa_slices, "uniform", seed)
        ledger.write_assignments({**columns, "label": problem.y[columns["sample_id"]]})
        plan = plan_for(problem.pretrained, "full")
        shards, originals, oracles = [], [], []
        train_seconds = 0.0
        for s in range(b.sisa_shards):
            recipe = make_recipe(config, s, [len(x) for x in ledger.shard_slices(s)])
            own = np.sort(columns["sample_id"][columns["shard"] == s])  # a shard reads only its own samples
            ShardStore(run_dir, s).write_data(0, own, problem.x[own], problem.y[own])
            shard = Shard(str(run_dir), s, config.to_dict(), recipe.to_dict(), threads=1, log_progress=False,
                          pretrained=problem.pretrained)
            train_seconds += shard.fit()["seconds"]
            originals.append(shard.model())
            shards.append(shard)
        forget = problem.forget_ids.tolist()
        owners = ledger.owners(forget)
        request = uuid.uuid4().hex[:12]
        replays = {s: shards[s].forget(request, owned) for s, owned in owners.items()}
        seconds = sum(r["seconds"] for r in replays.values())
        oracle_seconds = 0.0
        for s, shard in enumerate(shards):
            trainer = ShardTrainer(problem.pretrained, plan, shard.recipe, seed, s)
            start = time.perf_counter()
            state = trainer.train([(problem.x[x], problem.y[x]) for x in ledger.shard_slices(s, set(forget))],
                                  draws=shard.store.manifest().draws)  # the replay's fresh draws
            oracle_seconds += time.perf_counter() - start
            oracles.append(trainer.model(state))
        stored = sum(p.stat().st_size for p in run_dir.rglob("*.pt"))  # live slice checkpoints
        models = [shard.model() for shard in shards]
        exact = all(torch.equal(p, o.state_dict()[n]) for m, o in zip(models, oracles) for n, p in m.state_dict().items())
        return Outcome(models, seconds, stored,
                       {"shards": b.sisa_shards, "slices": b.sisa_slices, "shards_replayed": sorted(owners),
                        "replay_equals_same_seed_retrain": exact,
                        "stages_replayed": {str(s): r["stages_replayed"] for s, r in replays.items()},
                        "parallel_seconds": max((r["seconds"] for r in replays.values()), default=0.0),
                        "train_seconds": train_seconds},
                       oracle=oracles, oracle_name="sisa_retrain", oracle_seconds=oracle_seconds, original=originals)


    def oracle(self, problem: Problem, seed: int) -> Outcome:
        """An S-shard, R-slice SISA ensemble with `seed` (its own partition and draws), trained from scratch on
        the retain set with the same recipe: what forgetting must be indistinguishable from."""
        b = problem.config.baselines
        config = original_config(problem.config).with_overrides(
            {"seed": seed, "shards.count": b.sisa_shards, "shards.slices": b.sisa_slices})
        ids = np.sort(problem.retain_order)
        columns = partition(ids, problem.y[ids], b.sisa_shards, b.sisa_slices, "uniform", seed)
        plan = plan_for(problem.pretrained, "full")
        models, seconds = [], 0.0
        for s in range(b.sisa_shards):
            mine = columns["shard"] == s  # rows in ledger order: shard, slice, hash order
            slices = [columns["sample_id"][mine & (columns["slice"] == r)] for r in range(b.sisa_slices)]
            recipe = make_recipe(config, s, [len(x) for x in slices])
            model, took = _train_slices(ShardTrainer(problem.pretrained, plan, recipe, seed, s), problem, slices)
            models.append(model)
            seconds += took
        return Outcome(models, seconds, 0, {"shards": b.sisa_shards, "slices": b.sisa_slices}, oracle_name="sisa_retrain")


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(kε, k·e^{(k−1)ε}·δ): what an (ε, δ)-DP guarantee says about a group of k samples."""
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta


@register
class DpNothing(Method):
    """A DP model (`baselines.dp_epsilon`, `baselines.dp_strategy`, one shard of one slice) that
    does nothing on a deletion request: DP already bounds what any sample changed. Its oracle is
    the same DP recipe (same σ, rates, steps and seeds) retrained without the forget set. The
    certificate for k forgotten samples in one shard is group privacy; it is vacuous once
    k·e^{(k−1)ε}·δ ≥ 1 (at ε=1, δ=1e-5: k ≥ 11)."""

    name = "dp_nothing"
    family = "certified"
    description = "DP model, no update: the group-privacy certificate (kε, k·e^{(k−1)ε}·δ)"

    def unlearn(self, problem: Problem, seed: int, record=None) -> Outcome:
        b = problem.config.baselines
        config = original_config(problem.config).with_overrides(
            {"seed": seed, "privacy.epsilon": b.dp_epsilon, "finetune.strategy": b.dp_strategy})
        recipe = make_recipe(config, 0, [len(problem.train_order)])
        plan = plan_for(problem.pretrained, b.dp_strategy, config.finetune.conv_fraction)
        trainer = ShardTrainer(problem.pretrained, plan, recipe, seed, 0)
        original, train_seconds = _train(trainer, problem, problem.train_order)
        oracle, oracle_seconds = _train(trainer, problem, problem.retain_order)
        start = time.perf_counter()
        unlearned = original  # the method: nothing to do
        seconds = time.perf_counter() - start
        k = int(len(problem.forget_ids))
        eps_k, delta_k = group_privacy(recipe.epsilon_spent, recipe.delta, k)
        vacuous = delta_k >= 1.0
        return Outcome([unlearned], seconds, 0,
                       {"epsilon": recipe.epsilon_spent, "delta": recipe.delta, "noise_multiplier": recipe.noise_multiplier,
                        "strategy": b.dp_strategy, "forgotten_in_shard": k, "certificate_epsilon": eps_k,
                        "certificate_delta": delta_k, "certificate_vacuous": vacuous,
                        "certificate": (f"({eps_k:.3g}, {min(delta_k, 1.0):.3g})-indistinguishable from the retrained model"
                                        + (" — VACUOUS (δ ≥ 1)" if vacuous else "")),
                        "train_seconds": train_seconds},
                       oracle=[oracle], oracle_name="dp_retrain", oracle_seconds=oracle_seconds, original=[original])
