"""Two CPU processes (gloo) train to the same weights as one process on the same global batches.

Each rank runs the real entry point (``run_training``) with torchrun's environment variables.
The global batch size is odd (31), so the ranks get unequal shares (16/15) every step: the
per-rank loss scaling must make DDP's gradient average equal the single-process gradient.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from metactr.train.checkpoint import load_model
from metactr.train.config import TrainConfig
from test_trainer import make_prepared


def _cfg(data_dir, out) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"prepared": str(data_dir)}, "model": {"name": "basic", "params": {"hidden": [8]}},
        "optim": {"name": "adam", "lr": 0.02}, "epochs": 2, "batch_size": 31, "seed": 3, "threads": 1,
        "out": str(out), "progress": False, "tensorboard": False, "early_stopping": {"patience": None}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data_dir: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from metactr.train.run import run_training

    run_training(_cfg(data_dir, out), log=lambda s: None)


@pytest.mark.timeout(120)
def test_two_process_ddp_matches_single_process(tmp_path):
    data = make_prepared(tmp_path / "data", rows={"train": 300, "valid": 60, "test": 60})
    from metactr.train.run import run_training

    single = run_training(_cfg(data, tmp_path / "single"), log=lambda s: None)
    mp.start_processes(_worker, args=(2, _free_port(), str(data), str(tmp_path / "ddp")), nprocs=2,
                       join=True, start_method="spawn")
    a, _ = load_model(tmp_path / "single" / "checkpoints" / "epoch_002")
    b, _ = load_model(tmp_path / "ddp" / "checkpoints" / "epoch_002")
    moved = False
    for (name, wa), wb, w0 in zip(a.state_dict().items(), b.state_dict().values(),
                                  load_model(tmp_path / "single" / "checkpoints" / "epoch_001")[0].state_dict().values(),
                                  strict=True):
        torch.testing.assert_close(wb, wa, rtol=1e-4, atol=1e-5, msg=f"{name} differs between DDP and one process")
        moved |= not torch.equal(wa, w0)
    assert moved  # the comparison is between trained weights, not two untouched initialisations
    # rank 0 alone wrote the run directory, with the same metrics history
    ddp_lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(ddp_lines) == 2 and single["epochs_run"] == 2
