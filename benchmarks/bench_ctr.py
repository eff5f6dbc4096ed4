"""DeepFM and DIN: our trainer vs DeepCTR-Torch on identical synthetic data, in one run.

    bash benchmarks/setup_bench_env.sh            # once: .bench-venv with torch 2.13 CPU + deepctr-torch
    .venv/bin/python benchmarks/bench_ctr.py      # 1M rows, both models, both libraries

Data (generated once, cached in ``runs/bench_ctr_data``; seeded): 1M training + 200k test rows
shaped like ML-1M: 7 sparse fields (user_id 6040, gender 2, age 7, occupation 21, zip 3439 |
item_id 3706, genre 18) and a 10-item history (item_id + genre of each, 1-10 valid items), labels
from a known logistic model (user/item biases, user-item affinity, history-target affinity).
Both libraries see the same features: DeepFM the 7 fields + the mean-pooled history (item_id,
genre; embeddings shared with the target's, as DeepCTR's ``embedding_name``), DIN the 7 fields +
target attention over the history. Embedding 16, DNN (256, 128), Adam lr 1e-3, batch 1024, one
epoch, 2 threads, no regularisation (DeepCTR's default embedding L2 set to 0 to do the same work).
DIN: attention MLP (64, 16) with Dice, unnormalised weights, ReLU DNN (DeepCTR's defaults).

Each measurement runs in its own process (so peak RSS is per library and model): ours in the
project venv, DeepCTR-Torch in ``.bench-venv``. Training throughput = rows / wall time of one
epoch (shuffled); prediction throughput = test rows / best wall time of 3 passes predicting the
test set with batch 1024 (one pass is well under a second: a scheduling hiccup halves it); AUC on the test set after that epoch. Both workers run with ``OMP_WAIT_POLICY=PASSIVE``
(``--omp-wait-policy``) so that a busy machine does not make spinning OpenMP threads stall. Results: printed, and written to
``benchmarks/results/bench_ctr.json``.

``--precision bf16`` (default ``fp32``; or per model, ``deepfm=bf16,din=fp32``) runs our side under
bfloat16 autocast (``metactr.engine.precision``); DeepCTR-Torch has no mixed precision and runs
fp32. The report records each side's precision.

Each DeepFM round also measures the ``limit`` row (``run_limit``, skipped with ``--no-limit``): the
bare MLP forward + backward at DeepFM's MLP shapes (144 -> 256 -> 128 -> 1, batch 1024, same threads
and precision, best of 3 blocks of 200 steps), and the report gives our DeepFM training as a
fraction of it. The JSON's ``machine`` block (``benchmarks/machine.py``) names the host.

``--device cuda`` (default ``cpu``) runs both libraries on the GPU: our model and batches on the
device (the one ``Trainer``'s loop, plain strategy), DeepCTR-Torch with ``device='cuda:0'``; the clocks stop
after ``torch.cuda.synchronize()``, and each worker also reports its peak GPU memory. A
``PYTHONPATH`` set by the caller is passed on to both workers (after ``src`` for ours), e.g. a
folder of extra packages on a machine without the venvs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from machine import describe, machine  # benchmarks/machine.py: the host of every figure

ROOT = Path(__file__).resolve().parent.parent
USER_FIELDS = {"gender": 2, "age": 7, "occupation": 21, "zip": 3439}
N_USERS, N_ITEMS, N_GENRES, HIST = 6040, 3706, 18, 10
EMBED, DNN, BATCH, LR = 16, (256, 128), 1024, 1e-3
DIN_ATT = (64, 16)


# ----------------------------------------------------------------------------- data
def generate(out: Path, rows: int, test_rows: int, seed: int = 0) -> None:
    """Write the prepared layout (ours) and per-row arrays (DeepCTR) of one synthetic sample."""
    import polars as pl

    rng = np.random.default_rng(seed)
    k = 8
    user_vec = rng.normal(size=(N_USERS + 1, k)) * 0.6
    item_vec = rng.normal(size=(N_ITEMS + 1, k)) * 0.6
    user_bias = rng.normal(size=N_USERS + 1) * 0.5
    item_pop = rng.zipf(1.3, size=N_ITEMS + 1).clip(1, 10_000).astype(np.float64)
    item_p = item_pop[1:] / item_pop[1:].sum()
    item_bias = rng.normal(size=N_ITEMS + 1) * 0.8
    users = {name: rng.integers(1, v + 1, N_USERS + 1) for name, v in USER_FIELDS.items()}
    genre = rng.integers(1, N_GENRES + 1, N_ITEMS + 1)
    out.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"user_id": np.arange(1, N_USERS + 1), **{n: v[1:] for n, v in users.items()}}
                 ).write_parquet(out / "users.parquet")
    pl.DataFrame({"item_id": np.arange(1, N_ITEMS + 1), "genre": genre[1:]}).write_parquet(out / "items.parquet")
    arrays = {}
    for split, n in (("train", rows), ("test", test_rows)):
        uid = rng.integers(1, N_USERS + 1, n)
        iid = rng.choice(np.arange(1, N_ITEMS + 1), size=n, p=item_p)
        hlen = rng.integers(1, HIST + 1, n)
        hist = rng.choice(np.arange(1, N_ITEMS + 1), size=(n, HIST), p=item_p)
        hist[np.arange(HIST)[None, :] >= hlen[:, None]] = 0
        valid = hist > 0
        hmean = (item_vec[hist] * valid[..., None]).sum(1) / hlen[:, None]
        logit = (user_bias[uid] + item_bias[iid] + (user_vec[uid] * item_vec[iid]).sum(1)
                 + 1.5 * (hmean * item_vec[iid]).sum(1) - 0.3)
        label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(hlen)])
        flat = hist[valid]
        pl.DataFrame({
            "user_id": uid, "target_item_id": iid, "label": label,
            "hist_item_ids": _split_lists(flat, offsets),
            "hist_labels": _split_lists(np.ones_like(flat), offsets),
        }).write_parquet(out / f"{split}.parquet")
        arrays[split] = {"user_id": uid, **{n: v[uid] for n, v in users.items()}, "item_id": iid,
                         "genre": genre[iid], "hist_item_id": hist, "hist_genre": genre[hist] * valid,
                         "seq_length": hlen, "label": label}
    np.savez(out / "arrays.npz", **{f"{s}/{k}": v for s, d in arrays.items() for k, v in d.items()})
    (out / "meta.json").write_text(json.dumps({"max_hist_len": HIST, "rows": rows, "test_rows": test_rows,
                                               "seed": seed}))


def _split_lists(flat: np.ndarray, offsets: np.ndarray):
    import polars as pl

    lens = np.diff(offsets)
    return pl.Series("x", flat).to_frame().with_columns(
        pl.Series("g", np.repeat(np.arange(lens.size), lens))).group_by("g", maintain_order=True
                                                                           ).agg(pl.col("x"))["x"]


def _peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork+exec, so a worker would report its parent's peak (the data generation) as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- our worker
def model_hparams(model_name: str) -> dict:
    """Our model's hyper-parameters, matching DeepCTR-Torch's set-up below (also used by ab_step.py)."""
    hp = {"embed_dim": EMBED, "hidden": DNN}
    if model_name == "din":
        hp.update(activation="relu", att_hidden=DIN_ATT, att_activation="dice", attention_mode="weights")
    return hp


STEP_DATA = ROOT / "runs" / "bench_ctr_data_1000000_200000_0"  # written by this script's first run


def step_parser(doc: str) -> argparse.ArgumentParser:
    """The options ab_step.py and profile_step.py share: --data (this script's log), --model, --threads."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--data", type=Path, default=STEP_DATA)
    ap.add_argument("--model", default="deepfm", choices=["deepfm", "din"])
    ap.add_argument("--threads", type=int, default=2)
    return ap


def step_setup(data: Path, model_name: str, split_name: str):
    """(dataset, split, model, Adam at 1e-3) as this benchmark builds them, seeded 0: the start of
    ab_step.py and profile_step.py. The allocator is set as the Trainer sets it
    (``metactr.engine.host``; ``METACTR_MALLOC_RETAIN=0`` leaves it alone)."""
    import torch

    from metactr.engine.host import retain_freed_memory

    retain_freed_memory()

    from metactr.data.prepared import PreparedDataset
    from metactr.engine.optim import build_optimizer
    from metactr.models.base import build_model
    from metactr.train.config import OptimConfig

    if not data.is_dir():
        raise SystemExit(f"{data} not found: run benchmarks/bench_ctr.py once (or pass --data)")
    ds = PreparedDataset(data)
    torch.manual_seed(0)
    model = build_model(model_name, ds.spec, **model_hparams(model_name))
    opt = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-3))
    return ds, ds.split(split_name), model, opt


def run_ours(model_name: str, data: Path, threads: int, seed: int, device: str = "cpu",
             precision: str = "fp32") -> dict:
    import torch

    torch.set_num_threads(threads)
    from metactr.data.prepared import PreparedDataset
    from metactr.eval.metrics import auc
    from metactr.eval.predict import predict_proba
    from metactr.models.base import build_model
    from metactr.train.config import OptimConfig
    from metactr.strategies.plain import Plain
    from metactr.train.trainer import Trainer

    torch.manual_seed(seed)
    dev = torch.device(device)
    ds = PreparedDataset(data)
    train, test = ds.split("train"), ds.split("test")
    model = build_model(model_name, ds.spec, **model_hparams(model_name)).to(dev)
    gen = torch.Generator().manual_seed(seed)
    # The first torch.optim optimizer of a process imports torch._dynamo (1.7 s here): start-up, paid
    # once per process, reported apart. DeepCTR-Torch's worker builds its Adam before its clock too.
    t_start = time.perf_counter()
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    startup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    fitted = Trainer(device=dev, precision=precision).fit(model, ds, train, Plain(optim=OptimConfig(name="adam", lr=LR)),
                                                          epochs=1, batch_size=BATCH, generator=gen)
    rows = len(train)
    loss_sum = fitted.history[0]["train_loss"] * rows
    _sync(dev)
    train_s = time.perf_counter() - t0
    prob, pred_s = _best_of(lambda: predict_proba(model, ds, test, batch_size=BATCH, precision=precision), dev)
    return {**_device_facts(dev), "precision": precision,
            "train_samples_per_s": rows / train_s, "train_s": train_s, "startup_s": startup_s,
            "predict_samples_per_s": len(test) / pred_s, "predict_s": pred_s,
            "test_auc": auc(test.label.numpy(), prob), "train_loss": loss_sum / rows,
            "n_params": sum(p.numel() for p in model.parameters()), "peak_rss_mb": _peak_rss_mb(),
            **_our_settings()}


def _our_settings() -> dict:
    """What our side ran with: the compiled lookup kernel (or why not), the allocator setting."""
    from metactr.engine import host
    from metactr.models import native

    return {"native_kernel": native.library() is not None, "native_note": native.load_error,
            "malloc_retain": host.retain_freed_memory()}  # (applied once by the Trainer: this reads it)


# ----------------------------------------------------------------------------- the limit
LIMIT_SHAPES = (9 * EMBED, *DNN, 1)  # DeepFM's MLP: 7 fields + 2 pooled histories = 9 x 16 = 144 -> 256 -> 128 -> 1


def run_limit(model_name: str, data: Path, threads: int, seed: int, device: str = "cpu",
              precision: str = "fp32", steps: int = 200) -> dict:
    """The bare MLP forward + backward at DeepFM's MLP shapes (``LIMIT_SHAPES``, batch ``BATCH``): no
    embeddings, no optimizer, no data loading. What DeepFM's training step cannot beat on this host."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "src"))
    from metactr.engine.precision import autocast

    from metactr.engine.host import retain_freed_memory

    if torch.device(device).type == "cpu":
        retain_freed_memory()  # the best this host allows: the allocator as our Trainer sets it
    torch.manual_seed(seed)
    dev = torch.device(device)
    dims = LIMIT_SHAPES
    layers: list = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    mlp = torch.nn.Sequential(*layers[:-1]).to(dev)
    # DeepFM's MLP input is its embeddings: the step must compute the input's gradient too (the
    # FLOP count below, 4ab per layer backward, includes it), so the limit does the same
    x = torch.randn(BATCH, dims[0], device=dev, requires_grad=True)
    y = torch.randint(0, 2, (BATCH, 1), device=dev).float()

    def step():
        with autocast(dev, precision):
            out = mlp(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        loss.backward()

    for _ in range(20):
        step()
    _sync(dev)
    best = float("inf")
    for _ in range(3):  # best of 3 blocks: the limit is what the host allows, not what a hiccup left
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    flop = 6 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))  # fwd 2ab, bwd 4ab per sample
    return {"device": str(dev), "precision": precision, "shapes": list(dims), "batch": BATCH,
            "train_samples_per_s": steps * BATCH / best, "step_ms": best / steps * 1e3,
            "gflop_per_s": flop * steps * BATCH / best / 1e9, "flop_per_sample": flop}


# ----------------------------------------------------------------------------- DeepCTR-Torch worker
def run_deepctr(model_name: str, data: Path, threads: int, seed: int, device: str = "cpu",
                precision: str = "fp32") -> dict:  # DeepCTR-Torch has no mixed precision: always fp32
    import torch

    torch.set_num_threads(threads)
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN, DeepFM
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(seed)
    dev = torch.device(device)
    dc_device = f"cuda:{dev.index or 0}" if dev.type == "cuda" else "cpu"  # DeepCTR compares strings
    z = np.load(data / "arrays.npz")
    split = {s: {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(s + "/")} for s in ("train", "test")}
    vocab = {"user_id": N_USERS + 1, **{n: v + 1 for n, v in USER_FIELDS.items()}, "item_id": N_ITEMS + 1,
             "genre": N_GENRES + 1}
    sparse = [SparseFeat(n, v, embedding_dim=EMBED) for n, v in vocab.items()]
    hist = [VarLenSparseFeat(SparseFeat("hist_item_id", vocab["item_id"], embedding_dim=EMBED, embedding_name="item_id"),
                             maxlen=HIST, combiner="mean", length_name="seq_length"),
            VarLenSparseFeat(SparseFeat("hist_genre", vocab["genre"], embedding_dim=EMBED, embedding_name="genre"),
                             maxlen=HIST, combiner="mean", length_name="seq_length")]
    cols = sparse + hist
    if model_name == "deepfm":
        model = DeepFM(cols, cols, dnn_hidden_units=DNN, l2_reg_linear=0.0, l2_reg_embedding=0.0, l2_reg_dnn=0.0,
                       dnn_dropout=0.0, init_std=1e-4, seed=seed, task="binary", device=dc_device)
    else:
        model = DIN(cols, ["item_id", "genre"], dnn_hidden_units=DNN, dnn_activation="relu",
                    att_hidden_size=DIN_ATT, att_activation="Dice", att_weight_normalization=False,
                    l2_reg_dnn=0.0, l2_reg_embedding=0.0, dnn_dropout=0.0, init_std=1e-4, seed=seed,
                    task="binary", device=dc_device)
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy", metrics=[])
    names = [*vocab, "hist_item_id", "hist_genre", "seq_length"]
    x_train = {n: split["train"][n] for n in names}
    x_test = {n: split["test"][n] for n in names}
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # DeepCTR prints; stdout carries our JSON line
        model.fit(x_train, split["train"]["label"].astype(np.float32), batch_size=BATCH, epochs=1, verbose=0,
                  shuffle=True)
    _sync(dev)
    train_s = time.perf_counter() - t0
    n_test = len(split["test"]["label"])
    prob, pred_s = _best_of(lambda: model.predict(x_test, batch_size=BATCH), dev)
    n = len(split["train"]["label"])
    return {**_device_facts(dev), "precision": "fp32", "train_samples_per_s": n / train_s, "train_s": train_s,
            "predict_samples_per_s": n_test / pred_s, "predict_s": pred_s,
            "test_auc": float(roc_auc_score(split["test"]["label"], prob.reshape(-1))),
            "n_params": sum(p.numel() for p in model.parameters()), "peak_rss_mb": _peak_rss_mb()}


def _best_of(fn, dev, reps: int = 3):
    """(result, best wall time) of ``reps`` calls: one pass over 200k test rows takes well under
    a second, so a single pass is at the mercy of this machine's scheduling hiccups."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return out, best


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _device_facts(dev) -> dict:
    """The device a worker ran on and, on a GPU, its peak allocated memory."""
    import torch

    if dev.type != "cuda":
        return {"device": "cpu"}
    return {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20}


# ----------------------------------------------------------------------------- orchestration
def _median_run(runs: list[dict]) -> dict:
    """The run with the median training throughput (all of a run's numbers stay together)."""
    return sorted(runs, key=lambda r: r["train_samples_per_s"])[len(runs) // 2]


def _precision_by_model(text: str, models: list[str]) -> dict[str, str]:
    """``fp32`` / ``bf16`` for every model, or ``deepfm=bf16,din=fp32`` (unnamed models: fp32)."""
    if "=" not in text:
        out = dict.fromkeys(models, text)
    else:
        out = dict.fromkeys(models, "fp32")
        for part in text.split(","):
            name, _, value = part.partition("=")
            if name.strip() not in out:
                raise SystemExit(f"--precision: unknown model '{name.strip()}' (running {', '.join(models)})")
            out[name.strip()] = value.strip()
    sys.path.insert(0, str(ROOT / "src"))  # the orchestrator runs in the project venv
    from metactr.engine.precision import PRECISIONS

    bad = sorted({v for v in out.values() if v not in PRECISIONS})
    if bad:
        raise SystemExit(f"--precision: {', '.join(bad)} is not one of {', '.join(PRECISIONS)}")
    return out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _worker(lib: str, model: str, data: Path, threads: int, seed: int, bench_python: str,
            wait_policy: str | None, device: str = "cpu", precision: str = "fp32") -> dict:
    py = bench_python if lib == "deepctr" else sys.executable
    inherited = os.environ.get("PYTHONPATH", "")
    ours_path = os.pathsep.join(p for p in (str(ROOT / "src"), inherited) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=inherited if lib == "deepctr" else ours_path)
    if wait_policy:  # same for both libraries; must be set before torch starts its OpenMP pool
        env["OMP_WAIT_POLICY"] = wait_policy
    cmd = [py, str(Path(__file__).resolve()), "--worker", lib, "--models", model, "--data-dir", str(data),
           "--threads", str(threads), "--seed", str(seed), "--device", device, "--precision", precision]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{lib}/{model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--test-rows", type=int, default=200_000)
    ap.add_argument("--models", nargs="+", default=["deepfm", "din"], choices=["deepfm", "din"])
    ap.add_argument("--libs", nargs="+", default=["ours", "deepctr"], choices=["ours", "deepctr"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--bench-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_ctr.json")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", ""],
                    help="OMP_WAIT_POLICY for both libraries ('' = leave unset). PASSIVE: idle OpenMP threads "
                         "sleep instead of spinning, which keeps 2-thread runs from collapsing when other "
                         "processes share the cores (10-30x slower steps otherwise, measured).")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default), cuda or cuda:N: where both libraries train and predict")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each model this many times, the two libraries alternating in each round "
                         "(ours first, then theirs first, ...); ratios = median of the per-round ratios")
    ap.add_argument("--precision", default="fp32",
                    help="our library's precision: fp32 (default) or bf16 for every model, or per model, "
                         "e.g. deepfm=bf16,din=fp32 (metactr.engine.precision; DeepCTR-Torch always runs fp32)")
    ap.add_argument("--no-limit", action="store_true",
                    help="skip the `limit` row (the bare MLP forward + backward at DeepFM's MLP shapes, "
                         "measured once per round in the same run)")
    ap.add_argument("--worker", choices=["ours", "deepctr", "limit"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # inside a measuring subprocess: print one JSON line
        fn = {"ours": run_ours, "deepctr": run_deepctr, "limit": run_limit}[args.worker]
        print(json.dumps(fn(args.models[0], args.data_dir, args.threads, args.seed, args.device, args.precision)))
        return 0
    precision = _precision_by_model(args.precision, args.models)

    data = args.data_dir or ROOT / "runs" / f"bench_ctr_data_{args.rows}_{args.test_rows}_{args.seed}"
    if not (data / "arrays.npz").is_file():
        t0 = time.perf_counter()
        generate(data, args.rows, args.test_rows, args.seed)
        print(f"generated {args.rows:,} + {args.test_rows:,} rows in {time.perf_counter() - t0:.1f}s -> {data}")
    if "deepctr" in args.libs and not Path(args.bench_python).is_file():
        raise SystemExit(f"{args.bench_python} not found: run benchmarks/setup_bench_env.sh first")

    load_before = _load()
    mach = machine()
    print(f"host: {describe(mach)}", flush=True)
    results: dict[str, dict[str, dict]] = {}
    rounds: dict[str, list[dict[str, dict]]] = {}
    limits: list[dict] = []
    for model in args.models:
        for rep in range(args.repeat):
            # alternate who goes first: a drift of the machine's speed then hits both libraries
            libs = args.libs if rep % 2 == 0 else args.libs[::-1]
            rounds.setdefault(model, []).append({})
            for lib in libs:
                r = _worker(lib, model, data, args.threads, args.seed, args.bench_python, args.omp_wait_policy,
                            args.device, precision[model])
                rounds[model][-1][lib] = r
                print(f"{model:7s} {lib:8s} train {r['train_samples_per_s']:>10,.0f}/s  predict "
                      f"{r['predict_samples_per_s']:>10,.0f}/s  AUC {r['test_auc']:.4f}  peak RSS "
                      f"{r['peak_rss_mb']:,.0f} MB", flush=True)
            if model == "deepfm" and not args.no_limit and args.device == "cpu":
                lim = _worker("limit", model, data, args.threads, args.seed, args.bench_python,
                              args.omp_wait_policy, args.device, precision[model])
                limits.append(lim)
                rounds[model][-1]["limit"] = lim
                print(f"{'limit':7s} {'MLP':8s} fwd+bwd {lim['train_samples_per_s']:>10,.0f}/s  "
                      f"({lim['gflop_per_s']:.1f} GFLOP/s, {lim['step_ms']:.2f} ms/step at {BATCH})", flush=True)
        results[model] = {lib: _median_run([rd[lib] for rd in rounds[model]]) for lib in args.libs}
    ratios = {}
    for model, rds in rounds.items():
        if "ours" in args.libs and "deepctr" in args.libs:
            per_round = [{"train_speedup": rd["ours"]["train_samples_per_s"] / rd["deepctr"]["train_samples_per_s"],
                          "predict_speedup": rd["ours"]["predict_samples_per_s"] / rd["deepctr"]["predict_samples_per_s"],
                          "auc_diff": rd["ours"]["test_auc"] - rd["deepctr"]["test_auc"],
                          "rss_ratio": rd["ours"]["peak_rss_mb"] / rd["deepctr"]["peak_rss_mb"]} for rd in rds]
            for x, rd in zip(per_round, rds):
                if "limit" in rd:
                    x["ours_train_fraction_of_limit"] = (rd["ours"]["train_samples_per_s"]
                                                         / rd["limit"]["train_samples_per_s"])
            ratios[model] = {k: statistics.median(x[k] for x in per_round) for k in per_round[0]}
            ratios[model]["rounds"] = per_round
            x = ratios[model]
            print(f"{model:7s} ours/DeepCTR-Torch: training {x['train_speedup']:.2f}x (target >= 3), "
                  f"prediction {x['predict_speedup']:.2f}x (target >= 4), AUC {x['auc_diff']:+.4f} "
                  f"(target >= 0), peak RSS {x['rss_ratio']:.2f}x"
                  + (f" [ours in {precision[model]}]" if precision[model] != "fp32" else "")
                  + (f"  [median of {len(per_round)} rounds; training "
                     + ", ".join(f"{r['train_speedup']:.2f}" for r in per_round) + "; prediction "
                     + ", ".join(f"{r['predict_speedup']:.2f}" for r in per_round) + "]" if len(per_round) > 1 else ""))
            if "ours_train_fraction_of_limit" in x:
                print(f"{model:7s} ours training = {x['ours_train_fraction_of_limit']:.0%} of the limit row "
                      "(target >= 60%; median of per-round fractions)")
    report = {
        "command": "python benchmarks/bench_ctr.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows, "test_rows": args.test_rows, "threads": args.threads, "device": args.device,
        "batch_size": BATCH, "repeat": args.repeat, "precision_ours": precision,
        "embed_dim": EMBED, "dnn": DNN, "seed": args.seed, "omp_wait_policy": args.omp_wait_policy or None,
        "machine": {**mach, "load_avg_before": load_before, "load_avg_after": _load()},
        "results": results, "ratios": ratios, "limit": limits,
    }
    sys.path.insert(0, str(ROOT / "src"))
    from metactr.utils import write_json_atomic

    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
