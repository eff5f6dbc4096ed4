"""``run_bench``: prepare the datasets, run every job (resumable, ``jobs`` workers), aggregate the
saved predictions with ``eval.intervals.compare_methods`` and write results.json, results.md and
report.html in ``out``.

Aggregation, per (dataset, subset, stage): each method's probabilities [seeds, rows] on the same
test rows. With ``split_seeds`` the test rows of every split are concatenated (users keyed by
(split, user), so a resample draws users of every split), and training seed k of a method is its
k-th run on every split: the intervals then also cover which users and items were drawn cold.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from metactr.errors import ConfigError
from metactr.papers.bench.config import (
    ORACLES,
    BenchConfig,
    baseline_list,
    check_methods,
)
from metactr.papers.bench.data import (
    PreparedEntry,
    bayes_probs,
    dataset_label,
    prepare_all,
)
from metactr.papers.bench.jobs import STAGES, Job, execute, is_done, load_job
from metactr.train.tracking import finite_or_none

BAYES = "bayes_ceiling"
USER_STRIDE = 1 << 32  # (split, user) -> one id


def list_jobs(cfg: BenchConfig, entries: list[PreparedEntry], methods: list[str]) -> list[Job]:
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    jobs = []
    for seed in seeds:  # seed-major: an interrupted run has every method for its first seeds
        for e in entries:
            if cfg.protocol == "rml":
                jobs += [Job(e.spec.name, e.split_seed, str(e.prepared), m, s, seed)
                         for m in methods for s in cfg.rml.subsets]
            else:
                jobs.append(Job(e.spec.name, e.split_seed, str(e.prepared), "all", None, seed))
    return jobs


def run_jobs(cfg: BenchConfig, jobs: list[Job], runs: Path, methods: list[str], n_workers: int, echo=print) -> float:
    todo = [j for j in jobs if not is_done(runs, cfg, j)]
    echo(f"{len(jobs)} jobs ({len(jobs) - len(todo)} already done), {n_workers} worker(s)")
    t0 = time.perf_counter()
    cfg_json = cfg.model_dump_json()
    if n_workers <= 1:
        for j in todo:
            execute(cfg_json, j, str(runs), methods)
            echo(f"done {j.name} ({time.perf_counter() - t0:.0f} s)")
    else:
        # spawn, not fork: the parent has run Polars (and torch) thread pools, which a fork can deadlock
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futs = [pool.submit(execute, cfg_json, j, str(runs), methods) for j in todo]
            for f in as_completed(futs):
                echo(f"done {f.result()} ({time.perf_counter() - t0:.0f} s)")
    return time.perf_counter() - t0


def _groups(cfg: BenchConfig, entries, jobs, runs: Path, methods: list[str]):
    """{(dataset, subset): {"y", "users", "bayes", "stages": {stage: {method: [seeds, n]}}}}."""
    out = {}
    by_entry = {}
    for e in entries:
        by_entry.setdefault(e.spec.name, []).append(e)
    subsets = cfg.rml.subsets if cfg.protocol == "rml" else [None]
    stages = STAGES if cfg.protocol == "rml" else ("test",)
    for name, ents in by_entry.items():
        for sub in subsets:
            ys, us, bayes, per = [], [], [], {}  # per[(method, stage)][seed] = list over splits
            for k, e in enumerate(ents):
                mine = [j for j in jobs if j.dataset == name and j.split_seed == e.split_seed and j.subset == sub]
                got = [(j, load_job(runs, j)) for j in mine if is_done(runs, cfg, j)]
                if not got:
                    continue
                first = got[0][1]
                ys.append(first["y"])
                us.append(first["user"].astype(np.int64) + k * USER_STRIDE)
                b = bayes_probs(e, f"{sub}_test" if sub else "ms_test")
                if b is not None and len(b) != len(first["y"]):  # (a max_users subset: rows do not line up)
                    b = None
                bayes.append(b)
                for j, arr in got:
                    for key, p in arr.items():
                        if key.startswith("p__"):
                            _, m, st = key.split("__")
                            per.setdefault((m, st), {}).setdefault(j.seed, {})[k] = p
            if not ys:
                continue
            n_splits = len(ys)
            g = {"y": np.concatenate(ys), "users": np.concatenate(us), "stages": {}, "bayes": None}
            if all(b is not None for b in bayes):
                g["bayes"] = np.concatenate(bayes)
            for st in stages:
                preds = {}
                for m in methods:
                    seeds = per.get((m, "final" if st == "test" else st), {})
                    full = [np.concatenate([seeds[s][k] for k in range(n_splits)]) for s in sorted(seeds)
                            if len(seeds[s]) == n_splits]
                    if full:
                        preds[m] = np.stack(full)
                if preds:
                    g["stages"][st] = preds
            out[(name, sub)] = g
    return out


def aggregate(cfg: BenchConfig, entries, jobs, runs: Path, methods: list[str]) -> tuple[dict, dict]:
    """(results {"rows", "pairs", "datasets"}, figure data per (dataset, subset))."""
    from metactr.eval.bench_plots import batch_aucs, user_losses
    from metactr.eval.intervals import compare_methods

    labels = {e.spec.name: dataset_label(e) for e in entries}
    rows, pairs, contrasts, figs = [], [], [], {}
    final = "finetune_c" if cfg.protocol == "rml" else "test"
    for (name, sub), g in _groups(cfg, entries, jobs, runs, methods).items():
        fig = {"stage_auc": {}, "batch_auc": {}, "user_loss": {}}
        for st, preds in g["stages"].items():
            if g["bayes"] is not None:
                preds = {**preds, BAYES: g["bayes"][None, :]}
            pool = [m for m in baseline_list(cfg, methods) if m in preds]
            ref = cfg.reference if cfg.reference in preds else None
            comp = compare_methods(g["y"], g["users"], preds, reference=ref,
                                   baselines=pool or [m for m in preds if m != BAYES],
                                   n_boot=cfg.n_boot, seed=0)
            for r in comp.rows():
                r.update({"dataset": name, "protocol": cfg.protocol, "subset": sub, "stage": st,
                          "upper_bound": r["method"] in (BAYES, *ORACLES),
                          "auc_per_seed": comp.methods[r["method"]].auc_per_seed})
                rows.append(r)
            for p in comp.pair_rows():
                pairs.append({"dataset": name, "subset": sub, "stage": st, **p})
            for m, a in preds.items():
                fig["stage_auc"].setdefault(m, {})[st] = comp.methods[m]
            if st == final:
                contrasts += _contrasts(cfg, g, preds, {"dataset": name, "subset": sub, "stage": st})
                for m, a in preds.items():
                    fig["batch_auc"][m] = batch_aucs(g["y"], a, cfg.batch_rows)
                    fig["user_loss"][m] = user_losses(g["y"], a[0], g["users"])
                fig["reference"] = comp.reference
        figs[(name, sub)] = fig
    order = ["dataset", "protocol", "subset", "stage", "method", "auc_mean", "auc_ci95", "gauc_mean", "logloss_mean",
             "n_test", "n_users", "seeds"]
    _paper_numbers(cfg, labels, rows)
    rows = [{**{k: r[k] for k in order}, **{k: v for k, v in r.items() if k not in order}} for r in rows]
    return {"protocol": cfg.protocol, "final_stage": final, "datasets": labels, "rows": rows, "pairs": pairs,
            "contrasts": contrasts}, figs


def _contrasts(cfg: BenchConfig, g: dict, preds: dict, where: dict) -> list[dict]:
    """The config's ``contrasts`` (method:reference) present in ``preds``: paired differences on the
    leaderboard's user resamples (same ``seed``), training seeds paired where both have all seeds."""
    from metactr.eval.intervals import compare_methods

    out = []
    for c in cfg.contrasts:
        a, b = c.split(":")
        if a in preds and b in preds:
            comp = compare_methods(g["y"], g["users"], {a: preds[a], b: preds[b]}, reference=b,
                                   n_boot=cfg.n_boot, seed=0, pair_seeds=True)
            out.append({**where, **comp.pair_rows()[0], "seeds": min(comp.methods[a].seeds, comp.methods[b].seeds),
                        "n_test": comp.n_test, "n_users": comp.n_users})
    return out


def _paper_numbers(cfg: BenchConfig, labels: dict, rows: list[dict]) -> None:
    """The paper's AUC beside ours, only on the paper's exact split (ml-1m-rml) or on ML-1M-partial
    (the report then states that the test sets differ)."""
    from metactr.papers.metaselector.paper_numbers import PAPER_ML1M
    from metactr.papers.rml.paper_numbers import paper_value

    for r in rows:
        lab = labels[r["dataset"]]
        if cfg.protocol == "rml" and lab["paper"] and r["stage"] != "before":
            r["paper_auc"] = paper_value(r["method"], r["stage"], r["subset"], "auc")
        elif cfg.protocol == "metaselector" and lab["paper"] and r["method"] in PAPER_ML1M:
            r["paper_auc"] = PAPER_ML1M[r["method"]][0]


def run_bench(cfg: BenchConfig, out: str | Path, *, jobs: int = 1, echo=print, report_only: bool = False,
              command: str = "") -> dict:
    from metactr.data.stats import read_meta, split_stats, stats_warnings
    from metactr.eval.bench_report import render_markdown
    from metactr.eval.report_html import render_html
    from metactr.utils import claim_out_dir, write_json_atomic, write_text_atomic

    if jobs < 1:
        raise ConfigError("--jobs must be >= 1", field="jobs")
    methods = check_methods(cfg)
    out = claim_out_dir(out, what="bench output", command="metactr bench")  # never over a foreign folder
    t0 = time.perf_counter()
    entries = prepare_all(cfg, out, echo)
    all_jobs = list_jobs(cfg, entries, methods)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    job_s = 0.0 if report_only else run_jobs(cfg, all_jobs, runs, methods, jobs, echo)
    res, figs = aggregate(cfg, entries, all_jobs, runs, methods)
    res["wall_s"] = None if report_only else round(time.perf_counter() - t0, 1)
    res["jobs_s"] = round(job_s, 1)
    res["n_jobs"] = len(all_jobs)
    res["command"] = command
    res["seeds"] = cfg.seeds
    res["batch_rows"] = cfg.batch_rows
    res["split_seeds"] = cfg.split_seeds
    stats = {}
    for e in entries:
        srows = split_stats(e.prepared)
        key = e.spec.name + ("" if e.split_seed is None else f" (split seed {e.split_seed})")
        stats[key] = {"rows": srows, "warnings": stats_warnings(srows, read_meta(e.prepared))}
    res["split_stats"] = stats
    write_json_atomic(out / "results.json", finite_or_none(res))
    write_text_atomic(out / "results.md", render_markdown(res))
    write_text_atomic(out / "report.html", render_html(res, figs))
    from metactr.config import dump_config

    write_text_atomic(out / "config.yaml", dump_config(cfg))
    return res
