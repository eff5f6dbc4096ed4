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


SMALL_RML = {"embed_dim": 4, "att_hidden": [8], "lstm_hidden": 4, "mlp_hidden": [8], "aux_hidden": [4],
             "dropout": 0.0}
STRATEGY = {  # strategy -> (model, params, the config's strategy block)
    "plain": ("basic", {"hidden": [8]}, None),
    "two_phase": ("rml", SMALL_RML, {"name": "two_phase", "lr": 0.02, "local_lr": 0.02}),
    "maml": ("rml", SMALL_RML, {"name": "maml", "adapt_groups": ["meta"], "lr": 0.02, "tasks_per_batch": 7,
                                "support_size": 4, "query_size": 3}),
}


def _cfg(data_dir, out, strategy: str = "plain") -> TrainConfig:
    model, params, strat = STRATEGY[strategy]
    extra = {"optim": {"name": "adam", "lr": 0.02}} if strat is None else {"strategy": strat}
    return TrainConfig.model_validate({
        "data": {"prepared": str(data_dir)}, "model": {"name": model, "params": params}, **extra,
        "epochs": 2, "batch_size": 31, "seed": 3, "threads": 1,
        "precision": "fp32",  # exact DDP == one process needs fp32 (auto is bf16 on AVX512_BF16 hosts)
        "out": str(out), "progress": False, "tensorboard": False, "early_stopping": {"patience": None}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data_dir: str, out: str, strategy: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from metactr.train.run import run_training

    run_training(_cfg(data_dir, out, strategy), log=lambda s: None)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", list(STRATEGY))
def test_two_process_ddp_matches_single_process(tmp_path, strategy):
    """plain: DDP on rank shares of each batch; two_phase and MAML: every rank takes its share of
    each part's rows (of the meta-batch's tasks) and the gradients are summed across ranks."""
    data = make_prepared(tmp_path / "data", rows={"train": 300, "valid": 60, "test": 60})
    from metactr.train.run import run_training

    single = run_training(_cfg(data, tmp_path / "single", strategy), log=lambda s: None)
    mp.start_processes(_worker, args=(2, _free_port(), str(data), str(tmp_path / "ddp"), strategy), nprocs=2,
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
