"""Human summaries of the verbs' results (what the CLI prints without --json)."""
from __future__ import annotations


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
