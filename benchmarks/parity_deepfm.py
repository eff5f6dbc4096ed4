"""DeepFM quality parity: our DeepFM vs DeepCTR-Torch's on the same MovieLens split (issue 3, item 6).

    bash benchmarks/setup_bench_env.sh        # once: .bench-venv with deepctr-torch
    taskset -c 1 .venv/bin/python benchmarks/parity_deepfm.py --dataset ml-100k --seeds 5
    taskset -c 1 .venv/bin/python benchmarks/parity_deepfm.py --dataset ml-1m-partial --seeds 5
    # ablation: the same DNN init on both sides (our runs, unchanged by it, reused from the main entry)
    taskset -c 1 .venv/bin/python benchmarks/parity_deepfm.py --dataset ml-100k --seeds 5 --dnn-init torch --reuse-ours

Data: the random 80/10/10 split (label rating >= 4) that ``metactr train configs/deepfm_ml100k.yaml``
(``configs/deepfm_ml1m.yaml``) trains on, prepared by our pipeline and cached where the config says
(``runs/prepared/...``). The split itself is fixed (the pipeline's seed 42); ``--seeds`` changes the
model initialisation and the shuffling of both libraries (seed s: ``seed_everything(s)`` for ours,
``DeepFM(seed=s)`` for DeepCTR-Torch, whose DataLoader shuffles from torch's global RNG).

Features: both libraries get our encoded ids (0 = padding) with our vocabulary sizes, exported from
the ``PreparedDataset`` (``ds.batch(split)``) into ``runs/parity_deepfm/<dataset>/deepctr_inputs.npz``.
Single-valued fields -> ``SparseFeat``; multi-valued fields (genres) -> ``VarLenSparseFeat(combiner=
"mean")`` masked on id 0, as our ``FieldEmbedding`` pools them; the session -> one
``VarLenSparseFeat(combiner="mean", length_name="hist_len")`` per item field whose
``embedding_name`` is the target item field's, as ``interactions.history_fields`` shares the item
table. One unavoidable difference: our history of a multi-valued item field is the mean over
session items of each item's mean genre vector; DeepCTR-Torch 0.3.0 has no per-token weights for a
sequence feature, so there it is the mean over all genre tokens of the session (items with more
genres weigh more). Both libraries see the same rows, labels and ids (checked: the DeepCTR worker
echoes label counts and id checksums).

Hyper-parameters come from the config (embed_dim, hidden, dropout, activation, Adam lr, batch size)
and are given to both; L2 is 0 on both (DeepCTR-Torch's defaults l2_reg_embedding = l2_reg_linear =
1e-5 are set to 0, as our config has none); embedding init std 1e-4 on both (both libraries'
default). Each library keeps its own defaults where there is no shared knob, reported, not tuned:
DeepCTR-Torch initialises the DNN's hidden weights N(0, init_std = 1e-4) and sums the batch loss
(``reduction='sum'``); ours uses torch's default Linear init and the mean batch loss. The ablations
``--dnn-init torch|normal`` (the same DNN init on BOTH sides) and ``--deepctr-loss mean`` remove them.

Epoch choice: each library trains ``--epochs`` epochs (default: the config's), is evaluated on
valid and test after every epoch, and reports test AUC/LogLoss at *its own* best validation-AUC epoch
(first maximum; the trainer's early-stopping rule without patience). The test metrics after every
epoch (fixed-epoch comparison) are in the JSON too. All metrics are computed here, by
``metactr.eval.metrics``, from the probabilities both workers return, on the same labels.

Each (library, seed) runs in its own process: ours in the project venv through the public trainer
(``metactr.train.trainer.fit``, a checkpoint per epoch, each re-evaluated on test), DeepCTR-Torch in
``.bench-venv``. Pin the run to one core (``taskset -c 1``); workers use ``--threads`` torch threads
(default 1). Results: printed, and written atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {"ml-100k": ROOT / "configs" / "deepfm_ml100k.yaml",
            "ml-1m-partial": ROOT / "configs" / "deepfm_ml1m.yaml"}
WORK = ROOT / "runs" / "parity_deepfm"
SPLITS = ("train", "valid", "test")
# model.params keys of our DeepFM that have a DeepCTR-Torch DeepFM counterpart (same meaning)
MAPPED_PARAMS = {"embed_dim", "hidden", "dropout", "activation", "emb_init_std"}


# ----------------------------------------------------------------------------- config + data
def load_cfg(dataset: str, overrides: list[str]):
    from metactr.train.config import load_train_config

    cfg = load_train_config(DATASETS[dataset], overrides)
    if cfg.model.name != "deepfm":
        raise SystemExit(f"error: {DATASETS[dataset]} trains '{cfg.model.name}', not deepfm")
    unknown = set(cfg.model.params) - MAPPED_PARAMS
    if unknown:
        raise SystemExit(f"error: model.params {sorted(unknown)} have no DeepCTR-Torch counterpart here")
    if cfg.optim.name != "adam" or cfg.optim.weight_decay or cfg.lr_decay != 1.0 or cfg.grad_clip:
        raise SystemExit("error: parity runs need plain Adam (no weight decay, LR decay or clipping) in the config")
    return cfg


def hparams(cfg) -> dict:
    p = cfg.model.params
    return {"embed_dim": int(p.get("embed_dim", 16)), "hidden": [int(h) for h in p.get("hidden", (256, 128))],
            "dropout": float(p.get("dropout", 0.0)), "activation": str(p.get("activation", "relu")),
            "init_std": float(p.get("emb_init_std", 1e-4)), "lr": cfg.optim.lr, "batch_size": cfg.batch_size,
            "l2": 0.0}


def export_inputs(ds, out: Path) -> dict:
    """Write every split's per-field id arrays (DeepCTR's input dict) and the feature list.

    Cached: rewritten only when the prepared data's meta.json changes."""
    meta_bytes = (ds.root / "meta.json").read_bytes()
    fingerprint = hashlib.sha256(meta_bytes).hexdigest()[:16]
    feats_path = out / "features.json"
    if feats_path.is_file() and (out / "deepctr_inputs.npz").is_file():
        feats = json.loads(feats_path.read_text())
        if feats.get("prepared_fingerprint") == fingerprint and feats.get("prepared") == str(ds.root):
            return feats
    import torch

    from metactr.utils import atomic_path, write_json_atomic

    spec = ds.spec
    sparse, varlen = [], []  # (name, vocab, embedding_name, maxlen, length_name)
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        b = ds.batch(ds.split(split))
        cols: dict[str, torch.Tensor] = {}
        for group, ids in (("user", b.user), ("context", b.context), ("item", b.item)):
            off = 0
            for f in getattr(spec, group):
                cols[f.name] = ids[:, off:off + f.max_len]
                off += f.max_len
        off = 0
        for f in spec.item:  # the session: one pooled sequence per item field
            cols[f"hist_{f.name}"] = b.hist[:, :, off:off + f.max_len].reshape(len(b.label), -1)
            off += f.max_len
        hist_len = b.hist_mask.sum(1)
        prefix = torch.arange(b.hist_mask.shape[1])[None, :] < hist_len[:, None]
        if not bool((prefix == b.hist_mask).all()):
            raise SystemExit(f"error: split '{split}': valid session items are not a prefix; "
                             "DeepCTR's length-based pooling would differ")
        cols["hist_len"] = hist_len
        for k, v in cols.items():
            arrays[f"{split}/{k}"] = v.numpy().astype(np.int32)
        arrays[f"{split}/label"] = b.label.numpy().astype(np.float32)
    for group in ("user", "context", "item"):
        for f in getattr(spec, group):
            if f.max_len == 1:
                sparse.append({"name": f.name, "vocab": f.vocab_size})
            else:  # mean over non-zero ids (masking), as FieldEmbedding pools
                varlen.append({"name": f.name, "vocab": f.vocab_size, "embedding_name": f.name,
                               "maxlen": f.max_len, "length_name": None})
    for f in spec.item:
        single = f.max_len == 1
        varlen.append({"name": f"hist_{f.name}", "vocab": f.vocab_size, "embedding_name": f.name,
                       "maxlen": spec.max_hist_len * f.max_len,
                       # single-valued: exactly our mean over valid items; multi-valued: token mean (see docstring)
                       "length_name": "hist_len" if single else None})
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "deepctr_inputs.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    feats = {"prepared": str(ds.root), "prepared_fingerprint": fingerprint, "sparse": sparse, "varlen": varlen,
             "rows": {s: int(arrays[f"{s}/label"].size) for s in SPLITS}}
    write_json_atomic(feats_path, feats)
    return feats


def _checksum(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """Label count and an id checksum per split: both workers must see the same data."""
    out = {}
    for s in SPLITS:
        keys = sorted(k for k in arrays if k.startswith(s + "/") and not k.endswith("/label"))
        out[s] = int(sum(int((arrays[k].astype(np.int64) * (i + 1)).sum()) for i, k in enumerate(keys)))
        out[s + "_pos"] = int(arrays[f"{s}/label"].sum())
    return out


# ----------------------------------------------------------------------------- our worker
def run_ours(dataset: str, seed: int, epochs: int, threads: int, run_dir: Path, probs_out: Path,
             dnn_init: str = "library", init_std: float = 1e-4) -> dict:
    import torch

    torch.set_num_threads(threads)
    from metactr.eval.predict import predict_proba
    from metactr.models.base import build_model
    from metactr.train import checkpoint as ckpt
    from metactr.train.run import fit, load_dataset
    from metactr.utils import seed_everything

    cfg = load_cfg(dataset, [f"epochs={epochs}", f"seed={seed}", "early_stopping.patience=null",
                             f"threads={threads}", f"out={run_dir}", "progress=false", "tensorboard=false"])
    ds = load_dataset(cfg.data, run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # fit refuses a directory with checkpoints; this one is ours alone
    seed_everything(seed)
    model = build_model("deepfm", ds.spec, **cfg.model.params)
    if dnn_init == "normal":  # DeepCTR-Torch's DNN init: hidden weights N(0, init_std), output layer default
        hidden = [m for m in model.mlp.net if isinstance(m, torch.nn.Linear)][:-1]
        for lin in hidden:
            torch.nn.init.normal_(lin.weight, mean=0.0, std=init_std)
    t0 = time.perf_counter()
    results = fit(model, ds, cfg, run_dir=run_dir, log=lambda s: print(s, file=sys.stderr))
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    probs = {}
    for e in range(1, epochs + 1):  # re-evaluate every epoch's checkpoint on valid and test
        stem = run_dir / "checkpoints" / f"epoch_{e:03d}"
        path = stem.with_suffix(".safetensors")
        ckpt.load_state(model, ckpt._read_tensors(path), path)
        for split in ("valid", "test"):
            probs[f"{split}/{e}"] = predict_proba(model, ds, split, batch_size=cfg.eval_batch_size).astype(np.float64)
    np.savez(probs_out, **probs)
    shutil.rmtree(run_dir)  # checkpoints served their purpose; keep runs/ small
    return {"best_epoch": results["best_epoch"], "trainer_test": results["metrics"].get("test"),
            "train_time_s": [h["train_time_s"] for h in history], "train_loss": [h["train_loss"] for h in history],
            "wall_s": wall, "n_params": results["n_params"]}


# ----------------------------------------------------------------------------- DeepCTR-Torch worker
def run_deepctr(work: Path, hp: dict, seed: int, epochs: int, threads: int, probs_out: Path,
                dnn_init: str = "library", loss: str = "sum") -> dict:
    import torch

    torch.set_num_threads(threads)
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DeepFM

    feats = json.loads((work / "features.json").read_text())
    z = np.load(work / "deepctr_inputs.npz")
    arrays = {k: z[k] for k in z.files}
    d = hp["embed_dim"]
    cols = [SparseFeat(f["name"], f["vocab"], embedding_dim=d) for f in feats["sparse"]]
    cols += [VarLenSparseFeat(SparseFeat(f["name"], f["vocab"], embedding_dim=d, embedding_name=f["embedding_name"]),
                              maxlen=f["maxlen"], combiner="mean", length_name=f["length_name"])
             for f in feats["varlen"]]
    names = [f["name"] for f in feats["sparse"]] + [f["name"] for f in feats["varlen"]] + ["hist_len"]
    x = {s: {n: arrays[f"{s}/{n}"] for n in names} for s in SPLITS}
    y_train = arrays["train/label"]
    model = DeepFM(cols, cols, dnn_hidden_units=tuple(hp["hidden"]), l2_reg_linear=hp["l2"],
                   l2_reg_embedding=hp["l2"], l2_reg_dnn=hp["l2"], init_std=hp["init_std"], seed=seed,
                   dnn_dropout=hp["dropout"], dnn_activation=hp["activation"], task="binary", device="cpu")
    if dnn_init == "torch":  # torch's default Linear init (ours) instead of N(0, init_std)
        for lin in model.dnn.linears:
            lin.reset_parameters()
    model.compile(torch.optim.Adam(model.parameters(), lr=hp["lr"]), "binary_crossentropy", metrics=[])
    if loss == "mean":  # the batch-mean loss (ours) instead of fit()'s reduction='sum'
        import torch.nn.functional as F

        model.loss_func = lambda p, y, reduction="mean": F.binary_cross_entropy(p, y, reduction="mean")
    probs, times = {}, []
    t_all = time.perf_counter()
    for e in range(1, epochs + 1):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # fit() prints; stdout carries our JSON line
            model.fit(x["train"], y_train, batch_size=hp["batch_size"], epochs=1, verbose=0, shuffle=True)
        times.append(time.perf_counter() - t0)
        for split in ("valid", "test"):
            probs[f"{split}/{e}"] = model.predict(x[split], batch_size=8192).reshape(-1).astype(np.float64)
    np.savez(probs_out, **probs)
    return {"train_time_s": times, "wall_s": time.perf_counter() - t_all,
            "n_params": sum(p.numel() for p in model.parameters()), "checksum": _checksum(arrays)}


# ----------------------------------------------------------------------------- orchestration
def _worker(lib: str, args, seed: int, work: Path, hp: dict, epochs: int) -> tuple[dict, dict[str, np.ndarray]]:
    py = sys.executable if lib == "ours" else args.bench_python
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT / "src") if lib == "ours" else "")
    probs_out = work / f"probs_{lib}_seed{seed}_{os.getpid()}.npz"
    cmd = [py, str(Path(__file__).resolve()), "--worker", lib, "--dataset", args.dataset, "--seed", str(seed),
           "--epochs", str(epochs), "--threads", str(args.threads), "--hp", json.dumps(hp),
           "--probs-out", str(probs_out), "--dnn-init", args.dnn_init, "--deepctr-loss", args.deepctr_loss]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"error: {lib} seed {seed} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    z = np.load(probs_out)
    probs = {k: z[k] for k in z.files}
    probs_out.unlink()
    return info, probs


def _epoch_metrics(probs: dict[str, np.ndarray], labels: dict[str, np.ndarray], epochs: int) -> list[dict]:
    from metactr.eval.metrics import auc, logloss

    return [{"epoch": e, **{f"{s}_{m}": f(labels[s], probs[f"{s}/{e}"]) for s in ("valid", "test")
                            for m, f in (("auc", auc), ("logloss", logloss))}} for e in range(1, epochs + 1)]


def _best(per_epoch: list[dict]) -> dict:
    best = max(per_epoch, key=lambda r: (r["valid_auc"], -r["epoch"]))  # first maximum
    return {"epoch": best["epoch"], "valid_auc": best["valid_auc"], "test_auc": best["test_auc"],
            "test_logloss": best["test_logloss"]}


def _summary(runs: dict[str, list[dict]], epochs: int) -> dict:
    from metactr.eval.metrics import mean_ci95, paired_diff_ci95

    def ci(values):
        m, h = mean_ci95(values)
        return {"mean": m, "ci95": h}

    out = {}
    for metric in ("test_auc", "test_logloss"):
        o = [r["best"][metric] for r in runs["ours"]]
        d = [r["best"][metric] for r in runs["deepctr"]]
        m, h = paired_diff_ci95(o, d)
        out[metric] = {"ours": ci(o), "deepctr": ci(d), "diff_ours_minus_deepctr": {"mean": m, "ci95": h}}
    fixed = {}
    for e in range(1, epochs + 1):
        o = [r["per_epoch"][e - 1]["test_auc"] for r in runs["ours"]]
        d = [r["per_epoch"][e - 1]["test_auc"] for r in runs["deepctr"]]
        m, h = paired_diff_ci95(o, d)
        fixed[str(e)] = {"ours": ci(o), "deepctr": ci(d), "diff": {"mean": m, "ci95": h}}
    out["test_auc_at_fixed_epoch"] = fixed
    return out


def _fmt(x: dict) -> str:
    return f"{x['mean']:.4f} ± {x['ci95']:.4f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Run pinned: taskset -c 1 .venv/bin/python benchmarks/parity_deepfm.py ...")
    ap.add_argument("--dataset", required=True, metavar="{ml-100k,ml-1m-partial}",
                    help="which MovieLens random split (config: configs/deepfm_ml100k.yaml / deepfm_ml1m.yaml)")
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1, or from --seed-start)")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the config's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    ap.add_argument("--reuse-ours", action="store_true",
                    help="ablations that change only DeepCTR-Torch (--dnn-init torch, --deepctr-loss mean): take our "
                         "runs from the main entry of --out (same seeds and epochs; ours is deterministic on CPU)")
    ap.add_argument("--keep-existing", action="store_true",
                    help="keep the per-seed runs already stored under this entry of --out (same epochs and "
                         "hyper-parameters) and run only the missing seeds")
    ap.add_argument("--reuse-deepctr", action="store_true",
                    help="ablations that change only our side (--dnn-init normal): take DeepCTR-Torch's runs from "
                         "the main entry of --out (same seeds and epochs; deterministic on CPU)")
    ap.add_argument("--dnn-init", default="library", choices=["library", "torch", "normal"],
                    help="ablation, applied to BOTH libraries: 'library' = each library's default DNN init; "
                         "'torch' = torch's default Linear init (ours); 'normal' = hidden weights N(0, init_std) "
                         "(DeepCTR-Torch's)")
    ap.add_argument("--deepctr-loss", default="sum", choices=["sum", "mean"],
                    help="ablation: DeepCTR-Torch's fit() sums the batch loss ('sum', its default); 'mean' "
                         "makes it average, as ours does")
    ap.add_argument("--bench-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results, one entry per dataset (default: benchmarks/results/parity_deepfm.json)")
    ap.add_argument("--worker", choices=["ours", "deepctr"], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hp", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probs-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dataset not in DATASETS:
        print(f"parity_deepfm: error: unknown dataset '{args.dataset}' (choose {', '.join(DATASETS)})",
              file=sys.stderr)
        raise SystemExit(2)
    for name in ("seeds", "threads"):
        if getattr(args, name) < 1:
            print(f"parity_deepfm: error: --{name} must be >= 1", file=sys.stderr)
            raise SystemExit(2)
    if args.epochs is not None and args.epochs < 1:
        print("parity_deepfm: error: --epochs must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = WORK / args.dataset
    if args.worker:  # inside a subprocess: print one JSON line
        if args.worker == "ours":
            info = run_ours(args.dataset, args.seed, args.epochs, args.threads,
                            work / f"ours_seed{args.seed}_{os.getppid()}", args.probs_out, args.dnn_init,
                            json.loads(args.hp)["init_std"])
        else:
            info = run_deepctr(work, json.loads(args.hp), args.seed, args.epochs, args.threads, args.probs_out,
                               args.dnn_init, args.deepctr_loss)
        print(json.dumps(info))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    os.chdir(ROOT)  # ${METACTR_DATA} defaults to ../shared/datasets of the working directory
    from metactr.errors import MetactrError
    from metactr.train.run import load_dataset
    from metactr.utils import write_json_atomic

    if args.reuse_ours and args.dnn_init == "normal":
        raise SystemExit("error: --reuse-ours needs an ablation that leaves our model unchanged (not normal init)")
    if args.reuse_deepctr and (args.dnn_init == "torch" or args.deepctr_loss != "sum"):
        raise SystemExit("error: --reuse-deepctr needs an ablation that leaves DeepCTR-Torch unchanged")
    if args.reuse_ours and args.reuse_deepctr:
        raise SystemExit("error: give at most one of --reuse-ours / --reuse-deepctr")
    if not Path(args.bench_python).is_file():
        raise SystemExit(f"error: {args.bench_python} not found: run benchmarks/setup_bench_env.sh first")
    try:
        cfg = load_cfg(args.dataset, [])
        t0 = time.perf_counter()
        ds = load_dataset(cfg.data, ROOT / "runs" / "parity_deepfm")
    except MetactrError as exc:
        raise SystemExit(f"error: {exc}") from None
    epochs = args.epochs or cfg.epochs
    hp = hparams(cfg)
    feats = export_inputs(ds, work)
    prep_s = time.perf_counter() - t0
    labels = {s: ds.split(s).label.numpy().astype(np.float64) for s in ("valid", "test")}
    z = np.load(work / "deepctr_inputs.npz")
    expected = _checksum({k: z[k] for k in z.files})
    print(f"{args.dataset}: {ds.root} rows {feats['rows']} | epochs {epochs} | {hp}", flush=True)

    out = args.out or ROOT / "benchmarks" / "results" / "parity_deepfm.json"
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    runs: dict[str, list[dict]] = {"ours": [], "deepctr": []}
    libs = ["ours", "deepctr"]
    key = args.dataset  # ablations and other epoch budgets never replace the main entry
    if args.dnn_init != "library" or args.deepctr_loss != "sum":
        key += f" [ablation dnn_init={args.dnn_init} deepctr_loss={args.deepctr_loss}]"
    if epochs != cfg.epochs:
        key += f" [epochs={epochs}]"
    stored = json.loads(out.read_text()) if out.is_file() else {}
    kept: dict[str, dict[int, dict]] = {"ours": {}, "deepctr": {}}
    if args.keep_existing:  # add seeds to an entry: keep the runs it has (same settings), run the others
        entry = stored.get(key, {})
        if entry and (entry.get("epochs"), entry.get("hyperparameters")) == (epochs, hp):
            kept = {lib: {r["seed"]: r for r in entry["runs"][lib]} for lib in kept}
    reused = "ours" if args.reuse_ours else "deepctr" if args.reuse_deepctr else None
    if reused:
        main_entry = json.loads(out.read_text()).get(args.dataset, {}) if out.is_file() else {}
        by_seed = {r["seed"]: r for r in main_entry.get("runs", {}).get(reused, [])}
        if main_entry.get("epochs") != epochs or any(s not in by_seed for s in seeds):
            raise SystemExit(f"error: --reuse-{reused}: {out} has no '{args.dataset}' entry with {epochs} epochs "
                             f"and seeds {seeds}")
        runs[reused] = [by_seed[s] for s in seeds]
        libs = [lib for lib in libs if lib != reused]
    t_start = time.perf_counter()
    for seed in seeds:
        for lib in libs:
            if seed in kept[lib]:
                runs[lib].append(kept[lib][seed])
                print(f"seed {seed} {lib:8s} kept from {out.name}", flush=True)
                continue
            info, probs = _worker(lib, args, seed, work, hp, epochs)
            if lib == "deepctr" and info.pop("checksum") != expected:
                raise SystemExit("error: the DeepCTR worker saw different data than exported")
            per_epoch = _epoch_metrics(probs, labels, epochs)
            best = _best(per_epoch)
            if lib == "ours" and info["best_epoch"] != best["epoch"]:
                raise SystemExit(f"error: trainer's best epoch {info['best_epoch']} != {best['epoch']} recomputed")
            runs[lib].append({"seed": seed, "best": best, "per_epoch": per_epoch, **info})
            print(f"seed {seed} {lib:8s} best epoch {best['epoch']} valid AUC {best['valid_auc']:.4f} "
                  f"test AUC {best['test_auc']:.4f} LogLoss {best['test_logloss']:.4f} | test AUC by epoch "
                  + " ".join(f"{r['test_auc']:.4f}" for r in per_epoch)
                  + f" | {sum(info['train_time_s']):.1f}s training", flush=True)

    summary = _summary(runs, epochs)
    if summary:
        a, ll = summary["test_auc"], summary["test_logloss"]
        print(f"test AUC     ours {_fmt(a['ours'])}  DeepCTR-Torch {_fmt(a['deepctr'])}  "
              f"diff {a['diff_ours_minus_deepctr']['mean']:+.4f} ± {a['diff_ours_minus_deepctr']['ci95']:.4f}")
        print(f"test LogLoss ours {_fmt(ll['ours'])}  DeepCTR-Torch {_fmt(ll['deepctr'])}  "
              f"diff {ll['diff_ours_minus_deepctr']['mean']:+.4f} ± {ll['diff_ours_minus_deepctr']['ci95']:.4f}")
        ok = abs(a["diff_ours_minus_deepctr"]["mean"]) <= 0.005
        print(f"|mean AUC difference| <= 0.005: {'yes' if ok else 'NO'}")
    report = {
        "command": "python benchmarks/parity_deepfm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dataset": args.dataset, "config": str(DATASETS[args.dataset].relative_to(ROOT)),
        "prepared": str(ds.root), "rows": feats["rows"], "features": {"sparse": feats["sparse"],
                                                                      "varlen": feats["varlen"]},
        "hyperparameters": hp, "epochs": epochs,
        "dnn_init": args.dnn_init, "deepctr_loss_reduction": args.deepctr_loss,
        "epoch_rule": "each library's first best validation-AUC epoch; test metrics at that epoch",
        "seeds": seeds, "threads": args.threads, "reused_from_main_entry": reused,
        "machine": machine(affinity_cpus=sorted(os.sched_getaffinity(0))),
        "wall_s": {"prepare_export": prep_s, "runs": time.perf_counter() - t_start},
        "summary": summary, "runs": runs,
    }
    merged = json.loads(out.read_text()) if out.is_file() else {}  # one file: replace only this entry
    merged[key] = report
    write_json_atomic(out, {k: merged[k] for k in sorted(merged)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
