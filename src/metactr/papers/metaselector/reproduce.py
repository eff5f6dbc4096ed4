"""The MetaSelector paper's Table 3, Table 1 and Figure 3 (``metactr reproduce metaselector``).

Prepares the MetaSelector split through the data pipeline (cached), runs every method for each
seed (``selector_train.run_seed``), and writes ``results.json`` (one row per method with mean and
95% interval across seeds, RelImpr against the best single model, the per-seed values),
``results.md`` (our numbers beside the paper's), ``user_loss_kde.png`` and ``config.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from metactr.errors import ConfigError
from metactr.papers.metaselector.paper_numbers import PAPER_ML1M, PAPER_SHARE_ML1M  # noqa: F401

ORDER = ["perfect_sample", "perfect_user", "sample_selector", "metaselector", "metaselector_simplified"]
DATASETS = ("ml-1m", "ml-100k")
BASE_LABELS = {"lr": "LR", "fm": "FM", "ffm": "FFM", "deepfm": "DeepFM"}

QUICK = [  # a CI-sized run: few users, one short pass of everything
    "max_users=80", "pretrain.epochs=1", "meta.episodes=10", "meta.test_chunk=32", "meta.test_max_support=256",
    "sample_selector.epochs=1", "sample_selector.hidden=[64,64,64]", "selector.hidden=[64,64,64]",
]


def load_experiment(config: Path | None, overrides: list[str] | None, quick: bool):
    from metactr.config import load_config
    from metactr.papers.metaselector.train import SelectorExperiment

    return load_config(SelectorExperiment, config, (QUICK if quick else []) + list(overrides or []))


def prepare_split(dataset: str, data_dir: Path, out: Path, extra: dict[str, Any]) -> Path:
    """The MetaSelector split of ``dataset`` through the shared pipeline (reused when cached)."""
    from metactr.data.pipeline import PrepareConfig, prepare

    try:
        cfg = PrepareConfig(**{**extra, "protocol": "metaselector"})
    except Exception as e:  # pydantic's message, one line
        raise ConfigError(f"bad prepare settings: {' '.join(str(e).split())}", field="prepare") from None
    return Path(prepare(dataset, data_dir, out, cfg))


# --------------------------------------------------------------------------- aggregation
def aggregate(seed_results, base_names: list[str], *, dataset: str, test_rows: bool = True) -> dict[str, Any]:
    """Rows of Table 3 with mean and 95% interval across seeds; RelImpr (eq. 7) per seed
    against the single model with the best mean AUC; paired intervals against it."""
    from metactr.eval.metrics import mean_ci95, paired_diff_ci95, rel_impr
    from metactr.papers.metaselector.train import METHOD_LABELS

    methods = list(base_names) + [m for m in ORDER if m in seed_results[0].metrics]
    auc = {m: [r.metrics[m]["auc"] for r in seed_results] for m in methods}
    ll = {m: [r.metrics[m]["logloss"] for r in seed_results] for m in methods}
    best = max(base_names, key=lambda m: np.nanmean(auc[m]))
    paper = PAPER_ML1M if dataset == "ml-1m" and test_rows else {}  # the paper's numbers are on test rows
    rows = []
    for m in methods:
        rel = [100.0 * rel_impr(a, b) for a, b in zip(auc[m], auc[best], strict=True)]
        am, ah = mean_ci95(auc[m])
        lm, lh = mean_ci95(ll[m])
        rm, rh = mean_ci95(rel)
        dam, dah = paired_diff_ci95(auc[m], auc[best])
        dlm, dlh = paired_diff_ci95(ll[m], ll[best])
        p = paper.get(m)
        rows.append({
            "method": m, "label": METHOD_LABELS.get(m, BASE_LABELS.get(m, m)),
            "auc_mean": am, "auc_ci95": ah, "logloss_mean": lm, "logloss_ci95": lh,
            "relimpr": rm, "relimpr_ci95": rh,
            "auc_diff_vs_best": dam, "auc_diff_vs_best_ci95": dah,
            "logloss_diff_vs_best": dlm, "logloss_diff_vs_best_ci95": dlh,
            "auc": auc[m], "logloss": ll[m], "relimpr_per_seed": rel,
            "paper_auc": p[0] if p else None, "paper_logloss": p[1] if p else None,
            "paper_relimpr": p[2] if p else None,
        })
    share = {n: float(np.mean([r.best_share[n] for r in seed_results])) for n in base_names}
    ms = next((r for r in rows if r["method"] == "metaselector"), None)
    goal = None
    if ms is not None and test_rows:  # the goal is about test rows
        lo = ms["auc_diff_vs_best"] - (ms["auc_diff_vs_best_ci95"] if np.isfinite(ms["auc_diff_vs_best_ci95"]) else np.inf)
        goal = {"auc_ci_excludes_zero": bool(lo > 0), "relimpr_ge_paper": bool(ms["relimpr"] >= 3.04),
                "met": bool(lo > 0 and ms["relimpr"] >= 3.04)}
    stats = {k: [r.selector_stats[k] for r in seed_results if k in r.selector_stats]
             for k in ("metaselector", "metaselector_simplified")}
    return {"best_single_model": best, "methods": rows, "best_model_share": share, "goal": goal,
            "selector_stats": {k: v for k, v in stats.items() if v},
            "seeds": [r.seed for r in seed_results],
            "seconds_per_seed": [r.seconds for r in seed_results]}


def _pct(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:+.2f}%"


def render_markdown(res: dict[str, Any]) -> str:
    from metactr.eval.report import fmt, fmt_ci, markdown_table
    from metactr.papers.metaselector.train import METHOD_LABELS

    ds = res["dataset"]
    lines = [f"# MetaSelector reproduction ({ds})", ""]
    if res.get("protocol") == "validation":
        lines += ["**Validation protocol** (`--validate`): each user's support rows play the training rows, "
                  "their query rows play the test rows, the support rows are cut again 75/25 for "
                  "meta-training; the test rows are never read. For choosing settings, not for comparing "
                  "with the paper (its columns stay empty).", ""]
    if ds == "ml-1m":
        lines += ["**Data note:** our ML-1M is `ml-1m-partial`: every rating of users 1-2999 only "
                  "(users 3000-6040 are missing), so our numbers are not on the paper's exact data.", ""]
    else:
        lines += [f"The paper reports no numbers for {ds} (its columns stay empty; they are for ML-1M).", ""]
    lines += [f"Seeds: {res['seeds']} ({len(res['seeds'])} runs); mean ± 95% t-interval across seeds. "
              f"RelImpr (eq. 7) against the best single model here, **{res['best_single_model']}**. "
              + (f"Scored rows (the users' query rows): {res['n_test']}, users: {res['n_test_users']}."
                 if res.get("protocol") == "validation" else
                 f"Test rows: {res['n_test']}, test users: {res['n_test_users']}."), ""]
    headers = ["Model", "AUC", "LogLoss", "RelImpr", "ΔAUC vs best (paired)", "paper AUC",
               "paper LogLoss", "paper RelImpr"]
    body = []
    for r in res["methods"]:
        body.append([r["label"], fmt_ci(r["auc_mean"], r["auc_ci95"]),
                     fmt_ci(r["logloss_mean"], r["logloss_ci95"], 5),
                     _pct(r["relimpr"]) + ("" if not np.isfinite(r["relimpr_ci95"] or np.nan)
                                           else f" ± {r['relimpr_ci95']:.2f}"),
                     fmt_ci(r["auc_diff_vs_best"], r["auc_diff_vs_best_ci95"]),
                     fmt(r["paper_auc"]), fmt(r["paper_logloss"], 5), _pct(r["paper_relimpr"])])
    lines += ["## Table 3: AUC and LogLoss", "", markdown_table(headers, body)]
    g = res.get("goal")
    if g:
        lines += [f"Goal (MetaSelector beats the best single model with a paired 95% interval that "
                  f"excludes zero, and RelImpr >= +3.04%): **{'met' if g['met'] else 'not met'}** "
                  f"(interval excludes zero: {g['auc_ci_excludes_zero']}; RelImpr >= paper: "
                  f"{g['relimpr_ge_paper']}).", ""]
    share_rows = [[n, f"{100 * v:.2f}%", f"{PAPER_SHARE_ML1M[n]:.2f}%" if n in PAPER_SHARE_ML1M else "–"]
                  for n, v in res["best_model_share"].items()]
    lines += ["## Table 1: share of users for whom each base model is best (lowest test LogLoss)", "",
              markdown_table(["Model", "ours", "paper (ML-1M)"], share_rows)]
    sel_rows = []
    for key, per_seed in (res.get("selector_stats") or {}).items():
        st = per_seed[0]
        weights = ", ".join(f"{n} {w:.3f}" for n, w in st["mean_weight"].items())
        spread = ", ".join(f"{n} {w:.3f}" for n, w in st["user_std"].items())
        sel_rows.append([METHOD_LABELS.get(key, key), weights,
                         f"{st['entropy']:.3f} / {st['max_entropy']:.3f}", spread])
    if sel_rows:
        lines += ["## Selector weights on the test rows (first seed, after per-user adaptation)", "",
                  "Entropy log K = a uniform mix, 0 = always one model; the per-user spread is the "
                  "standard deviation across users of each user's mean weight (0 = no user-level selection).", "",
                  markdown_table(["Variant", "mean lambda", "entropy / max", "per-user spread of lambda"],
                                 sel_rows)]
    if res.get("kde_png"):
        lines += ["## Figure 3: per-user test LogLoss", "", f"![per-user loss KDE]({res['kde_png']})", ""]
    lines += [f"Command: `{res['command']}`  ", f"Wall time: {res['wall_s']:.0f} s"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the command


def run_reproduction(dataset: str = "ml-1m", data_dir: Path | None = None, out: Path = Path("runs/metaselector"), *,
                     seeds: int = 5, quick: bool = False, config: Path | None = None,
                     overrides: list[str] | None = None, prepared: Path | None = None, validate: bool = False,
                     log=lambda msg: None, command: str = "", force: bool = False) -> dict[str, Any]:
    """Every seed of every method, aggregated; writes ``out`` (results.json/.md, the KDE plot, config)
    and returns the results. ``log`` receives progress lines. ``out`` must be absent, empty or
    metactr's own (``.metactr`` marker; ``force``: replaced, the cached split too)."""

    import torch

    from metactr.eval.report import write_run
    from metactr.eval.selector_plots import plot_user_loss_kde
    from metactr.papers.metaselector.train import SelectorData, run_seed
    from metactr.utils import claim_out_dir, data_root

    t0 = time.perf_counter()
    if dataset not in DATASETS and prepared is None:
        raise ConfigError(f"unknown dataset '{dataset}' (choose {', '.join(DATASETS)}, or pass --prepared)",
                          field="--dataset")
    cfg = load_experiment(config, overrides, quick)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    claim_out_dir(out, force=force, what="reproduction")  # before any work: never another directory
    if prepared is None:
        raw = data_dir or (data_root() / ("ml-1m-partial" if dataset == "ml-1m" else dataset))
        prepared = prepare_split(dataset, raw, out / "prepared", cfg.prepare)
    data = SelectorData.load(prepared, disjoint=cfg.disjoint_test_users, max_users=cfg.max_users)
    if validate:
        from metactr.config import validate as validate_config
        from metactr.data.pipeline import MetaSelectorConfig

        # cut the support rows as the pipeline cut the training rows (prepare.metaselector)
        ms_cfg = validate_config(MetaSelectorConfig, cfg.prepare.get("metaselector") or {},
                                 prefix="prepare.metaselector")
        data = data.validation(ms_cfg.support_fraction)
    names = [b.name for b in cfg.base_models]

    results = []
    for seed in range(seeds):
        log(f"seed {seed}")
        results.append(run_seed(cfg, data, seed, log=log))
        m = results[-1].metrics
        log("  " + "  ".join(f"{k}={v['auc']:.4f}" for k, v in m.items()))
    res = aggregate(results, names, dataset=dataset, test_rows=not validate)
    res.update({"dataset": dataset, "paper_available": dataset == "ml-1m" and not validate,
                "protocol": "validation" if validate else "test", "prepared": str(prepared),
                "n_test": len(data.test), "n_test_users": int(np.unique(data.test.user_id.numpy()).size),
                "disjoint_test_users": data.disjoint_test_users, "quick": quick,
                "command": command})
    out.mkdir(parents=True, exist_ok=True)
    ref = cfg.reference_model if cfg.reference_model in names else names[-1]
    ul = results[0].user_loss
    if "metaselector" in ul and ref in ul:
        plot_user_loss_kde({"MetaSelector": ul["metaselector"], BASE_LABELS.get(ref, ref): ul[ref]},
                           out / "user_loss_kde.png",
                           title=f"Per-user test LogLoss, {dataset}, seed {results[0].seed}")
        res["kde_png"] = "user_loss_kde.png"
    res["wall_s"] = time.perf_counter() - t0
    write_run(out, res, render_markdown(res), cfg)
    return res


