"""The comparison's outputs: a readable table, CSV/Parquet/JSON files, PNG plots, and MLflow
(the command's one group run, one child run per method). Headless matplotlib (Agg Figures)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.core.checkpoints import atomic_write, atomic_write_json
from pipeline.tracking import mlflow_runs as tracking

COLUMNS = ("method", "family", "oracle", "forget_accuracy", "retain_accuracy", "test_accuracy", "mia_auc",
           "mia_tpr_at_1pct_fpr", "kl_to_oracle", "kl_to_oracle_forget", "l2_to_oracle", "neurips2023_score",
           "neurips2023_score_null_mean", "neurips2023_score_null_p025", "neurips2023_score_null_p975", "ulira_balanced_accuracy",
           "ulira_at_chance", "ulira_tpr_at_1pct_fpr", "seconds", "speedup",
           "storage_bytes")


def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows])


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


def _scatter(rows: list[dict], x: str, y: str, xlabel: str, ylabel: str, title: str, logx: bool = False) -> Figure:
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    for r in rows:
        if r.get(x) is None or r.get(y) is None:
            continue
        xv = max(r[x], 1e-6) if logx else r[x]
        ax.scatter(xv, r[y], s=30)
        ax.annotate(r["method"], (xv, r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


_COLOURS = matplotlib.colormaps["tab20"]


def _curve(points: list[dict]) -> Figure:
    fig = Figure(figsize=(12, 8))
    frame = pd.DataFrame(points)
    for i, (metric, label) in enumerate((("forget_accuracy", "forget accuracy"), ("test_accuracy", "test accuracy"),
                                         ("seconds", "unlearning seconds"), ("kl_to_oracle", "KL to oracle (test)"))):
        ax = fig.add_subplot(2, 2, i + 1)
        for j, (method, group) in enumerate(frame.groupby("method")):  # 20 colours × 3 styles: no two methods alike
            ax.plot(group["fraction"], group[metric], marker="o", label=method, color=_COLOURS(j % 20),
                    linestyle=("-", "--", ":")[j // 20 % 3])
        ax.set(xscale="log", xlabel="deletion rate (fraction of private ids)", ylabel=label)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("deletion-rate curve")
    fig.tight_layout()
    return fig


def figures(result: dict) -> dict[str, Figure]:
    rows = result["rows"]
    out = {
        "forget_vs_test_accuracy.png": _scatter(rows, "test_accuracy", "forget_accuracy", "test accuracy",
                                                "forget-set accuracy", "forget vs test accuracy per method"),
        "time_vs_quality.png": _scatter(rows, "seconds", "kl_to_oracle", "unlearning seconds (log; 0 drawn at 1e-6)",
                                        "KL to oracle (test)", "time vs quality", logx=True),
        "storage_vs_quality.png": _scatter(rows, "storage_bytes", "kl_to_oracle", "extra storage bytes (log; 0 drawn at 1e-6)",
                                           "KL to oracle (test)", "storage vs quality", logx=True),
    }
    if result.get("curve"):
        out["deletion_rate_curve.png"] = _curve(result["curve"])
    return out


def write(result: dict, out_dir: Path) -> list[Path]:
    """baselines.json, table.csv/.parquet, curve.csv and the PNGs; returns the paths."""
    paths = [out_dir / "baselines.json", out_dir / "table.csv", out_dir / "table.parquet"]
    atomic_write_json(paths[0], result)
    frame = table(result["rows"])
    atomic_write(paths[1], frame.to_csv(index=False).encode())
    frame.to_parquet(paths[2], index=False)
    if result.get("curve"):
        paths.append(out_dir / "curve.csv")
        atomic_write(paths[-1], pd.DataFrame(result["curve"]).to_csv(index=False).encode())
    for name, fig in figures(result).items():
        fig.savefig(out_dir / name, dpi=110)
        paths.append(out_dir / name)
    return paths


def _metrics(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and np.isfinite(v)}


def log_mlflow(run: tracking.Untracked, result: dict, paths: list[Path]) -> str | None:
    """Into the command's `groups.group` run: the comparison (the table and plots as artifacts), and
    one child run per method. Returns the group run's id (None when tracking is off)."""
    if run.run_id is None:
        return None
    from mlflow.entities import Param

    forget = result["forget"]
    params = {"forget.count": forget["count"], "forget.fraction": forget["fraction"], "forget.class": forget["class"],
              "k": result["k"], "methods": ",".join(result["methods"])}
    run.client.log_batch(run.run_id, params=[Param(k, tracking._safe_param(v)) for k, v in params.items()])
    run.log_metrics({f"original.{k}": v for k, v in _metrics(result["original"]).items()})
    for path in paths:
        run.client.log_artifact(run.run_id, str(path))
    for row in result["rows"]:
        labels = {"method": row["method"], "family": row["family"], "oracle": row["oracle"]}
        run.log_child(row["method"], {"dpsisa.kind": "baselines_method", **{f"dpsisa.{k}": v for k, v in labels.items()}},
                      labels, _metrics(row), {f"{row['method']}.json": row})
    return run.run_id


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
