"""The allocator setting (``engine.host``): applied once per process, switched off by the environment,
applied by the Trainer on the CPU."""

from __future__ import annotations

import platform

import torch

from metactr.data.prepared import PreparedDataset
from metactr.data.toy import write_toy_rml_dataset
from metactr.engine import host
from metactr.models.base import build_model
from metactr.strategies.config import PlainConfig
from metactr.strategies.plain import Plain
from metactr.train.trainer import Trainer

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_applied_once_and_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(host, "_state", None)
    monkeypatch.setenv("METACTR_MALLOC_RETAIN", "0")
    assert host.retain_freed_memory() is False
    monkeypatch.delenv("METACTR_MALLOC_RETAIN")
    assert host.retain_freed_memory() is False  # remembered for the process: not tried again
    monkeypatch.setattr(host, "_state", None)
    assert host.retain_freed_memory() is GLIBC  # glibc: set; elsewhere nothing to set


def test_the_trainer_sets_it_on_the_cpu_and_training_is_unchanged(monkeypatch, tmp_path):
    ds = PreparedDataset(write_toy_rml_dataset(tmp_path / "toy", n_users=30, rows_per_user=10))
    params = []
    for state in (False, None):  # first with the setting already "off", then applied by the Trainer
        monkeypatch.setattr(host, "_state", state)
        torch.manual_seed(0)
        model = build_model("deepfm", ds.spec, embed_dim=4, hidden=(8,))
        Trainer().fit(model, ds, "wc_train", Plain(PlainConfig(lr=1e-2)), epochs=1, batch_size=32,
                      generator=torch.Generator().manual_seed(1))
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert host._state is GLIBC
    for n in params[0]:
        assert torch.equal(params[0][n], params[1][n]), n
