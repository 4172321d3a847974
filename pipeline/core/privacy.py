"""The one place DP is decided: the per-shard training recipe, noise calibration, accounting.

A sample in slice 0 takes part in every slice stage, so one noise multiplier is calibrated for
the composition of all stages (each with its own Poisson rate q_j = B / n_j and step count).
By parallel composition over disjoint shards the ensemble has the same (ε, δ). The recipe is
fixed at train time and stored: a deletion shrinks n_j but never changes q_j, steps or σ, so
stages that are kept stay bit-identical and replays equal from-scratch training.

The privacy unit (`privacy.unit`, see `config.privacy_unit`) is what a stage samples, clips and
accounts for: a sample, or a data subject (a person: all their samples). With unit "subject"
the batch size counts subjects, q_j = B / m_j with m_j the subjects in slices 0..j, and each
sampled subject's summed gradient is clipped to C (`train.py`), so the recipe's ε is per person.
With unit "sample" a person owning k samples has only the group bound (kε, k·e^{(k−1)ε}·δ)
(`group_bound`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.config import Config, cache_root, privacy_unit
from pipeline.errors import UserError

# Calibration probes extreme σ values, where Opacus's RDP analysis notes that its largest (or smallest) order was
# optimal; the bound it returns is still valid (only looser), and the search moves on.
warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
SIGMA_BOUNDS = (0.05, 500.0)
CALIBRATION_VERSION = 2  # part of the calibration cache key: bump when `calibrate_noise`'s search changes
CALIBRATION_BAND = 0.995  # a calibrated σ spends ε in [CALIBRATION_BAND·target, target]


class PrivacyError(UserError, ValueError):
    """The privacy target cannot be met with this schedule."""


@dataclass(frozen=True)
class Stage:
    index: int
    samples: int  # cumulative samples at train time (slices 0..index)
    sample_rate: float  # Poisson rate of the privacy unit: of a sample, or of a subject (unit "subject")
    steps: int
    subjects: int | None = None  # unit "subject": cumulative subjects at train time (sample_rate = B / subjects)


@dataclass(frozen=True)
class Recipe:
    """Everything that fixes a shard's training; stored with the run and reused by retrains."""

    shard: int
    stages: tuple[Stage, ...]
    batch_size: int
    lr: float
    momentum: float
    noise_multiplier: float | None  # None: non-private
    max_grad_norm: float
    epsilon_target: float | None
    epsilon_spent: float | None  # for a sample of slice 0 (the most exposed)
    delta: float
    accountant: str
    unit: str = "sample"  # "sample" or "subject": what a step samples and clips, and what ε is per

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        return cls(**{**data, "stages": tuple(Stage(**s) for s in data["stages"])})


def schedule(slice_sizes: list[int], batch_size: int, epochs: float,
             subject_counts: list[int] | None = None) -> tuple[Stage, ...]:
    """Stage j trains `epochs` epochs over slices 0..j with expected batch `batch_size`: of samples,
    or — with `subject_counts` (distinct subjects per slice; a subject lives in one slice) — of subjects."""
    stages, total, people = [], 0, 0
    for index, size in enumerate(slice_sizes):
        total += size
        if subject_counts is None:
            rate = min(1.0, batch_size / total)
            stages.append(Stage(index, total, rate, max(1, math.ceil(epochs / rate))))
        else:
            people += subject_counts[index]
            rate = min(1.0, batch_size / people)
            stages.append(Stage(index, total, rate, max(1, math.ceil(epochs / rate)), people))
    return tuple(stages)


@lru_cache(maxsize=1024)
def spent_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """ε of composing (noise_multiplier, sample_rate, steps) mechanisms, via Opacus.

    Entries with the same (σ, q) are merged by adding their steps first: composing a mechanism
    n times and then m times is composing it n + m times, so the bound is the same, and a shard's
    history after many replays (each repeats its stages' (σ, q)) costs no more than R entries."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        steps[(sigma, rate)] = steps.get((sigma, rate), 0) + int(count)
    from opacus.accountants import PRVAccountant, RDPAccountant  # here: the coordinator's process never loads Opacus

    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()  # config.CHOICES["privacy.accountant"]
    acc.history = [(sigma, rate, count) for (sigma, rate), count in steps.items()]
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q): -inf at q = 1 (no subsampling), which it handles
        return float(acc.get_epsilon(delta=delta))


def _history(stages: tuple[Stage, ...], sigma: float, first: int = 0) -> tuple[tuple[float, float, int], ...]:
    return tuple((sigma, s.sample_rate, s.steps) for s in stages[first:])


def _gdp_epsilon(stages: tuple[Stage, ...], sigma: float, delta: float) -> float:
    """ε at δ of the μ-GDP central-limit approximation of the composed subsampled Gaussian
    (Dong, Roth & Su 2019; Bu et al. 2020): μ = sqrt(Σ_j q_j² T_j (e^{1/σ²} − 1)), and
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2). Not a bound: only the calibration's first guess."""
    growth = math.expm1(min(1.0 / sigma**2, 700.0))
    mu = math.sqrt(sum(s.sample_rate**2 * s.steps for s in stages) * growth)

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2.0))

    def delta_at(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    low, high = 0.0, 700.0
    if delta_at(low) <= delta:
        return 0.0
    for _ in range(100):  # δ(ε) falls in ε: bisect to float precision (cheap arithmetic)
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


def _gdp_sigma(stages: tuple[Stage, ...], epsilon: float, delta: float) -> float:
    """σ at which `_gdp_epsilon` equals `epsilon`, within SIGMA_BOUNDS."""
    low, high = (math.log(b) for b in SIGMA_BOUNDS)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _gdp_epsilon(stages, math.exp(mid), delta) > epsilon else (low, mid)
    return math.exp(high)


@lru_cache(maxsize=256)
def calibrate_noise(stages: tuple[Stage, ...], epsilon: float, delta: float, accountant: str) -> float:
    """A σ whose composed ε over all stages lies in [CALIBRATION_BAND·target, target]: the
    smallest σ meeting the target, to ~0.5% of ε.

    ε(σ) falls monotonically and is nearly a power law (log ε almost linear in log σ), so the
    search is a safeguarded secant in (log σ, log ε) aimed at the middle of the band. The first
    probe is the μ-GDP approximation's σ (`_gdp_sigma`, no accountant call); the second corrects
    that approximation by the accountant's ratio at the first; later probes follow the line through
    the last two. A probe outside the bracket known so far (σ with ε above / at most the target) is
    replaced by the bracket's geometric midpoint, so it never does worse than bisection. Typically 2–4
    accountant calls (seconds each with PRV) where bisection over SIGMA_BOUNDS took ~12."""
    bound_low, bound_high = (math.log(b) for b in SIGMA_BOUNDS)
    goal = math.log(epsilon * (1 + CALIBRATION_BAND) / 2)
    low, high = bound_low, bound_high  # log σ bracket: ε(low) > target (or unprobed bound), ε(high) ≤ target (or unprobed)
    probes: list[tuple[float, float]] = []  # (log σ, log ε)

    def probe(x: float) -> float | None:
        """Probe log σ = x; return σ when its ε lands in the band."""
        nonlocal low, high
        eps = spent_epsilon(_history(stages, math.exp(x)), delta, accountant)
        if eps > epsilon:
            if x >= bound_high:
                raise _unreachable(epsilon)
            low = max(low, x)
        else:
            high = min(high, x)
            if eps >= CALIBRATION_BAND * epsilon or x <= bound_low:
                return math.exp(x)
        probes.append((x, math.log(max(eps, 1e-300))))
        return None

    guess = math.log(_gdp_sigma(stages, epsilon, delta))
    x = min(max(guess, bound_low), bound_high)
    for _ in range(40):
        found = probe(x)
        if found is not None:
            return found
        if len(probes) == 1:  # scale the approximation by the accountant's ratio at the first probe
            ratio = probes[0][1] - math.log(max(_gdp_epsilon(stages, math.exp(x), delta), 1e-300))
            candidate = math.log(_gdp_sigma(stages, math.exp(goal - ratio), delta))
        else:
            (x0, y0), (x1, y1) = probes[-2], probes[-1]
            slope = (y1 - y0) / (x1 - x0) if x1 != x0 else math.nan
            candidate = x1 + (goal - y1) / slope if slope < 0 else math.nan  # ε falls in σ; else bisect
        if not (low < candidate < high) or not math.isfinite(candidate):
            candidate = (low + high) / 2
        if high - low < 1e-9:
            break
        x = candidate
    if spent_epsilon(_history(stages, math.exp(high)), delta, accountant) > epsilon:  # high was never probed
        raise _unreachable(epsilon)
    return math.exp(high)


def _unreachable(epsilon: float) -> PrivacyError:
    return PrivacyError(f"privacy.epsilon={epsilon} cannot be met even with σ={SIGMA_BOUNDS[1]} for this schedule; "
                        "raise privacy.epsilon, lower train.epochs or raise the shard size.")


def _calibration_file(cache: Path, stages: tuple[Stage, ...], epsilon: float, delta: float, accountant: str) -> Path:
    from opacus import __version__ as opacus_version

    key = json.dumps({"version": CALIBRATION_VERSION, "opacus": opacus_version, "bounds": SIGMA_BOUNDS,
                      "stages": [asdict(s) for s in stages], "epsilon": epsilon, "delta": delta,
                      "accountant": accountant}, sort_keys=True)
    return cache / "calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def calibrated_noise(stages: tuple[Stage, ...], epsilon: float, delta: float, accountant: str,
                     cache: Path | None) -> tuple[float, float]:
    """(σ, ε spent at σ): `calibrate_noise`'s σ, remembered under `cache` (the calibration search
    costs ~10 accountant calls, seconds; a run of the same schedule asks again). A remembered σ is
    used only after ε is recomputed from it and lands in [0.995·target, target], the band a fresh
    search ends in; anything else (an edited or stale file) is searched afresh and overwritten."""
    path = None if cache is None else _calibration_file(cache, stages, epsilon, delta, accountant)
    try:
        sigma = float(json.loads(path.read_text())["sigma"]) if path is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        sigma = None
    if sigma is not None and math.isfinite(sigma) and SIGMA_BOUNDS[0] <= sigma <= SIGMA_BOUNDS[1]:
        eps = spent_epsilon(_history(stages, sigma), delta, accountant)
        if CALIBRATION_BAND * epsilon <= eps <= epsilon:
            return sigma, eps
    sigma = calibrate_noise(stages, epsilon, delta, accountant)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"sigma": sigma}))
            os.replace(tmp, path)
        except OSError:  # a read-only cache only costs the next run the search
            pass
    return sigma, spent_epsilon(_history(stages, sigma), delta, accountant)


def make_recipe(config: Config, shard: int, slice_sizes: list[int], subject_counts: list[int] | None = None) -> Recipe:
    """Fix the shard's training recipe (and calibrate σ when DP is on). With privacy unit
    "subject", `subject_counts` gives the distinct subjects of each slice. Without DP there is no
    privacy unit to protect: the recipe samples and averages over samples (ordinary minibatch SGD)
    whatever `privacy.unit` says, so a non-private baseline trains the same on every partition
    (per subject, an unclipped step sums each person's gradients: ~k times the step for k samples each)."""
    unit = privacy_unit(config) if config.privacy.epsilon is not None else "sample"
    if unit == "subject" and subject_counts is None:
        raise PrivacyError("privacy.unit=subject needs the data subjects of each slice; set privacy.unit=sample here.")
    stages = schedule(slice_sizes, config.train.batch_size, config.train.epochs,
                      subject_counts if unit == "subject" else None)
    p = config.privacy
    sigma = eps = None
    if p.epsilon is not None:
        sigma, eps = calibrated_noise(stages, p.epsilon, p.delta, p.accountant, cache_root(config))
    return Recipe(shard, stages, config.train.batch_size, config.train.lr, config.train.momentum,
                  sigma, p.max_grad_norm, p.epsilon, eps, p.delta, p.accountant, unit)


def release_epsilon(recipe: Recipe, replayed_from: list[int]) -> float | None:
    """Cumulative ε of the shard's remaining samples after the original training and one replay
    of stages k..R-1 per retrain (k in `replayed_from`): each retrain is a new release."""
    if not recipe.private:
        return None
    history = _history(recipe.stages, recipe.noise_multiplier)
    for first in replayed_from:
        history += _history(recipe.stages, recipe.noise_multiplier, first)
    return spent_epsilon(history, recipe.delta, recipe.accountant)


def group_bound(epsilon: float, delta: float, k: int) -> dict:
    """Group privacy: an (ε, δ)-DP mechanism is (kε, k·e^{(k−1)ε}·δ)-DP for groups of k units (a
    person owning k samples under unit "sample"); vacuous once that δ reaches 1."""
    group_delta = k * math.exp((k - 1) * epsilon) * delta if (k - 1) * epsilon < 700 else math.inf
    return {"largest_subject_samples": int(k), "epsilon": k * epsilon, "delta": group_delta, "vacuous": group_delta >= 1}


def person_privacy(unit: str | None, epsilon: float | None, delta: float, largest_subject: int | None) -> dict:
    """What a person gets from a release of ε per `unit`: `privacy_unit`, `epsilon_per_person` and
    `delta_per_person` (None without DP, or when the group bound is vacuous or the subjects are
    unknown), and with unit "sample" the `group_bound` for the largest subject. What status,
    receipts and registry tags report."""
    out = {"privacy_unit": unit, "epsilon_per_person": None, "delta_per_person": None, "group_bound": None}
    if epsilon is None:
        return out
    if unit == "subject":
        return {**out, "epsilon_per_person": epsilon, "delta_per_person": delta}
    if largest_subject is None:
        return out
    bound = group_bound(epsilon, delta, largest_subject)
    if not bound["vacuous"]:
        out.update(epsilon_per_person=bound["epsilon"], delta_per_person=bound["delta"])
    return {**out, "group_bound": bound}
