"""What `dpsisa baselines` and `dpsisa unlearnable` return: frozen dataclasses whose rows stay metric
dicts (each method adds its own metrics and details; their keys are listed in docs/cli.md), with
`to_dict` (the --json object and comparison.json) and `human` (the CLI's table) next to them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Comparison:
    """`dpsisa baselines`: one row per method (K seeds each) against its oracle, the original model, the
    forget set, the optional deletion-rate curve, and what the table's score means."""

    rows: list[dict[str, Any]]
    original: dict[str, Any]
    oracle: dict[str, Any]
    forget: dict[str, Any]
    k: int
    seeds: list[int]
    oracle_seeds: list[int]
    methods: list[str]
    curve: list[dict[str, Any]]
    out_dir: str
    neurips2023_score: dict[str, Any]
    deprecated_keys: dict[str, str]
    dataset: str
    private_samples: int
    test_samples: int
    retain_sample: int
    total_seconds: float
    mlflow_run_id: str | None = None  # set once the command's MLflow run holds the result (absent before)

    def to_dict(self, with_run_id: bool = True) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not with_run_id:
            del out["mlflow_run_id"]
        return out

    def human(self) -> str:
        return format_table(self.to_dict())


@dataclass(frozen=True)
class UnlearnableResult:
    """`dpsisa unlearnable`: clean-test accuracy per protected fraction, and the noise model's facts."""

    rows: list[dict[str, Any]]
    budget: float
    steps: int
    rounds: int
    noise_rounds: int
    noise_seconds: float
    noise_train_accuracy: float
    noise_loss: float
    noise_clean_loss: float
    dataset: str
    private_samples: int
    test_samples: int
    epochs: int
    model: str
    random_noise_accuracy: float | None = None  # the random-noise control, when it ran (absent from the JSON otherwise)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.random_noise_accuracy is None:
            del out["random_noise_accuracy"]
        return out

    def human(self) -> str:
        return format_unlearnable(self.to_dict())


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def header(result: dict) -> str:
    o, f, r = result["original"], result["forget"], result["oracle"]
    what = f"class {f['class']}" if f["class"] is not None else f"{f['count']} random ids"
    return (f"Unlearning methods on {result['dataset']} ({result['private_samples']} private ids, forget {what}, "
            f"K={result['k']} seeds)\noriginal (full finetune, S=1): forget accuracy {o['forget_accuracy']:.3f}, "
            f"test {o['test_accuracy']:.3f}: gap {o['gap_points']:+.1f} points; MIA AUC on the forget set {o['mia_auc']:.3f} "
            f"(95% CI {o['mia_auc_ci'][0]:.2f}–{o['mia_auc_ci'][1]:.2f}), on {result['retain_sample']} retained ids "
            f"{o['mia_auc_retain']:.3f} ({o['mia_auc_retain_ci'][0]:.2f}–{o['mia_auc_retain_ci'][1]:.2f})"
            f"\noracle (retrain without the forget set): forget accuracy {r['forget_accuracy']:.3f}, "
            f"test {r['test_accuracy']:.3f}")


def _ulira(row: dict) -> str:
    """U-LiRA balanced accuracy / its chance level from relabelled models (K ≥ 2 seeds)."""
    if row.get("ulira_balanced_accuracy") is None:
        return "–"
    chance = row.get("ulira_at_chance")
    return f"{row['ulira_balanced_accuracy']:.2f}/{chance:.2f}" if chance is not None else f"{row['ulira_balanced_accuracy']:.2f}"


def _score(row: dict) -> str:
    """The NeurIPS-2023 score and, with K ≥ 2 seeds, its permutation null's central 95%."""
    if row.get("neurips2023_score_null_p025") is None:
        return f"{row['neurips2023_score']:.3f}"
    return f"{row['neurips2023_score']:.3f} [{row['neurips2023_score_null_p025']:.2f},{row['neurips2023_score_null_p975']:.2f}]"


def format_table(result: dict) -> str:
    lines = [header(result),
             f"{'method':<24}{'family':<12}{'oracle':<14}{'forget':>7}{'retain':>7}{'test':>7}{'MIA':>6}"
             f"{'KL':>9}{'L2':>8}{'score [null 95%]':>19}{'U-LiRA':>13}{'sec':>8}{'×':>8}{'storage':>11}"]
    for r in result["rows"]:
        speed = "inst." if r["speedup"] is None else f"{r['speedup']:.1f}"
        lines.append(f"{r['method']:<24}{r['family']:<12}{r['oracle']:<14}{r['forget_accuracy']:7.3f}"
                     f"{r['retain_accuracy']:7.3f}{r['test_accuracy']:7.3f}{r['mia_auc']:6.3f}{r['kl_to_oracle']:9.4f}"
                     f"{r['l2_to_oracle']:8.3f}{_score(r):>19}{_ulira(r):>13}{r['seconds']:8.2f}{speed:>8}{_bytes(r['storage_bytes']):>11}")
    notes = [f"  {r['method']}: {r['details']['certificate']}" for r in result["rows"] if "certificate" in r["details"]]
    notes += [f"  {r['method']}: {r['details']['note']}" for r in result["rows"] if "note" in r["details"]]
    notes += [_deltagrad_note(r["details"]) for r in result["rows"] if r["method"] == "deltagrad"]
    if notes:
        lines += ["notes:", *notes]
    lines.append("forget/retain/test: accuracy; MIA: loss-attack AUC forget set vs test non-members; KL/L2: to the row's "
                 "oracle (test outputs / parameters); score: the NeurIPS-2023 challenge formula (interval attacks on φ, "
                 "rates clipped at 1/(2K), δ=1e-5), K runs vs K oracle runs (exact rows: their own procedure at K other "
                 "seeds) [the central 95% of its permutation null: a score inside it is what retraining itself scores]; "
                 "U-LiRA: balanced accuracy of the per-example likelihood-ratio attack telling the K runs from the K oracles "
                 "(leave-one-out) / the same at chance (models relabelled at random); ×: speed-up vs the oracle")
    return "\n".join(lines)


def _deltagrad_note(d: dict) -> str:
    def part(name: str, x: dict) -> str:
        saved = x["gradient_evaluations_saved"] / max(x["gradient_evaluations_exact"], 1)
        return (f"{name}: L2 to the exact head {x['l2_to_exact']:.2e} (unchanged head: {x['l2_original_to_exact']:.2e}), "
                f"×{x['speedup_vs_exact']:.1f} vs exact GD, {saved:.0%} of gradient evaluations saved")
    return f"  deltagrad: {part('delete', d)}; {part('add', d['add'])}"


def format_unlearnable(result: dict) -> str:
    """`dpsisa unlearnable`'s table: clean-test accuracy as the protected (unlearnable) fraction grows."""
    lines = [f"Unlearnable examples on {result['dataset']} ({result['private_samples']} private ids, {result['model']} from "
             f"scratch, {result['epochs']} epochs, L∞ budget {result['budget'] * 255:.1f}/255 pixels; noise model "
             f"{result['noise_train_accuracy']:.3f} train accuracy on x+δ)",
             f"{'fraction':>9}{'|Du|':>7}{'|Dc|':>7}{'Dc only':>10}{'Dc + Du':>10}"]
    for r in result["rows"]:
        clean = "n/a" if r["clean_only_accuracy"] is None else f"{r['clean_only_accuracy']:.4f}"
        lines.append(f"{r['fraction']:9.2f}{r['unlearnable_samples']:7d}{r['clean_samples']:7d}{clean:>10}"
                     f"{r['with_unlearnable_accuracy']:10.4f}")
    if "random_noise_accuracy" in result:
        lines.append(f"control: every sample with random noise of the same budget → {result['random_noise_accuracy']:.4f}")
    lines.append("Dc only: trained on the clean part; Dc + Du: also on the perturbed part (clean-test accuracy both)")
    return "\n".join(lines)
