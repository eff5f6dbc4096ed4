"""The RML paper's ML-1M experiment (Tables 2 and 5) with intervals.

Every (method, subset, seed) is one job: (meta-)train on ``{subset}_train``, fine-tune on FT-A,
FT-B, FT-C in turn, score the test set after each (``metactr.papers.rml.protocol``). Each finished
job is written to ``OUT/runs/`` at once, so an interrupted run resumes where it stopped (jobs
whose file exists with the same settings are not rerun; ``OUT`` must be absent, empty or an earlier
reproduction, with its ``.metactr`` marker, and ``--force`` starts afresh). ``OUT/results.json`` holds one row per
method x subset x stage (means and 95% intervals across seeds, per-seed values, the paper's
numbers); ``OUT/results.md`` shows them in the layout of the paper's tables.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field as PField

from metactr.config import StrictModel, load_config
from metactr.errors import ConfigError, DataError
from metactr.papers.rml.strategy_select import check_selection
from metactr.eval.metrics import mean_ci95
from metactr.eval.report import fmt, fmt_ci, markdown_table, write_run
from metactr.papers.rml.paper_numbers import PAPER_LABELS, paper_value
from metactr.papers.rml.protocol import (
    FT_STAGES,
    STAGE_LABELS,
    ProtocolConfig,
    run_protocol,
)
from metactr.strategies.config import StrategyDefaults, strategy_config
from metactr.train.tracking import TrackingConfig, build_tracker

ABLATIONS = {"rml": ("rml", "two_phase"), "rml_wo_meta": ("rml", "plain"),
             "rml_wo_meta_att": ("rml_no_att", "plain"), "rml_wo_meta_lstm": ("rml_no_lstm", "plain")}
# the meta-learning competitors of the paper: method -> (model, training procedure)
META_BASELINES = {"meta_e": ("meta_embedding", "meta_embedding"), "melu": ("melu", "melu"),
                  "mamo": ("mamo", "mamo")}
DEFAULT_METHODS = ("rml", "rml_wo_meta", "rml_wo_meta_att", "rml_wo_meta_lstm", "din")
QUICK_METHODS = ("rml", "rml_wo_meta")


class MethodConfig(StrictModel):
    model: str
    strategy: str = "plain"
    model_kw: dict[str, Any] = {}
    strategy_kw: dict[str, Any] = {}
    protocol: dict[str, Any] = {}  # this method's ProtocolConfig overrides, e.g. {ft_select: true}


def method_protocol(base: ProtocolConfig, name: str, mc: MethodConfig | None) -> ProtocolConfig:
    """The protocol settings of method ``name``: ``base`` with the method's own overrides."""
    if mc is None or not mc.protocol:
        return base
    try:
        return ProtocolConfig(**{**base.model_dump(), **mc.protocol})
    except ValueError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"method '{name}': bad protocol setting(s): {msg[:300]}", field=f"method.{name}.protocol") from None


class ReproduceConfig(StrictModel):
    methods: list[str] = list(DEFAULT_METHODS)
    subsets: list[str] = ["wc", "cw"]
    seeds: int = PField(5, ge=1)
    first_seed: int = 0
    max_hist_len: int | None = PField(None, ge=1)
    strategy: StrategyDefaults = StrategyDefaults()  # shared by every method; each keeps the keys it has
    protocol: ProtocolConfig = ProtocolConfig()
    method: dict[str, MethodConfig] = {}  # per-method overrides / extra methods
    threads: int = PField(1, ge=1)  # torch intra-op threads of each job (not part of a job's key)
    tracking: TrackingConfig = TrackingConfig()  # metrics.jsonl always; TensorBoard / MLflow on request


def method_config(cfg: ReproduceConfig, name: str) -> MethodConfig:
    if name in cfg.method:
        return cfg.method[name]
    if name in ABLATIONS:
        model, strategy = ABLATIONS[name]
        return MethodConfig(model=model, strategy=strategy)
    if name in META_BASELINES:
        model, strategy = META_BASELINES[name]
        return MethodConfig(model=model, strategy=strategy)
    from metactr.models.base import registry

    if name in registry():
        return MethodConfig(model=name, strategy="plain")
    raise ConfigError(f"unknown method '{name}' (RML variants: {', '.join(ABLATIONS)}; meta-learning "
                      f"baselines: {', '.join(META_BASELINES)}; or any registered "
                      f"model: {', '.join(registry())})", field="methods")


def job_settings(cfg: ReproduceConfig, name: str) -> tuple[str, dict, Any, float, int]:
    """(model, its keyword arguments, strategy config, epochs, batch size) of method ``name``."""
    mc = method_config(cfg, name)
    unknown = sorted(set(mc.strategy_kw) - set(StrategyDefaults.model_fields))
    if unknown:
        raise ConfigError(f"method '{name}': unknown strategy setting(s) {', '.join(unknown)}",
                          field=f"method.{name}.strategy_kw")
    values = StrategyDefaults(**{**cfg.strategy.model_dump(), **mc.strategy_kw}).model_dump()
    return mc.model, dict(mc.model_kw), strategy_config(mc.strategy, values), values["epochs"], values["batch_size"]


def _job_key(data: str, cfg: ReproduceConfig, method: str, subset: str, seed: int) -> str:
    model, kw, strat, epochs, batch_size = job_settings(cfg, method)
    blob = json.dumps({"data": str(Path(data).resolve()), "model": model, "kw": kw, "strategy": strat.model_dump(),
                       "epochs": epochs, "batch_size": batch_size,
                       "protocol": method_protocol(cfg.protocol, method, cfg.method.get(method)).key_dump(),
                       "hist": cfg.max_hist_len, "subset": subset,
                       "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_DATASETS: dict = {}


def _run_job(data: str, cfg_json: str, method: str, subset: str, seed: int, out_file: str) -> str:
    import torch

    from metactr.data.prepared import PreparedDataset
    from metactr.utils import write_json_atomic

    cfg = ReproduceConfig.model_validate_json(cfg_json)
    torch.set_num_threads(cfg.threads)
    key = (data, cfg.max_hist_len)
    if key not in _DATASETS:
        _DATASETS[key] = PreparedDataset(data, max_hist_len=cfg.max_hist_len)
    model, kw, strat, epochs, batch_size = job_settings(cfg, method)
    t0 = time.perf_counter()
    proto = method_protocol(cfg.protocol, method, cfg.method.get(method))
    rows = run_protocol(_DATASETS[key], subset, model, kw, strat, proto, seed, epochs=epochs,
                        batch_size=batch_size)
    wall = time.perf_counter() - t0
    write_json_atomic(out_file, {"key": _job_key(data, cfg, method, subset, seed), "method": method,
                                 "subset": subset, "seed": seed, "wall_s": round(wall, 2), "rows": rows})
    return out_file


def run_reproduction(data: str | Path, out: str | Path, cfg: ReproduceConfig, *, jobs: int = 1,
                     echo=print, report_only: bool = False, force: bool = False) -> dict:
    """Every job not finished in ``out`` (metactr's own directory, or absent/empty; ``force``: start
    afresh), then the aggregate; ``report_only`` aggregates the finished jobs only."""
    from metactr.utils import check_out_dir, claim_out_dir

    data, out = str(data), Path(out)
    if not Path(data).is_dir():
        raise DataError("prepared dataset directory not found", path=data)
    for s in cfg.subsets:
        for st in ("train", "test", *FT_STAGES):
            if not (Path(data) / f"{s}_{st}.parquet").is_file():
                raise DataError(f"subset '{s}' needs split '{s}_{st}' (the ml-1m-rml layout)",
                                path=Path(data) / f"{s}_{st}.parquet")
    for m in cfg.methods:  # unknown method / bad strategy / bad selection -> ConfigError before any work
        check_selection(job_settings(cfg, m)[2], method_protocol(cfg.protocol, m, cfg.method.get(m)), m)
    if report_only:
        if not check_out_dir(out, what="reproduction"):
            raise DataError("--report-only: no reproduction here to aggregate", path=out)
    else:
        claim_out_dir(out, force=force, what="reproduction")
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    todo, files = [], []
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    for seed in seeds:  # seed-major: an interrupted run still has every method for its first seeds
        for m in cfg.methods:
            for s in cfg.subsets:
                f = runs / f"{m}__{s}__seed{seed}.json"
                files.append(f)
                if f.is_file():
                    try:
                        if json.loads(f.read_text())["key"] == _job_key(data, cfg, m, s, seed):
                            continue
                    except (json.JSONDecodeError, KeyError):
                        pass
                todo.append((m, s, seed, str(f)))
    t0 = time.perf_counter()
    cfg_json = cfg.model_dump_json()
    if report_only:  # aggregate the finished jobs, run nothing
        done = {f for *_, f in todo}
        files = [f for f in files if str(f) not in done]
        todo = []
    echo(f"{len(files)} jobs ({len(files) - len(todo)} already done), {jobs} worker(s)")
    if jobs <= 1:
        for m, s, seed, f in todo:
            _run_job(data, cfg_json, m, s, seed, f)
            echo(f"done {m} {s} seed {seed} ({time.perf_counter() - t0:.0f} s)")
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futs = {pool.submit(_run_job, data, cfg_json, m, s, seed, f): (m, s, seed) for m, s, seed, f in todo}
            for fut in futs:
                fut.result()
                m, s, seed = futs[fut]
                echo(f"done {m} {s} seed {seed} ({time.perf_counter() - t0:.0f} s)")
    records = [json.loads(f.read_text()) for f in files]
    _track(out, cfg, records)
    results = aggregate(records, cfg, data)
    results["wall_s"] = None if report_only else round(time.perf_counter() - t0, 1)
    results["job_s_total"] = round(sum(rec["wall_s"] for rec in records), 1)
    write_run(out, results, render_markdown(results), config=cfg)
    return results


def _track(out: Path, cfg: ReproduceConfig, records: list[dict]) -> None:
    """Every finished job's per-stage metrics through the tracking interface: ``OUT/metrics.jsonl``
    (one line per job, step = its seed), and TensorBoard / MLflow when the config asks."""
    with build_tracker(out, cfg.tracking.backends, step_key="seed", history=[],
                       mlflow_experiment=cfg.tracking.mlflow_experiment,
                       mlflow_tracking_uri=cfg.tracking.mlflow_tracking_uri) as tracker:
        tracker.log_params(cfg.model_dump())
        for rec in records:
            tracker.log_metrics({f"{rec['method']}/{rec['subset']}/{r['stage']}/{k}": r[k]
                                 for r in rec["rows"] for k in ("auc", "logloss")}, step=rec["seed"])


def aggregate(records: list[dict], cfg: ReproduceConfig, data: str) -> dict:
    by: dict[tuple, list[dict]] = {}
    job_wall: dict[str, float] = {}
    for rec in records:
        job_wall[rec["method"]] = job_wall.get(rec["method"], 0.0) + rec["wall_s"]
        for r in rec["rows"]:
            by.setdefault((rec["method"], r["subset"], r["stage"]), []).append(r)
    rows = []
    for m in cfg.methods:
        for s in cfg.subsets:
            for stage in ("before", *FT_STAGES):
                rs = sorted(by.get((m, s, stage), []), key=lambda r: r["seed"])
                if not rs:
                    continue
                auc_m, auc_h = mean_ci95([r["auc"] for r in rs])
                ll_m, ll_h = mean_ci95([r["logloss"] for r in rs])
                row = {"method": m, "subset": s, "stage": stage, "auc_mean": auc_m, "auc_ci95": auc_h,
                       "logloss_mean": ll_m, "logloss_ci95": ll_h, "n_test": rs[0]["n_test"],
                       "seeds": [r["seed"] for r in rs], "auc": [r["auc"] for r in rs],
                       "logloss": [r["logloss"] for r in rs], "ft_steps": rs[0]["ft_steps"],
                       "train_s_mean": sum(r["train_s"] for r in rs) / len(rs),
                       "paper_auc": paper_value(m, stage, s, "auc"),
                       "paper_logloss": paper_value(m, stage, s, "logloss")}
                if all("auc_all_rows" in r for r in rs):
                    row["auc_all_rows_mean"], row["auc_all_rows_ci95"] = mean_ci95([r["auc_all_rows"] for r in rs])
                    row["logloss_all_rows_mean"], row["logloss_all_rows_ci95"] = mean_ci95(
                        [r["logloss_all_rows"] for r in rs])
                    row["n_test_all_rows"] = rs[0]["n_test_all_rows"]
                if "auc_boot95" in rs[0]:
                    row["auc_boot95_seed0"] = rs[0]["auc_boot95"]
                for k in ("auc", "logloss"):
                    p = row[f"paper_{k}"]
                    row[f"{k}_diff"] = None if p is None else row[f"{k}_mean"] - p
                rows.append(row)
    return {"experiment": "RML (MM'22) Tables 2 and 5 on a prepared dataset", "data": data,
            "mode": cfg.protocol.mode, "methods": cfg.methods, "subsets": cfg.subsets,
            "n_seeds": cfg.seeds, "job_wall_s_by_method": job_wall, "rows": rows}


def _cell(row: dict | None, metric: str) -> str:
    if row is None:
        return "–"
    ours = fmt_ci(row[f"{metric}_mean"], row[f"{metric}_ci95"])
    p, d = row[f"paper_{metric}"], row[f"{metric}_diff"]
    return ours if p is None or d is None or math.isnan(d) else f"{ours} ({fmt(p)}, {row[f'{metric}_diff']:+.4f})"


def render_markdown(res: dict) -> str:
    idx = {(r["method"], r["subset"], r["stage"]): r for r in res["rows"]}
    subsets = res["subsets"]
    label = lambda m: PAPER_LABELS.get(m, m)  # noqa: E731
    lines = ["# RML reproduction (MM'22, ML-1M Tables 2 and 5)", "",
             f"Data: `{res['data']}`; mode: `{res['mode']}`; seeds: {res['n_seeds']}; "
             f"wall time of this invocation: {fmt(res.get('wall_s'), 1)} s (none: aggregated with --report-only); "
             f"sum of the jobs' own times: {fmt(res.get('job_s_total'), 1)} s.", "",
             "Cells: our mean ± 95% half-width across seeds (Student t), then in parentheses the paper's "
             "number and our difference. Test sets are tiny (WC 320, CW 248 rows; faithful mode scores "
             "only the complete batches of 128: 256 / 128 rows), so see the bootstrap interval below too.", ""]
    main = [m for m in res["methods"] if m not in ABLATIONS or m == "rml"]
    abl = [m for m in res["methods"] if m in ABLATIONS]
    for title, methods in (("Table 2 layout (RML and baselines)", main), ("Table 5 layout (ablations)", abl)):
        if not methods:
            continue
        lines += [f"## {title}", ""]
        for stage in FT_STAGES:
            heads = ["Method"] + [f"{s.upper()} {k}" for s in subsets for k in ("loss", "AUC")]
            body = [[label(m)] + [_cell(idx.get((m, s, stage)), k) for s in subsets for k in ("logloss", "auc")]
                    for m in methods]
            lines += [f"### after {STAGE_LABELS[stage]}", "", markdown_table(heads, body)]
    lines += ["## Before fine-tuning (not in the paper)", ""]
    heads = ["Method"] + [f"{s.upper()} {k}" for s in subsets for k in ("loss", "AUC")]
    lines.append(markdown_table(heads, [[label(m)] + [_cell(idx.get((m, s, "before")), k) for s in subsets
                                                      for k in ("logloss", "auc")] for m in res["methods"]]))
    all_rows = [r for r in res["rows"] if r["stage"] == "finetune_c" and "auc_all_rows_mean" in r]
    if all_rows:
        lines += ["## After FT-C, scored on every test row (faithful mode scores complete batches only)", ""]
        lines.append(markdown_table(["Method", "Subset", "AUC (all rows)", "loss (all rows)", "n test"], [
            [label(r["method"]), r["subset"].upper(), fmt_ci(r["auc_all_rows_mean"], r["auc_all_rows_ci95"]),
             fmt_ci(r["logloss_all_rows_mean"], r["logloss_all_rows_ci95"]), str(r["n_test_all_rows"])]
            for r in all_rows]))
    lines += ["## FT-C AUC: single-test-set bootstrap 95% interval (seed 0)", ""]
    boot = []
    for m in res["methods"]:
        for s in subsets:
            r = idx.get((m, s, "finetune_c"))
            if r and "auc_boot95_seed0" in r:
                lo, hi = r["auc_boot95_seed0"]
                boot.append([label(m), s.upper(), fmt(r["auc"][0]), f"[{fmt(lo)}, {fmt(hi)}]", str(r["n_test"])])
    if boot:
        lines.append(markdown_table(["Method", "Subset", "AUC seed 0", "bootstrap 95%", "n test"], boot))
    return "\n".join(lines) + "\n"


def load_reproduce_config(path: Path | None, overrides: list[str] | None) -> ReproduceConfig:
    return load_config(ReproduceConfig, path, overrides)
