"""One bench job, and how it is keyed, saved and found again.

A job is (dataset, split seed, method, subset, training seed) in the ``rml`` protocol, or
(dataset, split seed, training seed) in the ``metaselector`` protocol (``run_seed`` trains every
method of Table 3 at once). A finished job writes ``OUT/runs/<name>.npz`` (float32 test
probabilities per method and stage, the test labels and user ids; never a pickle) and then
``OUT/runs/<name>.json`` (its key, settings and wall time). A job whose JSON holds the same key
and whose npz exists is not rerun, so an interrupted bench resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metactr.papers.bench.config import BenchConfig, rml_protocol, rml_settings
from metactr.papers.rml.protocol import FT_STAGES

STAGES = ("before", *FT_STAGES)


@dataclass(frozen=True)
class Job:
    dataset: str  # the dataset's name in the bench config
    split_seed: int | None
    prepared: str  # the prepared directory
    method: str  # rml: the method; metaselector: "all"
    subset: str | None  # rml: wc / cw; metaselector: None
    seed: int

    @property
    def name(self) -> str:
        split = "" if self.split_seed is None else f"__split{self.split_seed}"
        return f"{self.dataset}{split}__{self.method}__{self.subset or 'all'}__seed{self.seed}"


def _data_id(prepared: str) -> str:
    meta = Path(prepared) / "meta.json"
    h = json.loads(meta.read_text()).get("config_hash", "") if meta.is_file() else ""
    return f"{Path(prepared).resolve()}:{h}"


def job_key(cfg: BenchConfig, job: Job) -> str:
    if cfg.protocol == "rml":
        model, kw, strat, epochs, bs = rml_settings(cfg, job.method)
        settings = {"model": model, "kw": kw, "strategy": strat.model_dump(), "epochs": epochs, "batch_size": bs,
                    "protocol": rml_protocol(cfg, job.method).key_dump(), "hist": cfg.rml.max_hist_len}
        if adapts_at_test(strat):  # scored after per-session adaptation since 2026-12-07 (stop 14):
            settings["test_adaptation"] = 1  # jobs scored before that fix are stale and run again
    else:
        settings = {"metaselector": cfg.metaselector}
    blob = json.dumps({"data": _data_id(job.prepared), "protocol": cfg.protocol, "settings": settings,
                       "subset": job.subset, "seed": job.seed, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def adapts_at_test(strat) -> bool:
    """Whether the strategy adapts every session on its own history before scoring it."""
    from metactr.strategies.base import strategy_registry

    cls = strategy_registry().get(getattr(strat, "name", ""))
    return cls is not None and hasattr(cls, "test_adaptation")


def is_done(runs: Path, cfg: BenchConfig, job: Job) -> bool:
    f, npz = runs / f"{job.name}.json", runs / f"{job.name}.npz"
    if not (f.is_file() and npz.is_file()):
        return False
    try:
        return json.loads(f.read_text())["key"] == job_key(cfg, job)
    except (json.JSONDecodeError, KeyError):
        return False


def load_job(runs: Path, job: Job) -> dict[str, np.ndarray]:
    with np.load(runs / f"{job.name}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _save(runs: Path, cfg: BenchConfig, job: Job, arrays: dict[str, np.ndarray], wall: float, extra: dict) -> None:
    from metactr.utils import atomic_path, write_json_atomic

    npz = runs / f"{job.name}.npz"
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    write_json_atomic(runs / f"{job.name}.json", {"key": job_key(cfg, job), "dataset": job.dataset,
                                                   "split_seed": job.split_seed, "method": job.method,
                                                   "subset": job.subset, "seed": job.seed,
                                                   "wall_s": round(wall, 2), **extra})


_DATASETS: dict = {}


def _dataset(prepared: str, max_hist_len: int | None):
    from metactr.data.prepared import PreparedDataset

    key = (prepared, max_hist_len)
    if key not in _DATASETS:
        _DATASETS[key] = PreparedDataset(prepared, max_hist_len=max_hist_len)
    return _DATASETS[key]


def run_rml_job(cfg: BenchConfig, job: Job) -> tuple[dict[str, np.ndarray], dict]:
    """Train on ``{subset}_train``, fine-tune on FT-A/B/C in turn, predict every test row before and
    after each stage. The rate baselines recount their clicks from train + the FT sets seen."""
    import torch

    from metactr.engine.device import resolve_device
    from metactr.eval.adapted import protocol_proba
    from metactr.models.base import build_model
    from metactr.papers.rml.protocol import finetune
    from metactr.strategies import build_strategy
    from metactr.train.trainer import Trainer
    from metactr.utils import seed_everything

    device = resolve_device(cfg.device)
    ds = _dataset(job.prepared, cfg.rml.max_hist_len)
    sub = job.subset
    model_name, kw, strat, epochs, bs = rml_settings(cfg, job.method)
    seed_everything(job.seed)
    model = build_model(model_name, ds.spec, **kw)
    counts = hasattr(model, "use_stats")
    seen = [f"{sub}_train"]
    if counts:
        model.use_stats(ds, seen)
    model.to(device)
    trainer = Trainer(device=device)
    proto, extra = rml_protocol(cfg, job.method), {}
    if (proto.strategy_select or proto.ft_select) and not counts:  # chosen on rows cut from train
        from metactr.papers.rml.strategy_select import choose_settings

        strat, proto, extra = choose_settings(ds, sub, model_name, kw, strat, proto, job.seed, epochs=epochs,
                                              batch_size=bs, trainer=trainer)
        seed_everything(job.seed)  # the main run trains exactly as it would without the selection
        model = build_model(model_name, ds.spec, **kw).to(device)
    t0 = time.perf_counter()
    fitted = trainer.fit(model, ds, f"{sub}_train", build_strategy(strat), epochs=epochs, batch_size=bs,
                         generator=torch.Generator().manual_seed(job.seed))
    train_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(job.seed + 7919)
    test = ds.split(f"{sub}_test")
    out = {"y": test.label.numpy().astype(np.int8), "user": test.user_id.numpy().astype(np.int64)}
    for stage in STAGES:
        if stage != "before":
            seen.append(f"{sub}_{stage}")
            if counts:
                model.use_stats(ds, seen)
            finetune(model, ds, f"{sub}_{stage}", fitted.strategy.optimizer, proto, gen, strat.clip_norm, trainer)
        # a session strategy adapts each session first, a user-level one each user (on the splits seen)
        prob = protocol_proba(model, ds, test, fitted.strategy, seen)
        out[f"p__{job.method}__{stage}"] = prob.astype(np.float32)
    return out, {"train_s": round(train_s, 2), **extra}


def run_selector_job(cfg: BenchConfig, job: Job, methods: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """Every MetaSelector-protocol method for one seed (``papers.metaselector.train.run_seed``)."""
    from metactr.config import validate
    from metactr.papers.metaselector.train import SelectorData, SelectorExperiment, run_seed

    exp = validate(SelectorExperiment, {**cfg.metaselector, "device": cfg.device}, source="metaselector")
    data = SelectorData.load(job.prepared, disjoint=exp.disjoint_test_users, max_users=exp.max_users)
    res = run_seed(exp, data, job.seed)
    out = {"y": data.test.label.numpy().astype(np.int8), "user": data.test.user_id.numpy().astype(np.int64)}
    for m in methods:
        if m in res.preds:
            out[f"p__{m}__final"] = np.asarray(res.preds[m], dtype=np.float32)
    return out, {"seconds": {k: round(v, 2) for k, v in res.seconds.items()}}


def execute(cfg_json: str, job: Job, runs: str, methods: list[str]) -> str:
    """Run one job in this process (or a pool worker) and save it; returns its name."""
    import torch

    torch.set_num_threads(1)
    cfg = BenchConfig.model_validate_json(cfg_json)
    t0 = time.perf_counter()
    if cfg.protocol == "rml":
        arrays, extra = run_rml_job(cfg, job)
    else:
        arrays, extra = run_selector_job(cfg, job, methods)
    _save(Path(runs), cfg, job, arrays, time.perf_counter() - t0, extra)
    return job.name
