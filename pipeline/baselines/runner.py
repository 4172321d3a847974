"""`dpsisa baselines`: train the shared original once, run every (method, seed) as a Ray task,
judge all rows with one yardstick, and write the table (+ plots, MLflow) to the out dir.

Ray stays here: the methods are plain torch. Each task gets the problem (data, public and
original models) and its method's training-time record from the object store, so tasks run
in parallel on whatever the cluster has.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.baselines import METHODS, get
from pipeline.baselines.base import BaselineError, Method, Outcome, Problem
from pipeline.baselines.problem import choose_forget, load_problem, train_original
from pipeline.baselines.results import Comparison
from pipeline.baselines.yardstick import DEPRECATED_KEYS, SCORE_DEFINITION, Labels, Run, accuracies, compare, original_gap
from pipeline.config import Config
from pipeline.core.train import predict_logits, predict_proba
from pipeline.sisa import cluster
from pipeline.tracking import groups

logger = logging.getLogger(__name__)

ORACLE = "retrain"
RETAIN_SAMPLE = 2000


def parse_methods(text: str | None) -> list[str]:
    """'a,b' → ['a', 'b']; None → every registered method. Empty items, duplicates and unknown names are refused."""
    if text is None:
        return list(METHODS)
    names = [t.strip() for t in text.split(",")]
    if any(not n for n in names):
        raise BaselineError(f"--methods '{text}' has an empty item; list names separated by single commas.")
    if len(set(names)) != len(names):
        raise BaselineError(f"--methods '{text}' names a method twice.")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise BaselineError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    return names


def parse_fractions(text: str | None, flag: str = "--forget-fractions", closed: bool = False) -> list[float]:
    """'0.01,0.1' → [0.01, 0.1]; each in (0, 1), or [0, 1] when `closed`; empty items are refused."""
    if not text:
        return []
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError as exc:
        raise BaselineError(f"{flag} '{text}' must be numbers separated by single commas, e.g. 0.001,0.01.") from exc
    bad = [v for v in values if not (0 <= v <= 1 if closed else 0 < v < 1)]
    if bad:
        raise BaselineError(f"{flag} {bad} must each be in {'[0, 1]' if closed else '(0, 1)'}.")
    return values


def _predictions(models: list[torch.nn.Module], inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {s: np.mean([predict_proba(m, x).numpy() for m in models], axis=0) for s, x in inputs.items()}


def _params(models: list[torch.nn.Module]) -> list[dict[str, np.ndarray]]:
    return [{n: p.detach().cpu().numpy().copy() for n, p in m.named_parameters()} for m in models]


def _pack(models: list[torch.nn.Module], seconds: float, inputs: dict[str, torch.Tensor]) -> Run:
    forget_logits = np.stack([predict_logits(m, inputs["forget"]).numpy() for m in models])  # float64: LiRA's φ
    return Run(_predictions(models, inputs), _params(models), seconds, forget_logits)


def independent(name: str) -> bool:
    """Whether the method is scored against its own `oracle` at independent seeds (the exact rows)."""
    return type(get(name)).oracle is not Method.oracle


def run_method(problem: Problem, name: str, seed: int, record, retain_rows: np.ndarray, role: str = "method") -> dict:
    """One (method, seed): unlearn (role "method"), or train the method's independently seeded oracle (role
    "oracle"), then predict on the forget set, a retain sample and the test set."""
    torch.set_num_threads(1)  # bitwise reproducible, and one core per task
    method = get(name)
    out: Outcome = method.unlearn(problem, seed, record) if role == "method" else method.oracle(problem, seed)
    inputs = {"forget": torch.from_numpy(np.array(problem.x[problem.forget_ids])),
              "retain": torch.from_numpy(np.array(problem.x[retain_rows])),
              "test": torch.from_numpy(np.array(problem.x_test))}
    result = {"method": name, "seed": seed, "role": role, "run": _pack(out.models, out.seconds, inputs),
              "storage_bytes": int(out.storage_bytes), "details": out.details, "oracle_name": out.oracle_name}
    if out.oracle is not None and role == "method" and not independent(name):
        result["oracle"] = _pack(out.oracle, out.oracle_seconds or 0.0, inputs)
    return result


def _labels(problem: Problem, retain_rows: np.ndarray) -> Labels:
    test_rows = np.arange(len(problem.y_test))
    if problem.forget_class is not None:
        test_rows = test_rows[problem.y_test == problem.forget_class]
    return Labels(problem.y[problem.forget_ids], problem.y[retain_rows], problem.y_test, test_rows)


def _retain_rows(problem: Problem) -> np.ndarray:
    retain = problem.retain_order
    rng = np.random.default_rng(problem.config.seed)
    return np.sort(rng.choice(retain, min(RETAIN_SAMPLE, len(retain)), replace=False))


class _Tasks:
    """Submit (method, seed) tasks to Ray and collect them as they finish, with progress."""

    def __init__(self):
        import ray

        self.ray = ray
        self.remote = ray.remote(num_cpus=1, max_retries=0)(run_method)
        self.pending: dict = {}

    def submit(self, problem_ref, name: str, seed: int, record_ref, retain_rows: np.ndarray, tag: str = "",
               role: str = "method") -> None:
        ref = self.remote.remote(problem_ref, name, seed, record_ref, retain_rows, role)
        self.pending[ref] = (name, seed, tag, time.perf_counter())

    def submit_rows(self, problem_ref, names: list[str], seeds: list[int], oracle_seeds: list[int], record_refs: dict,
                    retain_rows: np.ndarray, tag: str = "") -> None:
        """Every (method, seed), the shared `retrain` oracle's seeds, and the exact rows' oracles at `oracle_seeds`."""
        for name in dict.fromkeys([ORACLE, *names]):
            for s in seeds:
                self.submit(problem_ref, name, s, record_refs[name], retain_rows, tag)
        for name in (n for n in names if independent(n)):
            for s in oracle_seeds:
                self.submit(problem_ref, name, s, None, retain_rows, tag, role="oracle")

    def gather(self) -> list[dict]:
        results, total = [], len(self.pending)
        while self.pending:
            done, _ = self.ray.wait(list(self.pending), num_returns=1)
            name, seed, tag, _ = self.pending.pop(done[0])
            result = self.ray.get(done[0])
            result["tag"] = tag
            results.append(result)
            what = "unlearned" if result["role"] == "method" else "oracle trained"
            logger.info(f"  [{len(results)}/{total}] {name}{tag} seed {seed}: {what} in {result['run'].seconds:.1f}s")
        return results


def oracle_seeds_for(seeds: list[int]) -> list[int]:
    """The exact rows' oracle seeds: the next K after the runs' seeds s … s+K−1 (as `dpsisa score`)."""
    return [max(seeds) + 1 + i for i in range(len(seeds))]


def _rows(results: list[dict], methods: list[str], seeds: list[int], labels: Labels, seed: int,
          permutations: int) -> list[dict]:
    by = {(r["role"], r["method"], r["seed"]): r for r in results}
    shared = [by[("method", ORACLE, s)]["run"] for s in seeds]
    rows = []
    for name in methods:
        mine = [by[("method", name, s)] for s in seeds]
        if independent(name):  # exact rows: their procedure retrained at other seeds, never the runs themselves
            oracles = [by[("oracle", name, s)]["run"] for s in oracle_seeds_for(seeds)]
        else:
            oracles = [m["oracle"] for m in mine] if "oracle" in mine[0] else shared
        row = compare([m["run"] for m in mine], oracles, labels, seed, permutations)
        method = METHODS[name]
        rows.append({"method": name, "family": method.family, "oracle": mine[0]["oracle_name"],
                     "description": method.description, **row, "storage_bytes": mine[0]["storage_bytes"],
                     "k": len(seeds), "details": mine[0]["details"]})
    return rows


def run_comparison(config: Config, out_dir: Path, methods: list[str], *, count: int | None = None,
                   fraction: float | None = None, forget_class: int | None = None, k: int = 2,
                   fractions: list[float] | None = None, permutations: int = 100,
                   ) -> Comparison:
    """The whole comparison: one row per method, the original, the oracle, the optional curve."""
    if k < 1:
        raise BaselineError(f"--k must be at least 1 (runs per method and oracle retrains); got {k}.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BaselineError(f"{out_dir} is not empty; choose a new --out-dir.")
    started = time.perf_counter()
    problem = load_problem(config, count, fraction, forget_class)  # refuses bad forget specs before any write
    out_dir.mkdir(parents=True, exist_ok=True)
    groups.start_group()  # the request passed its checks: the command's MLflow run shows as RUNNING from here
    problem.workdir = str(out_dir / "work")
    torch.set_num_threads(1)
    recorders = {n: r for n in methods if (r := get(n).recorder(problem)) is not None}
    original_info = train_original(problem, recorders)
    records = {n: r.record() for n, r in recorders.items()}
    retain_rows = _retain_rows(problem)
    labels = _labels(problem, retain_rows)
    inputs = {"forget": torch.from_numpy(problem.x[problem.forget_ids]),
              "retain": torch.from_numpy(problem.x[retain_rows]), "test": torch.from_numpy(problem.x_test)}
    original = original_gap(_predictions([problem.original], inputs), labels, config.seed)
    logger.info(f"original: forget accuracy {original['forget_accuracy']:.3f} vs test {original['test_accuracy']:.3f} "
        f"(gap {original['gap_points']:+.1f} points), MIA AUC on the forget set {original['mia_auc']:.3f}")

    import ray

    cluster.connect(config.ray)
    problem_ref = ray.put(problem)
    record_refs = {n: ray.put(records.get(n)) for n in set(methods) | {ORACLE}}
    seeds = [config.seed + i for i in range(k)]
    oracle_seeds = oracle_seeds_for(seeds)
    exact = [n for n in methods if independent(n)]
    tasks = _Tasks()
    logger.info(f"running {len(methods)} method(s) × {k} seed(s) + {k} oracle retrain(s) + {len(exact)} exact row oracle(s) "
        f"× {k} independent seed(s) as Ray tasks ...")
    tasks.submit_rows(problem_ref, methods, seeds, oracle_seeds, record_refs, retain_rows)
    results = tasks.gather()
    rows = _rows(results, methods, seeds, labels, config.seed, permutations)
    shared = [r for r in results if r["method"] == ORACLE and r["role"] == "method"]
    oracle = {key: float(np.mean([accuracies(r["run"].probs, labels)[key] for r in shared]))
              for key in ("forget_accuracy", "retain_accuracy", "test_accuracy")}
    curve = _curve(problem, methods, fractions, record_refs) if fractions else []
    return Comparison(
        rows=rows, original={**original, **original_info, "samples": int(len(problem.train_order))},
        oracle={"name": ORACLE, **oracle},
        forget={"count": int(len(problem.forget_ids)), "fraction": fraction, "class": forget_class},
        k=k, seeds=seeds, oracle_seeds=oracle_seeds, methods=methods, curve=curve, out_dir=str(out_dir),
        neurips2023_score={"definition": SCORE_DEFINITION, "delta": 1e-5, "rate_clip": f"1/(2K) = {1 / (2 * k):g}",
                           "permutations": permutations if k > 1 else 0},
        deprecated_keys={f"rows.{old}": f"rows.{new} (kept for one release)" for old, new in DEPRECATED_KEYS.items()},
        dataset=config.data.name, private_samples=int(len(problem.train_order)),
        test_samples=int(len(problem.y_test)), retain_sample=int(len(retain_rows)),
        total_seconds=time.perf_counter() - started)


def _curve(problem: Problem, methods: list[str], fractions: list[float], record_refs: dict) -> list[dict]:
    """Deletion-rate curve: one seed per (fraction, method), same original, each fraction its own forget set."""
    import ray

    seed = problem.config.seed
    curve_methods = [m for m in methods if METHODS[m].family != "certified"]
    tasks, labels = _Tasks(), {}
    logger.info(f"deletion-rate curve: fractions {fractions} × {len(curve_methods)} method(s) ...")
    for f in fractions:
        forget = choose_forget(len(problem.y), problem.y, problem.num_classes, seed, fraction=f)
        variant = dataclasses.replace(problem, forget_ids=forget)
        rows = _retain_rows(variant)
        labels[f] = _labels(variant, rows)
        ref = ray.put(variant)  # records put once, reused
        tasks.submit_rows(ref, curve_methods, [seed], oracle_seeds_for([seed]), record_refs, rows, tag=f" @{f:g}")
    results = tasks.gather()
    points = []
    for f in fractions:
        mine = [r for r in results if r["tag"] == f" @{f:g}"]
        rows = _rows(mine, curve_methods, [seed], labels[f], seed, permutations=0)
        points += [{"fraction": f, "forget_count": len(labels[f].forget),
                    **{k: r[k] for k in ("method", "family", "forget_accuracy", "retain_accuracy", "test_accuracy",
                                         "kl_to_oracle", "l2_to_oracle", "seconds", "speedup")}} for r in rows]
    return points
