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
