"""`dpsisa audit CONFIG --white-box`: a one-run white-box audit of the DP training step (Nasr et al. 2023's
gradient canaries, Steinke, Nasr & Jagielski 2023's one-run bound).

What it audits: one shard-like DP model, trained in this process (no Ray) through the product's
training core (`ShardTrainer`, Opacus), on the config's shard 0 (its slices from the keyed partition,
its subjects under person-level DP) with shard 0's recipe: the σ, Poisson rates and steps the
accountant calibrated for the config's ε. M gradient canaries (`gradient_canaries.py`; no data is
reserved) are added to it, each one more unit (a sample, or a person under `privacy.unit: subject`)
taking part in every stage like a unit of slice 0; the recipe is not recomputed for them, since the
accountant's ε holds for adding or removing one unit whatever the data set's size. The auditor sees
every step's noisy summed gradient and the clean data-gradient sum the training recorded, scores each
canary by the log-likelihood ratio of its per-step residuals under the recorded σ and rates (without
DP: their sum), and applies the one-run bound (`audit_bound.best_bound`). Beside it: the ceiling and the
ideal auditor's bound for the same M and recipe (`audit_ideal.py`), and `noise_calibration_p`, a χ²
test of the excluded canaries' scores against the recorded σ.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.core.checkpoints import atomic_write_json
from pipeline.core.finetune import plan_for
from pipeline.core.pretrain import pretrained_model
from pipeline.core.privacy import Recipe, make_recipe
from pipeline.core.train import ShardTrainer, predict_proba, resolve_device
from pipeline.data import datasets, subjects
from pipeline.data.partition import partition
from pipeline.evaluation import audit_bound, audit_ideal
from pipeline.evaluation.gradient_canaries import GradientCanaries
from pipeline.tracking import groups

logger = logging.getLogger(__name__)

SHARD = 0
DEFAULT_CANARIES = 1000


@dataclass(frozen=True)
class WhiteBoxAuditResult:
    epsilon_lower_bound: float
    epsilon_lower_bound_ceiling: float | None  # randomised-response limit for these M at the claimed ε
    epsilon_lower_bound_ideal: float | None  # median ideal white-box auditor, recorded σ, rates, steps, M
    epsilon_lower_bound_ideal_p99: float | None
    ideal_runs: int
    noise_calibration_p: float | None  # χ² test of the excluded canaries' scores against the recorded σ
    epsilon: float | None  # the recipe's (accountant's) ε; None without DP
    delta: float
    bound_over_epsilon: float | None
    canaries: int
    canaries_included: int
    canary_samplings: int
    guesses: int
    guesses_in: int
    guesses_out: int
    correct_guesses: int
    confidence: float
    guess_grid: list[int]
    score: str
    sigma: float | None
    steps: int
    stage_steps: list[int]
    sample_rate: list[float]
    unit: str
    strategy: str
    trainable_parameters: int
    shard: int
    shard_samples: int
    test_accuracy: float
    run_dir: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def human(self) -> str:
        """The CLI's summary without --json."""
        def num(v: float | None, spec: str = ".3f") -> str:
            return "n/a (no DP)" if v is None else format(v, spec)

        claimed = "no DP (no accountant ε)" if self.epsilon is None else f"accountant ε = {self.epsilon:.3f}"
        sigma = "no DP" if self.sigma is None else f"σ={self.sigma:.3f}"
        return "\n".join([
            f"white-box one-run audit: ε ≥ {self.epsilon_lower_bound:.3f} with {self.confidence:.0%} confidence "
            f"(δ={self.delta:g}); {claimed}",
            f"  ideal auditor {num(self.epsilon_lower_bound_ideal)} (median of {self.ideal_runs} simulated runs, 99th pct "
            f"{num(self.epsilon_lower_bound_ideal_p99)}); randomised-response ceiling {num(self.epsilon_lower_bound_ceiling)}",
            f"  noise calibration p = {num(self.noise_calibration_p, '.3g')} (excluded canaries' scores vs the recorded σ)",
            f"  {self.correct_guesses}/{self.guesses} guesses right ({self.score}) on {self.canaries} gradient canaries "
            f"({self.canaries_included} included); {sigma}, {self.steps} steps, {self.unit} level, {self.strategy}",
            f"  shard {self.shard} ({self.shard_samples} samples), test accuracy {self.test_accuracy:.4f}; "
            f"{self.run_dir} ({self.seconds:.0f}s)",
        ])


def shard_slices(config: Config, data: datasets.Data, owners: np.ndarray, shard: int = SHARD) -> list[np.ndarray]:
    """Ids of each slice of `shard` under the config's (keyed) partition, sorted."""
    ids = data.private.ids
    columns = partition(ids, data.private.y[ids], config.shards.count, config.shards.slices, config.partition.strategy,
                        config.seed, data.private.x[ids], subjects=owners[ids], key=config.partition.key)
    mine = columns["shard"] == shard
    return [np.sort(columns["sample_id"][mine & (columns["slice"] == r)]) for r in range(config.shards.slices)]


def canary_scores(projections: np.ndarray, recipe: Recipe, rates: np.ndarray) -> tuple[np.ndarray, str]:
    """Per-canary scores from per-step observations (M × T): the log-likelihood ratio under the recorded σ
    and rates with DP, the plain sum of the projections without."""
    if recipe.private:
        return audit_ideal.log_likelihood_ratio(projections, rates, recipe.noise_multiplier), "log_likelihood_ratio"
    return projections.sum(axis=1), "projection_sum"


@groups.grouped("audit", out_dir="run_dir")
def run_whitebox_audit(config: Config, canaries: int, run_dir: Path) -> WhiteBoxAuditResult:
    """Train shard 0's model once with `canaries` gradient canaries and bound ε from below (module docstring)."""
    started = time.perf_counter()
    data = datasets.load(config.data)
    model, _ = pretrained_model(config, data)
    plan = plan_for(model, config.finetune.strategy, config.finetune.conv_fraction)
    named = dict(model.named_parameters())
    injection = GradientCanaries({n: tuple(named[n].shape) for n in plan.trainable}, plan.masks, canaries,
                                 config.privacy.max_grad_norm, config.seed, SHARD)  # refuses too many canaries
    owners = subjects.for_private_ids(config.data.subjects, data.private.ids)
    slices = shard_slices(config, data, owners)
    recipe = make_recipe(config, SHARD, [len(s) for s in slices], [len(set(owners[s])) for s in slices])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    noise = f"σ={recipe.noise_multiplier:.3f}" if recipe.private else "no DP"
    logger.info(f"white-box audit: {canaries} gradient canaries ({int(injection.included.sum())} included) on shard {SHARD} "
        f"({sum(map(len, slices))} samples, {config.finetune.strategy}, {noise}) in {run_dir}")
    trainer = ShardTrainer(model, plan, recipe, config.seed, SHARD, resolve_device(config.train.device))
    by_subject = recipe.unit == "subject"
    state = trainer.train([(data.private.x[s], data.private.y[s]) for s in slices],
                          subjects=[owners[s] for s in slices] if by_subject else None, inject=injection)
    predicted = predict_proba(trainer.model(state), torch.from_numpy(data.test.x).to(trainer.device)).argmax(1).cpu().numpy()
    projections, rates = injection.per_step(), np.asarray(injection.rates)
    scores, score_name = canary_scores(projections, recipe, rates)
    delta, included = config.privacy.delta, injection.included
    bound = audit_bound.best_bound(scores, included, delta)
    epsilon = recipe.epsilon_spent if recipe.private else None
    ideal = audit_ideal.ideal(recipe.noise_multiplier, [(s.sample_rate, s.steps) for s in recipe.stages], canaries, delta)
    result = WhiteBoxAuditResult(
        epsilon_lower_bound=bound.epsilon_lower_bound, epsilon_lower_bound_ceiling=audit_ideal.ceiling(canaries, epsilon, delta),
        epsilon_lower_bound_ideal=None if ideal is None else ideal.median,
        epsilon_lower_bound_ideal_p99=None if ideal is None else ideal.p99, ideal_runs=audit_ideal.IDEAL_RUNS,
        noise_calibration_p=audit_ideal.noise_calibration_p(projections[~included].sum(axis=1), projections.shape[1],
                                                            recipe.noise_multiplier),
        epsilon=epsilon, delta=delta, bound_over_epsilon=bound.epsilon_lower_bound / epsilon if epsilon else None,
        canaries=canaries, canaries_included=int(included.sum()), canary_samplings=injection.samplings,
        guesses=bound.guesses, guesses_in=bound.guesses_in, guesses_out=bound.guesses_out,
        correct_guesses=bound.correct_guesses, confidence=bound.confidence, guess_grid=list(bound.grid), score=score_name,
        sigma=recipe.noise_multiplier, steps=int(projections.shape[1]), stage_steps=[s.steps for s in recipe.stages],
        sample_rate=[s.sample_rate for s in recipe.stages], unit=recipe.unit, strategy=config.finetune.strategy,
        trainable_parameters=injection.trainable_parameters, shard=SHARD, shard_samples=int(sum(map(len, slices))),
        test_accuracy=float((predicted == data.test.y).mean()), run_dir=str(run_dir),
        seconds=time.perf_counter() - started,
    )
    atomic_write_json(run_dir / "audit.json", {**result.to_dict(), "white_box": True, "canary_scores": scores.tolist(),
                                               "canary_included": included.tolist(), "recipe": recipe.to_dict()})
    groups.log_job("audit", config, run_dir, result.to_dict())
    return result
