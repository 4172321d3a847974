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


def human_forget(r: dict) -> str:
    return (f"request {r['request_id']}: forgot {r['ids']} id(s); retrained shard(s) {r['shards_retrained']} "
            f"(stages replayed {r['slices_retrained']}) in {r['seconds']:.1f}s vs full training "
            f"{r['full_train_seconds']:.1f}s (speed-up ×{r['speedup']:.1f}; {r['work_fraction']:.0%} of the training work replayed)")


def human_submitted(r: dict) -> str:
    def follow(request_id: str) -> str:
        return f"`dpsisa request --run-dir {r['run_dir']} --id {request_id} --wait`"

    if "requests" in r:
        return "\n".join([f"{len(r['requests'])} requests recorded as pending ({r['ids']} id(s)); follow one with {follow('ID')}",
                          *(f"  request {x['request_id']}: subject {x['subject']}, {x['ids']} id(s)" for x in r["requests"])])
    return f"request {r['request_id']}: {r['ids']} id(s) recorded as pending; follow it with {follow(r['request_id'])}"


def human_subject(r: dict) -> str:
    lines = [f"subject {r['subject']}: {len(r['samples'])} sample(s), {'all erased' if r['erased'] else 'not (all) erased'}"]
    for x in r["samples"]:
        saw = x["versions_that_saw_it"]
        lines.append(f"  id {x['sample_id']}: shard {x['shard']} slice {x['slice']}, {x['status']}"
                     + (f" (request {x['request_id']})" if x["request_id"] else "")
                     + f"; versions that saw it: {saw[0]}..{saw[-1]}; live version {x['live_version']}")
    return "\n".join(lines)


def human_verify(v: dict) -> str:
    lines = [f"{'EXACT' if v['exact'] else 'NOT EXACT'}: shard(s) {v['shards_checked']} equal a from-scratch "
             "retraining without the forgotten ids" + ("" if v["exact"] else " — MISMATCH")]
    lines += [f"  shard {s['shard']} v{s['version']}: exact={s['exact']} ({s['forgotten']} forgotten)"
              + (f" mismatches {s['mismatches'][:3]}" if s["mismatches"] else "") for s in v["shards"]]
    u = v.get("unlearning")
    if u:
        forget = "n/a" if u["forget_accuracy"] is None else f"{u['forget_accuracy']:.3f}"
        lines.append(f"  yardstick: forget-set accuracy {forget}, retain {u['retain_accuracy']:.3f}, test {u['test_accuracy']:.4f} "
                     f"(oracle {u['oracle_test_accuracy']:.4f}), KL(live ‖ oracle) {u['kl_to_oracle']:.3g}")
    return "\n".join(lines)


def human_status(s: dict) -> str:
    applied = f", {len(s['applied'])} applied (registry pending)" if s.get("applied") else ""
    lines = [f"run {s['run_dir']}: {len(s['done'])} done{applied}, {len(s['pending'])} pending forget request(s)"]
    for sh in s["shards"]:
        eps = "no DP" if sh["epsilon"] is None else (
            f"ε {sh['epsilon']:.3f} per release (cumulative over its {sh['releases']} releases {sh['epsilon_cumulative']:.3f}"
            + (": above the per-release target because each release is a new mechanism)"
               if s["epsilon_target"] is not None and sh["epsilon_cumulative"] > s["epsilon_target"] else ")"))
        lines.append(f"  shard {sh['shard']}: v{sh['version']}, {sh['samples']} samples, "
                     f"{sh['forgotten']} forgotten, {eps}")
    return "\n".join(lines)


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
