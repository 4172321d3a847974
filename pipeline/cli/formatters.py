"""Human summaries of the verbs' results (what the CLI prints without --json)."""
from __future__ import annotations


def fmt_eps(values: list) -> str:
    return "no DP" if not values or values[0] is None else f"{min(values):.3f}..{max(values):.3f}"


def human_eval(m: dict) -> str:
    text = (f"accuracy {m['accuracy']:.4f} (vote {m['vote_accuracy']:.4f}); shards "
            f"{', '.join(f'{a:.3f}' for a in m['shard_accuracy'])}; ε spent {fmt_eps(m['epsilon_spent'])} "
            f"(target {m['epsilon_target']}, δ={m['delta']})")
    if m.get("public_accuracy") is not None:
        text += f"; public model alone {m['public_accuracy']:.4f}"
    if "mia" in m:
        post = m["mia"]["posterior"]
        text += (f"\nMIA (posterior) members vs non-members: AUC {post['auc']:.3f}, advantage {post['advantage']:.3f}; "
                 f"empirical ε lower bound {m['epsilon_lower_bound']:.3f}")
    if m.get("lira"):
        lr = m["lira"]
        for variant in ("offline", "online"):
            if lr.get(variant):
                v = lr[variant]
                text += (f"\nLiRA {variant} (K={lr['reference_models']}, non-members from {lr['nonmembers_from']}): "
                         f"AUC {v['auc']:.3f} ({v['auc_ci'][0]:.3f}..{v['auc_ci'][1]:.3f}), TPR {v['tpr_at_1pct_fpr']:.3f} "
                         f"at 1% FPR, {v['tpr_at_0_1pct_fpr']:.4f} at 0.1% FPR")
        if lr.get("online_skipped"):
            text += f"\n  ({lr['online_skipped']})"
    if "mia_forgotten" in m:
        gone = m["mia_forgotten"]["posterior"]
        text += (f"\nMIA (posterior) forgotten vs non-members: accuracy {gone['accuracy']:.3f} "
                 f"(95% CI {gone['accuracy_ci'][0]:.3f}..{gone['accuracy_ci'][1]:.3f}), AUC {gone['auc']:.3f}")
    return text


def human_score(r: dict) -> str:
    retrained = r["retrained"]

    def line(name: str, part: dict) -> str:
        null = (f"; at chance {part['forgetting_quality_null_mean']:.3f}, p={part['forgetting_quality_p_value']:.3f}"
                if "forgetting_quality_p_value" in part else "")
        return (f"  {name:<24}score {part['score']:.3f} (forgetting quality {part['forgetting_quality']:.3f}{null}; "
                f"mean per-example ε {part['epsilon_mean']:.2f}); forget/retain/test accuracy "
                f"{part['forget_accuracy']:.3f}/{part['retain_accuracy']:.3f}/{part['test_accuracy']:.3f}" + ulira(part))

    def ulira(part: dict) -> str:
        u = part.get("ulira")
        if not u:
            return ""
        chance = (f" (at chance {u['balanced_accuracy_null_mean']:.3f}, p={u['p_value']:.3f})"
                  if "p_value" in u else "")
        return (f"\n  {'':<24}U-LiRA: balanced accuracy {u['balanced_accuracy']:.3f}{chance}, "
                f"TPR {u['tpr_at_1pct_fpr']:.3f} at 1% FPR, {u['tpr_at_0_1pct_fpr']:.3f} at 0.1% FPR")

    return "\n".join([
        f"NeurIPS-2023 unlearning score, K={r['k']} models per group, {r['forget_count']} forgotten ids (δ={r['delta']}):",
        line("SISA forget", r["sisa"]), line("control: no unlearning", r["control_no_unlearning"]),
        f"  retrained oracle        forget/retain/test accuracy {retrained['forget_accuracy']:.3f}/"
        f"{retrained['retain_accuracy']:.3f}/{retrained['test_accuracy']:.3f}",
        f"  {r['out_dir']} ({r['total_seconds']:.0f}s)"])
