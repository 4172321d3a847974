"""`dpsisa audit`: a one-run privacy audit with canaries (Steinke, Nasr & Jagielski 2023).

M mislabelled canaries are reserved from the test split and each is trained on with probability ½
(`pipeline/data/canaries.py`; the run's `data.canaries` key, so every later verb on the run sees the
same data). The run trains ONCE through the normal path, then every canary is scored by the loss
attack on the served output: log of the mean-softmax ensemble's probability of the canary's wrong
label (high: memorised, guess "in"). The guesses become a 95%-confidence lower bound on ε for the
run's δ (`pipeline/audit_bound.py`). Unlike `evaluate`'s population attack, canaries are chosen to
be memorable, so the bound is far from 0 when privacy is absent or broken, and a correct DP run
must stay below its accountant's ε. Beside the bound: its randomised-response ceiling for these M at
the claimed ε and the ideal white-box auditor's bound for shard 0's recipe (`audit_ideal.py`; every
canary placed in slice 0, the most exposed place, so an upper end for canaries spread over slices).
(Strictly, the accountant's ε is for adding or removing one sample with every other sample's shard
and slice fixed; the partition is re-drawn from the ids, so the canary coins also reshuffle the others.
The bound's validity assumes this costs no privacy.)

`compare_clean` trains the same config a second time without canaries (twice the cost) to show
what the canaries cost in test accuracy; both runs evaluate on the same test samples (the pool
removed).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.core.checkpoints import atomic_write_json
from pipeline.data import canaries as canaries_mod
from pipeline.data import datasets
from pipeline.errors import UserError
from pipeline.evaluation import audit_bound, audit_ideal
from pipeline.storage.rundir import open_run
from pipeline.tracking import groups
from pipeline.verbs import runs

logger = logging.getLogger(__name__)

ATTACK = "loss"  # log-probability of the canary's wrong label under the mean-softmax ensemble
CLEAN_RUN = "clean"  # sub-directory of the comparison run without canaries
DEFAULT_CANARIES = 200


class AuditError(UserError, ValueError):
    """The audit request is impossible (too few canaries, more than the test split can spare)."""


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower_bound: float  # one-run bound at `confidence`, for `delta`
    epsilon_lower_bound_ceiling: float | None  # randomised-response limit for these M at the claimed ε (audit_ideal)
    epsilon_lower_bound_ideal: float | None  # ideal white-box auditor, shard 0's recipe, every canary in slice 0
    epsilon_lower_bound_ideal_p99: float | None
    noise_calibration_p: float | None  # white-box audits only: always None here
    epsilon: float | None  # the accountant's ε (max over shards); None without DP
    delta: float
    bound_over_epsilon: float | None
    canaries: int
    canaries_included: int
    guesses: int
    guesses_in: int
    guesses_out: int
    correct_guesses: int
    confidence: float
    guess_grid: list[int]
    attack: str
    test_accuracy: float
    test_accuracy_without_canaries: float | None  # None when the clean comparison was skipped
    test_samples: int
    run_dir: str
    clean_run_dir: str | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def human(self) -> str:
        """The CLI's summary without --json."""
        claimed = "no DP (no accountant ε)" if self.epsilon is None else (
            f"accountant ε = {self.epsilon:.3f}, bound/ε = {self.bound_over_epsilon:.2f}")
        clean = ("" if self.test_accuracy_without_canaries is None
                 else f", {self.test_accuracy_without_canaries:.4f} without canaries")
        context = ("" if self.epsilon_lower_bound_ideal is None else
                   f"  ideal white-box auditor {self.epsilon_lower_bound_ideal:.3f}, randomised-response ceiling "
                   f"{self.epsilon_lower_bound_ceiling:.3f} (what was attainable with these canaries at this ε)")
        return "\n".join([
            f"one-run audit: ε ≥ {self.epsilon_lower_bound:.3f} with {self.confidence:.0%} confidence (δ={self.delta:g}); {claimed}",
            *([context] if context else []),
            f"  {self.correct_guesses}/{self.guesses} guesses right ({self.guesses_in} 'in', {self.guesses_out} 'out', "
            f"{self.attack} attack) on {self.canaries} canaries ({self.canaries_included} trained on)",
            f"  test accuracy {self.test_accuracy:.4f} with canaries{clean} ({self.test_samples} test samples)",
            f"  {self.run_dir} ({self.seconds:.0f}s)",
        ])


def canary_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Loss attack: log p(wrong label); a trained-on (memorised) canary scores high."""
    return np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-30, None))


def default_run_dir(config: Config, canaries: int) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return runs.resolve_local_dir(f"audits/{stamp}-{config.data.name}-M{canaries}")


def _load_canary_data(config: Config, canaries: int) -> tuple[Config, datasets.Data]:
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise AuditError(f"--canaries must be an integer, at least 2 (got {canaries!r}); a few hundred give a useful bound.")
    audit_config = config.with_overrides({"data.canaries": canaries})
    try:
        data = datasets.load(audit_config.data)
    except canaries_mod.CanaryCountError as exc:
        raise AuditError(str(exc).replace(f"data.canaries={canaries}", f"--canaries {canaries}")) from exc
    return audit_config, data


@groups.grouped("audit", out_dir="run_dir")
def run_audit(config: Config, canaries: int, run_dir: Path | None = None,
              compare_clean: bool = True) -> AuditResult:
    """Train `config` once with `canaries` canaries, attack them, and bound ε from below (see module docstring)."""
    started = time.perf_counter()
    audit_config, data = _load_canary_data(config, canaries)
    pool = data.canaries
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config, canaries)
    logger.info(f"audit: {pool.count} canaries (wrong labels; {int(pool.included.sum())} trained on, chosen by fair coins) "
                f"in {run_dir}")
    summary = runs.train(audit_config, run_dir)
    probs = runs.predict(run_dir, {"canaries": pool.x})["canaries"]
    scores = canary_scores(probs, pool.label)
    delta = audit_config.privacy.delta
    bound = audit_bound.best_bound(scores, pool.included, delta)
    spent = [e for e in summary.get("epsilon_spent", []) if e is not None]
    epsilon = max(spent) if spent and audit_config.privacy.epsilon is not None else None
    recipe = open_run(run_dir).recipes()[0]
    ideal = audit_ideal.ideal(recipe.noise_multiplier, [(s.sample_rate, s.steps) for s in recipe.stages], pool.count, delta)
    clean_dir, clean_accuracy = None, None
    if compare_clean:
        clean_dir = run_dir / CLEAN_RUN
        logger.info(f"audit: training the same config without canaries for comparison in {clean_dir}")
        clean_config = audit_config.with_overrides({"data.canaries": 0, "data.test_limit": int(len(data.test.y))})
        clean_accuracy = runs.train(clean_config, clean_dir)["accuracy"]
    result = AuditResult(
        epsilon_lower_bound=bound.epsilon_lower_bound,
        epsilon_lower_bound_ceiling=audit_ideal.ceiling(pool.count, epsilon, delta),
        epsilon_lower_bound_ideal=None if ideal is None else ideal.median,
        epsilon_lower_bound_ideal_p99=None if ideal is None else ideal.p99, noise_calibration_p=None,
        epsilon=epsilon, delta=delta,
        bound_over_epsilon=bound.epsilon_lower_bound / epsilon if epsilon else None,
        canaries=pool.count, canaries_included=int(pool.included.sum()), guesses=bound.guesses,
        guesses_in=bound.guesses_in, guesses_out=bound.guesses_out, correct_guesses=bound.correct_guesses,
        confidence=bound.confidence, guess_grid=list(bound.grid), attack=ATTACK, test_accuracy=summary["accuracy"],
        test_accuracy_without_canaries=clean_accuracy, test_samples=int(len(data.test.y)), run_dir=str(run_dir),
        clean_run_dir=None if clean_dir is None else str(clean_dir), seconds=time.perf_counter() - started,
    )
    atomic_write_json(run_dir / "audit.json", {**result.to_dict(), "canary_scores": scores.tolist(),
                                               "canary_included": pool.included.tolist()})
    groups.log_job("audit", audit_config, run_dir, result.to_dict())
    return result
