"""``metactr bench``'s results.md: a leaderboard per dataset and subset (final stage), with each
method's paired difference against the reference and whether its interval excludes zero."""

from __future__ import annotations

from metactr.eval.report import fmt, markdown_table

STAGE_LABELS = {"before": "before FT", "finetune_a": "FT-A", "finetune_b": "FT-B", "finetune_c": "FT-C",
                "test": "test"}


def ci(lo_hi) -> str:
    lo, hi = lo_hi
    return f"[{fmt(lo)}, {fmt(hi)}]"


def verdict(pair: dict | None, row: dict) -> str:
    if row.get("upper_bound"):
        return "ceiling (not a method)" if row["method"] == "bayes_ceiling" else "oracle (sees labels)"
    if pair is None:
        return "reference"
    if not pair["excludes_zero"]:
        return "tie (interval holds 0)"
    return "**better**" if pair["delta_auc"] > 0 else "**worse**"


def dataset_title(label: dict) -> str:
    bits = [f"data `{label['dataset']}`"]
    if label.get("source"):
        bits.append(f"from {', '.join(label['source'])}")
    if label.get("holdout"):
        bits.append(f"holdout `{label['holdout']}`")
    return f"{label['name']} ({'; '.join(bits)})"


def leaderboard(res: dict, name: str, subset, stage: str) -> tuple[str, list[dict]]:
    rows = [r for r in res["rows"] if r["dataset"] == name and r["subset"] == subset and r["stage"] == stage]
    pairs = {p["method"]: p for p in res["pairs"] if p["dataset"] == name and p["subset"] == subset
             and p["stage"] == stage}
    rows.sort(key=lambda r: -r["auc_mean"])
    with_paper = any(r.get("paper_auc") is not None for r in rows)
    heads = ["#", "method", "AUC [95%]", "GAUC", "LogLoss", "Δ AUC vs ref [95%]", "verdict"]
    if with_paper:
        heads += ["paper AUC", "ours − paper"]
    body = []
    for i, r in enumerate(rows, 1):
        p = pairs.get(r["method"])
        d = "–" if p is None else f"{p['delta_auc']:+.4f} {ci(p['ci95'])}"
        line = [str(i), r["method"], f"{fmt(r['auc_mean'])} {ci(r['auc_ci95'])}", fmt(r["gauc_mean"]),
                fmt(r["logloss_mean"]), d, verdict(p, r)]
        if with_paper:
            pa = r.get("paper_auc")
            line += ["–" if pa is None else fmt(pa), "–" if pa is None else f"{r['auc_mean'] - pa:+.4f}"]
        body.append(line)
    return markdown_table(heads, body), rows


def render_markdown(res: dict) -> str:
    final = res["final_stage"]
    lines = [f"# metactr bench: `{res['protocol']}` protocol", "",
             f"Seeds: {res['seeds']}" + (f"; split seeds: {res['split_seeds']}" if res.get("split_seeds") else "")
             + f"; jobs: {res['n_jobs']}; wall time: {fmt(res.get('wall_s'), 1)} s"
             + (" (aggregated only)" if res.get("wall_s") is None else ""), ""]
    if res.get("command"):
        lines += [f"Command: `{res['command']}`", ""]
    lines += ["Intervals: 95%, over training seeds x a bootstrap of test *users* (a user's rows move together). "
              "Δ: paired difference against the reference on the same resamples; **better**/**worse** where "
              "its interval excludes 0, else a tie. GAUC: row-weighted mean of per-user AUCs.", ""]
    for name, label in res["datasets"].items():
        subsets = sorted({r["subset"] for r in res["rows"] if r["dataset"] == name}, key=lambda s: (s != "wc", s or ""))
        lines += [f"## {dataset_title(label)}", ""]
        if label.get("paper") == "same_data":
            lines += ["The paper's numbers are on the full ML-1M with the authors' split; this is ML-1M-partial "
                      "(users 1-2999) with our own split and holdout: the differences compare different test "
                      "sets, not the same experiment.", ""]
        for sub in subsets:
            rows = [r for r in res["rows"] if r["dataset"] == name and r["subset"] == sub and r["stage"] == final]
            if not rows:
                continue
            table, rows = leaderboard(res, name, sub, final)
            ref = next((p["reference"] for p in res["pairs"] if p["dataset"] == name and p["subset"] == sub), "–")
            head = (f"### {sub.upper()} " if sub else "### ") + (
                f"after {STAGE_LABELS.get(final, final)}" if final != "test" else "test")
            seeds = sorted({r["seeds"] for r in rows if not r.get("upper_bound")})
            lines += [head, "", f"{rows[0]['n_test']:,} test rows, {rows[0]['n_users']:,} users; seeds per method: "
                      f"{'/'.join(map(str, seeds))}; reference `{ref}`.", "", table, ""]
        stages = [s for s in STAGE_LABELS if any(r["dataset"] == name and r["stage"] == s for r in res["rows"])]
        if len(stages) > 1:
            lines += ["### AUC across fine-tuning stages", ""]
            heads = ["subset", "method"] + [STAGE_LABELS[s] for s in stages]
            body = []
            for sub in subsets:
                ms = [r["method"] for r in res["rows"] if r["dataset"] == name and r["subset"] == sub
                      and r["stage"] == final]
                for m in ms:
                    by = {r["stage"]: r for r in res["rows"] if r["dataset"] == name and r["subset"] == sub
                          and r["method"] == m}
                    body.append([(sub or "").upper(), m] + [fmt(by[s]["auc_mean"]) if s in by else "–" for s in stages])
            lines += [markdown_table(heads, body), ""]
    if res.get("contrasts"):
        lines += contrast_lines(res["contrasts"])
    for key, st in (res.get("split_stats") or {}).items():
        for w in st["warnings"]:
            lines.append(f"- {key}: {w}")
    return "\n".join(lines) + "\n"


def pair_verdict(p: dict) -> str:
    """better / worse where a paired difference's interval excludes zero, else tie."""
    return ("better" if p["delta_auc"] > 0 else "worse") if p["excludes_zero"] else "tie"


def contrast_lines(contrasts: list[dict]) -> list[str]:
    """The config's extra paired differences, one table row each."""
    heads = ["dataset", "subset", "method", "reference", "Δ AUC [95%]", "verdict", "Δ GAUC", "seeds", "rows / users"]
    body = [[c["dataset"], (c["subset"] or "").upper(), c["method"], c["reference"],
             f"{c['delta_auc']:+.4f} {ci(c['ci95'])}", pair_verdict(c),
             "–" if c.get("delta_gauc") is None or c["delta_gauc"] != c["delta_gauc"] else f"{c['delta_gauc']:+.4f}",
             str(c["seeds"]), f"{c['n_test']:,} / {c['n_users']:,}"] for c in contrasts]
    intro = ("Paired differences asked for in the config's `contrasts`, after the last stage, "
             "on the same resamples of test users (training seeds paired).")
    return ["## Contrasts", "", intro, "", markdown_table(heads, body), ""]
