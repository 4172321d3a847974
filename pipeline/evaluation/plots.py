"""The sweep's summary table, its best strategy per (shards, ε) and its PNG plots: accuracy and
MIA advantage vs ε (one panel per shard count, no-DP drawn as ε = ∞ at the right end) and forget
speed-up vs shards. Headless: Figure objects on the Agg canvas, no pyplot global state.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

SHARDS, STRATEGY, EPSILON = "shards.count", "finetune.strategy", "privacy.epsilon"
KEY_COLUMNS = (SHARDS, STRATEGY, EPSILON, "partition.strategy", "seed")
SHOWN = ("accuracy", "vote_accuracy", "epsilon_spent_max", "accuracy_after_forget", "forget_seconds",
         "full_train_seconds", "forget_speedup", "mia_advantage", "mia_auc", "mia_advantage_after_forget",
         "mia_forgotten_advantage_after_forget", "mia_forgotten_auc_after_forget")


def summary_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished trial, ordered by shards, strategy, ε (no DP last)."""
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["trial_id", *KEY_COLUMNS])
    table[EPSILON] = pd.to_numeric(table[EPSILON], errors="coerce")  # None (no DP) → NaN
    return table.sort_values([SHARDS, STRATEGY, EPSILON, "trial_id"], na_position="last").reset_index(drop=True)


def _epsilon_or_inf(table: pd.DataFrame) -> pd.Series:
    return table[EPSILON].astype(float).fillna(np.inf)


def best_per_cell(table: pd.DataFrame) -> list[dict[str, Any]]:
    """For each (shards, ε): the strategy with the highest mean accuracy over repeats."""
    if table.empty or "accuracy" not in table:
        return []
    extra = [c for c in ("mia_advantage", "forget_speedup") if c in table]
    means = (table.assign(**{EPSILON: _epsilon_or_inf(table)})
             .groupby([SHARDS, EPSILON, STRATEGY])[["accuracy", *extra]].mean().reset_index())
    best = means.loc[means.groupby([SHARDS, EPSILON])["accuracy"].idxmax()]
    return [{SHARDS: int(r[SHARDS]), EPSILON: None if np.isinf(r[EPSILON]) else float(r[EPSILON]),
             STRATEGY: r[STRATEGY], **{c: float(r[c]) for c in ["accuracy", *extra]}} for _, r in best.iterrows()]


def _eps_label(value: Any) -> str:
    return "∞ (no DP)" if value is None or pd.isna(value) or np.isinf(value) else f"{value:g}"


def format_table(table: pd.DataFrame) -> str:
    columns = [c for c in ("trial_id", *KEY_COLUMNS[:3], "repeat", *SHOWN) if c in table]
    shown = table[columns].copy()
    if EPSILON in shown:
        shown[EPSILON] = shown[EPSILON].map(_eps_label)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}") if len(shown) else "(no finished trials)"


def format_best(best: list[dict[str, Any]]) -> str:
    lines = [f"  shards {b[SHARDS]:>3}, ε {_eps_label(b[EPSILON]):>9}: {b[STRATEGY]:<11} accuracy {b['accuracy']:.3f}"
             + (f", MIA advantage {b['mia_advantage']:.3f}" if "mia_advantage" in b else "") for b in best]
    return "\n".join(lines) or "  (no finished trials)"


def epsilon_positions(values: pd.Series) -> tuple[dict[float, float], list[float], list[str]]:
    """x position of each ε (inf = no DP: one step right of the largest finite ε), ticks and labels."""
    finite = sorted({float(v) for v in values if np.isfinite(v)})
    step = (finite[-1] - finite[0]) / (len(finite) - 1) if len(finite) > 1 else max(finite[0] * 0.5, 0.5) if finite else 1.0
    where = {v: v for v in finite}
    if any(np.isinf(v) for v in values):
        where[np.inf] = (finite[-1] + step) if finite else 1.0
    ticks = sorted(where.values())
    return where, ticks, [_eps_label(next(k for k, x in where.items() if x == t)) for t in ticks]


def _vs_epsilon(table: pd.DataFrame, metric: str, ylabel: str, title: str,
                dashed: tuple[str, str] | None = None) -> Figure:
    """One panel per shard count, one line per strategy (mean over repeats); no DP as a star;
    `dashed`: (column, label) of a second metric drawn dashed in the same colours."""
    shard_counts = sorted(table[SHARDS].unique()) if not table.empty else [None]
    figure = Figure(figsize=(4.2 * len(shard_counts), 3.6), layout="constrained")
    axes = figure.subplots(1, len(shard_counts), squeeze=False)[0]
    figure.suptitle(title)
    if metric not in table or table[metric].isna().all():
        for ax in axes:
            ax.text(0.5, 0.5, f"no '{metric}' in the trial results", ha="center", va="center", transform=ax.transAxes)
        return figure
    data = table.assign(**{EPSILON: _epsilon_or_inf(table)})
    where, ticks, labels = epsilon_positions(data[EPSILON])
    colors = {s: f"C{i}" for i, s in enumerate(sorted(data[STRATEGY].unique()))}
    for ax, shards in zip(axes, shard_counts, strict=True):
        panel = data[data[SHARDS] == shards]
        for strategy, group in panel.groupby(STRATEGY):
            for column, style, label in ((metric, "-", strategy), *([(dashed[0], "--", f"{strategy}: {dashed[1]}")]
                                                                   if dashed else [])):
                if column not in group or group[column].isna().all():
                    continue
                _epsilon_line(ax, group.groupby(EPSILON)[column].mean(), where, colors[strategy], style, label)
        ax.set(title=f"{shards} shard(s)", xlabel="ε (★ = no DP)", ylabel=ylabel, xticks=ticks)
        ax.set_xticklabels(labels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def _epsilon_line(ax, means: pd.Series, where: dict[float, float], color: str, style: str, label: str) -> None:
    """Finite ε as a line; no DP (ε = ∞) as a star joined by a dotted segment."""
    finite = means[np.isfinite(means.index)]
    ax.plot([where[e] for e in finite.index], finite.values, "o" + style, color=color, label=label,
            markerfacecolor=color if style == "-" else "white")
    if np.inf in means.index:
        ax.plot([where[np.inf]], [means[np.inf]], "*", markersize=13, color=color)
        if len(finite):
            ax.plot([where[finite.index[-1]], where[np.inf]], [finite.values[-1], means[np.inf]], ":", color=color)


def accuracy_vs_epsilon(table: pd.DataFrame) -> Figure:
    return _vs_epsilon(table, "accuracy", "test accuracy (mean softmax)", "Accuracy vs ε per fine-tuning strategy")


def mia_advantage_vs_epsilon(table: pd.DataFrame) -> Figure:
    return _vs_epsilon(table, "mia_advantage", "MIA advantage (posterior)", "Membership-inference advantage vs ε",
                       dashed=("mia_forgotten_advantage_after_forget", "forgotten ids, after forget"))


def speedup_vs_shards(table: pd.DataFrame) -> Figure:
    """Forget speed-up (full training time / forget time) vs shard count, one line per strategy."""
    figure = Figure(figsize=(5, 3.6), layout="constrained")
    ax = figure.subplots()
    if "forget_speedup" in table and not table["forget_speedup"].isna().all():
        for strategy, group in table.groupby(STRATEGY):
            means = group.groupby(SHARDS)["forget_speedup"].mean()
            ax.plot(means.index, means.values, "o-", label=strategy)
        ax.set_xticks(sorted(table[SHARDS].unique()))
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no forget results (forget_count: 0?)", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="Forget speed-up vs shards", xlabel="shards", ylabel="speed-up (× full training)")
    ax.grid(alpha=0.3)
    return figure


PLOTS: dict[str, Callable[[pd.DataFrame], Figure]] = {
    "accuracy_vs_epsilon": accuracy_vs_epsilon,
    "mia_advantage_vs_epsilon": mia_advantage_vs_epsilon,
    "forget_speedup_vs_shards": speedup_vs_shards,
}


def save_all(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every plot in PLOTS as <out_dir>/<name>.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in PLOTS.items():
        path = out_dir / f"{name}.png"
        draw(table).savefig(path, dpi=110)
        paths.append(path)
    return paths
