"""The CUDA paths checked against CPU: trainer (DeepFM, DIN), checkpoints, resume, the meta
engine (vmap MAML, task-local tables, meta-test adaptation), FTRL and fused Adam, DDP over NCCL.

Every test is skipped when ``torch.cuda.is_available()`` is False (CI has no GPU).
``METACTR_TEST_DEVICE=cpu`` runs the same comparisons CPU against CPU: a dry run of this file's
code on a machine without a GPU (the GPU-only checks are then skipped).

Tolerances. Bitwise equality is not expected: cuBLAS/cuDNN sum in another order and embedding
backward uses atomics. float64 (meta engine, FTRL): 1e-6 absolute+relative, far above
double rounding. float32 training (14 Adam steps on tiny data): train losses within 1e-4
relative, predicted probabilities within 1e-3 absolute, test AUC within 0.01 (on CPU, perturbing
the initial weights by 1e-6 relative moved the final probabilities by at most 4e-7; the margin is
for Adam, which divides by sqrt(v), so a gradient that is all rounding noise can still move its
weight by up to lr per step). float32 one-shot ops (forward, checkpoint reload): 1e-5;
float32 meta-gradient: 1e-4.
"""

from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pytest
import torch

from metactr.data.prepared import PreparedDataset
from metactr.eval.predict import predict_proba
from metactr.engine.functional import MetaSGDRates, adapt_and_predict, live_params, maml_outer_loss
from metactr.models.base import build_model
from metactr.train import checkpoint as ckpt
from metactr.train.config import OptimConfig
from metactr.engine.optim import FTRL, build_optimizer
from metactr.engine.device import resolve_device
from metactr.strategies.base import Context
from metactr.strategies.plain import Plain, has_unused_parameters
from metactr.train.run import fit
from metactr.train.trainer import run_epoch
from test_local_tables import T as LT_TASKS
from test_local_tables import make_batch, tiny, tiny_selector, used_params
from test_meta_engine import random_batch, tiny_model
from test_trainer import config, make_prepared

DEVICE = torch.device(os.environ.get("METACTR_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    ON_GPU and not torch.cuda.is_available(),
    reason="CUDA is not available: these tests compare the GPU paths against CPU "
           "(METACTR_TEST_DEVICE=cpu dry-runs them CPU against CPU)")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="checks a CUDA-only behaviour")


def grads_of(model, loss, extra=()) -> dict[str, torch.Tensor]:
    """Meta-gradient of ``loss`` w.r.t. every parameter (zeros where unused), on CPU."""
    named = [*live_params(model).items(), *((f"rate{i}", r) for i, r in enumerate(extra))]
    gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g).cpu() for (n, p), g in zip(named, gs, strict=True)}


def assert_dicts_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=tol, rtol=tol, msg=lambda m, n=n: f"{n}: {m}")


# --------------------------------------------------------------------------- trainer
HP = {"deepfm": {"embed_dim": 8, "hidden": [16, 8], "emb_init_std": 0.05},
      "din": {"embed_dim": 8, "hidden": [16, 8], "att_hidden": [8, 4], "emb_init_std": 0.05}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("cuda_prep") / "tiny")


def _fit(data_dir, out, name: str, device: torch.device, epochs: int = 2, resume: bool = False, **kw):
    cfg = config(data_dir, out, model__name=name, model__params={**HP[name], **kw.pop("params", {})},
                 epochs=epochs, optim={"name": "adam", "lr": 0.01}, **kw)
    ds = PreparedDataset(data_dir)
    torch.manual_seed(cfg.seed)  # same initial weights: built on CPU, then moved by fit
    model = build_model(name, ds.spec, **cfg.model.params)
    res = fit(model, ds, cfg, run_dir=out, resume=resume, device=device, log=lambda s: None)
    return res, model, ds


@pytest.fixture(scope="module", params=["deepfm", "din"])
def trained(request, data_dir, tmp_path_factory):
    """The same 2-epoch run of one model on CPU and on DEVICE."""
    root = tmp_path_factory.mktemp(f"cuda_fit_{request.param}")
    cpu = _fit(data_dir, root / "cpu", request.param, CPU)
    dev = _fit(data_dir, root / "dev", request.param, DEVICE)
    return request.param, cpu, dev, root


def test_resolve_device_gives_the_requested_device():
    assert resolve_device(str(DEVICE)).type == DEVICE.type
    if ON_GPU:
        assert resolve_device("auto").type == "cuda"


def test_fit_on_device_matches_cpu(trained):
    name, (res_c, model_c, ds), (res_d, model_d, _), root = trained
    assert all(p.device.type == DEVICE.type for p in model_d.parameters())
    hist_c = [r["train_loss"] for r in history(root / "cpu")]
    hist_d = [r["train_loss"] for r in history(root / "dev")]
    assert len(hist_c) == len(hist_d) == 2 and hist_d[1] < hist_d[0]  # it trained
    np.testing.assert_allclose(hist_d, hist_c, rtol=1e-4)
    prob_c, prob_d = predict_proba(model_c, ds, "test"), predict_proba(model_d, ds, "test")
    moved = np.abs(prob_c - 0.5).max()
    assert moved > 0.02, f"{name}: predictions barely left 0.5, the comparison would be empty"
    np.testing.assert_allclose(prob_d, prob_c, atol=1e-3, rtol=0)
    assert abs(res_d["metrics"]["test"]["auc"] - res_c["metrics"]["test"]["auc"]) < 0.01
    assert res_d["metrics"]["test"]["auc"] > 0.6


@pytest.mark.parametrize("name", ["deepfm", "din"])
def test_bf16_fit_on_device_is_close_to_cpu_bf16(data_dir, tmp_path, name):
    """``precision: bf16`` (autocast) on the device trains as on CPU: the same loss curve to
    bf16's rounding, float32 weights, and predictions made in bf16 on the device."""
    res_c, model_c, ds = _fit(data_dir, tmp_path / "cpu", name, CPU, precision="bf16")
    res_d, model_d, _ = _fit(data_dir, tmp_path / "dev", name, DEVICE, precision="bf16")
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE.type for p in model_d.parameters())
    hist_c = [r["train_loss"] for r in history(tmp_path / "cpu")]
    hist_d = [r["train_loss"] for r in history(tmp_path / "dev")]
    assert hist_d[1] < hist_d[0]
    np.testing.assert_allclose(hist_d, hist_c, rtol=2e-2)
    prob_d = predict_proba(model_d, ds, "test", precision="bf16")
    assert np.isfinite(prob_d).all() and np.abs(prob_d - 0.5).max() > 0.02
    np.testing.assert_allclose(prob_d, predict_proba(model_c, ds, "test", precision="bf16"), atol=3e-2, rtol=0)
    assert abs(res_d["metrics"]["test"]["auc"] - res_c["metrics"]["test"]["auc"]) < 0.03


def history(run_dir) -> list[dict]:
    import json

    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_forward_on_device_matches_cpu(data_dir):
    ds = PreparedDataset(data_dir)
    for name in HP:
        torch.manual_seed(0)
        model = build_model(name, ds.spec, **HP[name])
        on_dev = copy.deepcopy(model).to(DEVICE)
        np.testing.assert_allclose(predict_proba(on_dev, ds, "valid"), predict_proba(model, ds, "valid"),
                                   atol=1e-5, rtol=0, err_msg=name)


def test_device_checkpoint_loads_on_cpu_with_equal_predictions(trained):
    name, _, (res_d, model_d, ds), root = trained
    loaded, meta = ckpt.load_model(root / "dev" / "best.safetensors", device="cpu")
    assert meta["model"] == name
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    for (k, a), b in zip(model_d.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), f"{k}: weights changed in the round trip"
    np.testing.assert_allclose(predict_proba(loaded, ds, "test"), predict_proba(model_d, ds, "test"),
                               atol=1e-5, rtol=0)
    # and a CPU checkpoint loads onto the device
    back, _ = ckpt.load_model(root / "cpu" / "best", device=DEVICE)
    assert all(p.device.type == DEVICE.type for p in back.parameters())


def test_resume_on_device_continues_the_run(data_dir, tmp_path):
    """Adam (fused on CUDA) state saved from the device and restored onto it."""
    _, full, ds = _fit(data_dir, tmp_path / "full", "deepfm", DEVICE, epochs=3)
    _fit(data_dir, tmp_path / "cut", "deepfm", DEVICE, epochs=1)
    res, resumed, _ = _fit(data_dir, tmp_path / "cut", "deepfm", DEVICE, epochs=3, resume=True)
    assert res["epochs_run"] == 3
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@gpu_only
def test_resume_on_device_with_dropout_equals_uninterrupted(data_dir, tmp_path):
    kw = {"params": {"dropout": 0.3}}
    _, full, _ = _fit(data_dir, tmp_path / "full", "deepfm", DEVICE, epochs=2, **kw)
    _fit(data_dir, tmp_path / "cut", "deepfm", DEVICE, epochs=1, **kw)
    _, resumed, _ = _fit(data_dir, tmp_path / "cut", "deepfm", DEVICE, epochs=2, resume=True, **kw)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- meta engine
def _to(batch, device, dtype=None):
    b = batch.to(device)
    if dtype is not None:
        b = b._replace(label=b.label.to(dtype), hist_label=b.hist_label.to(dtype))
    return b


def _meta_grads_both(model, names_of, sup, qry, sw, qw, *, dtype=torch.float64, rates_init=None, **kw):
    """The meta-gradient of maml_outer_loss on CPU and on DEVICE (same weights, same tasks)."""
    out = []
    for dev in (CPU, DEVICE):
        m = copy.deepcopy(model).to(device=dev, dtype=dtype)
        names = names_of(m)
        rates = MetaSGDRates(live_params(m), names, rates_init).to(dev, dtype) if rates_init else None
        loss = maml_outer_loss(m, live_params(m), _to(sup, dev, dtype), _to(qry, dev, dtype), names=names,
                               lr=rates.as_dict() if rates else 0.4, support_weight=sw.to(dev, dtype),
                               query_weight=qw.to(dev, dtype), **kw)
        assert loss.device.type == dev.type
        out.append(grads_of(m, loss, list(rates.rates) if rates else ()))
    return out


@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("vectorize", [True, False])
def test_maml_meta_gradient_on_device_matches_cpu(steps, first_order, vectorize):
    g = torch.Generator().manual_seed(1)
    sup, qry = random_batch((4, 5), g), random_batch((4, 3), g)
    sw, qw = torch.ones(4, 5), torch.ones(4, 3)
    sw[0, 3:] = 0
    g_cpu, g_dev = _meta_grads_both(tiny_model(), lambda m: m.params_in("mlp"), sup, qry, sw, qw,
                                    steps=steps, first_order=first_order, vectorize=vectorize)
    assert any(v.abs().max() > 0 for v in g_cpu.values())
    assert_dicts_close(g_dev, g_cpu, 1e-6)


@pytest.mark.parametrize("name", ["deepfm", "din"])
@pytest.mark.parametrize("local_tables", [True, False])
def test_local_table_meta_gradient_on_device_matches_cpu(name, local_tables):
    """Every used parameter adapted, embedding tables included: task-local tables on the device."""
    sup, qry = make_batch((LT_TASKS, 4), 1), make_batch((LT_TASKS, 3), 2)
    sw, qw = torch.ones(LT_TASKS, 4), torch.ones(LT_TASKS, 3)
    sw[0, 2:] = 0
    model = tiny(name)
    names = used_params(model, sup)
    g_cpu, g_dev = _meta_grads_both(model, lambda m: names, sup, qry, sw, qw, steps=2,
                                    local_tables=local_tables)
    assert g_cpu["embedding.weight"].abs().max() > 0  # the tables' meta-gradient is compared too
    assert_dicts_close(g_dev, g_cpu, 1e-6)


def test_metaselector_meta_sgd_local_tables_on_device_matches_cpu():
    sup, qry = make_batch((LT_TASKS, 4), 1), make_batch((LT_TASKS, 3), 2)
    sw, qw = torch.ones(LT_TASKS, 4), torch.ones(LT_TASKS, 3)
    model = tiny_selector()
    g_cpu, g_dev = _meta_grads_both(model, lambda m: list(live_params(m)), sup, qry, sw, qw, steps=2,
                                    rates_init=0.3, local_tables=True)
    assert_dicts_close(g_dev, g_cpu, 1e-6)


def test_float32_meta_gradient_on_device_matches_cpu():
    sup, qry = make_batch((LT_TASKS, 4), 1), make_batch((LT_TASKS, 3), 2)
    sw, qw = torch.ones(LT_TASKS, 4), torch.ones(LT_TASKS, 3)
    model = tiny("din")
    names = used_params(model, sup)
    g_cpu, g_dev = _meta_grads_both(model, lambda m: names, sup, qry, sw, qw, dtype=torch.float32, steps=2)
    assert all(v.dtype == torch.float32 for v in g_dev.values())
    assert_dicts_close(g_dev, g_cpu, 1e-4)


def test_adapt_and_predict_on_device_matches_cpu():
    sup, qry = make_batch((LT_TASKS, 4), 1), make_batch((LT_TASKS, 3), 2)
    model = tiny("deepfm")
    names = used_params(model, sup)
    out = []
    for dev in (CPU, DEVICE):
        m = copy.deepcopy(model).to(dev)
        out.append(adapt_and_predict(m, live_params(m), _to(sup, dev), _to(qry, dev), names=names, lr=0.5,
                                     steps=3).cpu())
    assert out[0].shape == (LT_TASKS, 3)
    torch.testing.assert_close(out[1], out[0], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- optimizers
def test_ftrl_steps_on_device_equal_cpu():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, 4, generator=g, dtype=torch.float64) * 0.1
    grads = [torch.randn(50, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    for gr in grads[2:]:
        gr[::3] = 0  # coordinates without gradient keep their weight
    finals = []
    for dev in (CPU, DEVICE):
        p = torch.nn.Parameter(w0.clone().to(dev))
        opt = FTRL([p], lr=0.1, beta=1.0, l1=0.05, l2=0.01)
        for gr in grads:
            p.grad = gr.to(dev)
            opt.step()
        st = opt.state[p]
        assert p.device.type == st["z"].device.type == dev.type
        finals.append((p.detach().cpu(), st["z"].cpu(), st["n"].cpu()))
    for a, b in zip(finals[0], finals[1], strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert (finals[0][0] == 0).any() and (finals[0][0] != 0).any()  # l1 zeroed some weights, not all


def test_ftrl_sparse_gradient_on_device_equals_cpu():
    finals = []
    for dev in (CPU, DEVICE):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(20, 3, sparse=True).double().to(dev)
        opt = FTRL(emb.parameters(), lr=0.1, l1=0.01)
        ids = torch.tensor([[1, 2, 2], [5, 1, 0]], device=dev)
        for _ in range(3):
            opt.zero_grad()
            emb(ids).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
        finals.append(emb.weight.detach().cpu())
    torch.testing.assert_close(finals[1], finals[0], atol=1e-6, rtol=1e-6)


def test_adam_on_device_is_fused_and_matches_cpu():
    torch.manual_seed(0)
    w0 = torch.randn(64, 8)
    grads = [torch.randn(64, 8) for _ in range(4)]
    finals = []
    for dev in (CPU, DEVICE):
        p = torch.nn.Parameter(w0.clone().to(dev))
        opt = build_optimizer([p], OptimConfig(name="adam", lr=0.01))
        assert opt.defaults.get("fused") is True
        for gr in grads:
            p.grad = gr.to(dev)
            opt.step()
        finals.append(p.detach().cpu())
    torch.testing.assert_close(finals[1], finals[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- MetaSelector
def test_metaselector_run_seed_on_device_matches_cpu(tmp_path):
    """Every method of one MetaSelector seed (pre-training, meta-training with Meta-SGD,
    vmapped meta-test fine-tuning at fixed rates) on DEVICE against the same seed on CPU."""
    from metactr.data.toy import write_toy_selector_dataset as write_toy_dataset
    from metactr.papers.metaselector.train import BaseModelConfig, SelectorData, SelectorExperiment, run_seed

    write_toy_dataset(tmp_path / "toy", n_users=24, n_items=30, seed=1)
    data = SelectorData.load(tmp_path / "toy", disjoint=False)
    runs = {}
    for dev in (CPU, DEVICE):
        cfg = SelectorExperiment(
            base_models=[BaseModelConfig(name="lr", optimizer="ftrl", lr=0.05),
                         BaseModelConfig(name="basic", hp={"embed_dim": 4, "hidden": [8]})],
            pretrain={"epochs": 1, "batch_size": 64}, selector={"hidden": [8]},
            meta={"episodes": 3, "max_support": 8, "max_query": 4, "inner_lr": 0.01, "test_steps": 3,
                  "test_lr": {"basic": 0.1}},
            sample_selector={"epochs": 1, "hidden": [8], "batch_size": 64}, reference_model="basic",
            device=str(dev))
        runs[dev.type] = run_seed(cfg, data, 0)
    a, b = runs["cpu"], runs[DEVICE.type]
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert b.metrics[k]["auc"] == pytest.approx(a.metrics[k]["auc"], abs=0.01), k
        assert b.metrics[k]["logloss"] == pytest.approx(a.metrics[k]["logloss"], rel=1e-3), k


# --------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_ddp_single_rank_over_nccl_matches_plain_training(data_dir):
    """One GPU allows one NCCL rank only: DDP (nccl on the device, gloo on CPU) around the
    trainer's LossModule, world size 1, must train exactly as without DDP."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from metactr.engine.distributed import DistInfo, broadcast_float

    ds = PreparedDataset(data_dir)
    split = ds.split("train")
    finals = []
    tdist.init_process_group("nccl" if ON_GPU else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                             rank=0, world_size=1)
    try:
        for use_ddp in (False, True):
            torch.manual_seed(0)
            model = build_model("deepfm", ds.spec, **HP["deepfm"]).to(DEVICE)
            gen = torch.Generator().manual_seed(0)
            phase = Plain(optim=OptimConfig(name="adam", lr=0.01)).setup(Context(model, ds, split, gen, 1, 64, DEVICE))[0]
            if use_ddp:  # as the plain strategy wraps it under torchrun
                probe = ds.batch(split, torch.arange(2)).to(DEVICE)
                phase.fn = DistributedDataParallel(phase.loss_module, device_ids=[DEVICE.index or 0] if ON_GPU else None,
                                                   find_unused_parameters=has_unused_parameters(model, probe))
            loss, rows = run_epoch(phase, phase.steps_per_epoch(), DEVICE)
            assert rows == len(split) and np.isfinite(loss)
            finals.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
        # the collectives the trainer uses, on the device's backend
        assert broadcast_float(0.625, DistInfo(rank=0, world_size=2), DEVICE) == 0.625
        agg = torch.tensor([1.5, 2.0], dtype=torch.float64, device=DEVICE)
        tdist.all_reduce(agg)
        assert agg.tolist() == [1.5, 2.0]
    finally:
        tdist.destroy_process_group()
    assert_dicts_close(finals[1], finals[0], 1e-5)


# --------------------------------------------------------------------------- every strategy on the device
META_STRATEGIES = {  # strategy -> (model, params, strategy block); no dropout: the device RNG differs
    "two_phase": ("rml", {"embed_dim": 4, "att_hidden": [8], "lstm_hidden": 4, "mlp_hidden": [8],
                          "aux_hidden": [4], "dropout": 0.0}, {"name": "two_phase"}),
    "maml": ("rml", {"embed_dim": 4, "att_hidden": [8], "lstm_hidden": 4, "mlp_hidden": [8], "aux_hidden": [4],
                     "dropout": 0.0}, {"name": "maml", "adapt_groups": ["meta"], "tasks_per_batch": 8,
                                       "support_size": 4, "query_size": 3}),
    "metasgd": ("melu", {"embed_dim": 4, "hidden": [8]}, {"name": "metasgd", "tasks_per_batch": 8,
                                                           "support_size": 4, "query_size": 3}),
}


@pytest.mark.parametrize("name", list(META_STRATEGIES))
def test_meta_strategies_train_on_device_like_on_cpu(data_dir, tmp_path, name):
    """``metactr train`` with ``--set device=cuda`` for RML two-phase and MAML: the Trainer moves the
    model, every step input and the strategy's state (Meta-SGD rates) to the device; the run and a
    resume match the CPU run."""
    from metactr.train.config import TrainConfig

    model_name, params, strat = META_STRATEGIES[name]

    def run(device: torch.device, out, resume=False):
        cfg = TrainConfig.model_validate({
            "data": {"prepared": str(data_dir)}, "model": {"name": model_name, "params": params},
            "strategy": strat, "epochs": 2, "batch_size": 32, "seed": 1, "out": str(out), "progress": False,
            "tensorboard": False, "early_stopping": {"patience": None}, "device": str(device)})
        ds = PreparedDataset(data_dir)
        torch.manual_seed(cfg.seed)
        model = build_model(model_name, ds.spec, **params)
        return fit(model, ds, cfg, run_dir=out, resume=resume, device=device, log=lambda s: None), model, ds

    (_, model_c, ds), (_, model_d, _) = run(CPU, tmp_path / "cpu"), run(DEVICE, tmp_path / "dev")
    assert all(p.device.type == DEVICE.type for p in model_d.parameters())
    hist_c = [r["train_loss"] for r in history(tmp_path / "cpu")]
    hist_d = [r["train_loss"] for r in history(tmp_path / "dev")]
    np.testing.assert_allclose(hist_d, hist_c, rtol=1e-3)
    np.testing.assert_allclose(predict_proba(model_d, ds, "test"), predict_proba(model_c, ds, "test"), atol=2e-3)
    # a crash after epoch 1 on the device, resumed there: the same weights as the uninterrupted device run
    import shutil

    shutil.copytree(tmp_path / "dev", tmp_path / "cut")
    for f in (tmp_path / "cut" / "checkpoints").glob("epoch_002*"):
        f.unlink()
    _, resumed, _ = run(DEVICE, tmp_path / "cut", resume=True)
    assert_dicts_close({k: v.cpu() for k, v in resumed.state_dict().items()},
                       {k: v.cpu() for k, v in model_d.state_dict().items()}, 1e-6)
