"""Strategy settings (session MAML's inner rate) chosen on validation rows cut from training."""

from __future__ import annotations

import pytest
import yaml

from metactr.data.prepared import PreparedDataset
from metactr.data.toy import write_toy_rml_dataset
from metactr.papers.rml.protocol import ProtocolConfig, run_protocol
from metactr.papers.rml.strategy_select import combinations, select_strategy
from metactr.strategies import strategy_config

SMALL_RML = {"embed_dim": 4, "att_hidden": [8], "lstm_hidden": 4, "mlp_hidden": [8], "aux_hidden": [4], "dropout": 0.0}
SMAML = {"adapt_groups": ["meta"], "inner_lr": 0.1, "history_size": 3, "epochs": 1, "batch_size": 32}


@pytest.fixture(scope="module")
def toy():
    import tempfile

    return PreparedDataset(write_toy_rml_dataset(tempfile.mkdtemp(), n_users=120, rows_per_user=8))


def test_combinations_vary_the_first_setting_slowest():
    assert combinations({"inner_lr": [0.1, 3.0], "inner_steps": [1, 2]}) == [
        {"inner_lr": 0.1, "inner_steps": 1}, {"inner_lr": 0.1, "inner_steps": 2},
        {"inner_lr": 3.0, "inner_steps": 1}, {"inner_lr": 3.0, "inner_steps": 2}]


def test_selection_reads_training_rows_only_and_keeps_the_best_candidate(toy, monkeypatch):
    read = []
    real = toy.split
    monkeypatch.setattr(toy, "split", lambda name: (read.append(name), real(name))[1])
    cfg = ProtocolConfig(mode="full", bootstrap=0, strategy_select={"inner_lr": [0.01, 5.0]})
    strat = strategy_config("session_maml", SMAML)
    chosen, record = select_strategy(toy, "wc", "rml", SMALL_RML, strat, cfg, 0, epochs=1, batch_size=32)
    assert set(read) == {"wc_train"}, read  # never an FT or a test split
    assert [c["inner_lr"] for c in record["candidates"]] == [0.01, 5.0]
    aucs = [c["valid_auc"] for c in record["candidates"]]
    assert all(a is not None for a in aucs) and aucs[0] != aucs[1]  # the rate changes what is scored
    best = record["candidates"][aucs.index(max(aucs))]["inner_lr"]
    assert chosen.inner_lr == best == record["chosen"]["inner_lr"]
    assert chosen.model_dump() == {**strat.model_dump(), "inner_lr": best}


def test_the_protocol_trains_with_the_chosen_setting(toy):
    cfg = ProtocolConfig(mode="full", bootstrap=0, strategy_select={"inner_lr": [0.01, 5.0]})
    strat = strategy_config("session_maml", SMAML)
    rows = run_protocol(toy, "wc", "rml", SMALL_RML, strat, cfg, 0, epochs=1, batch_size=32)
    chosen = {r["strategy_selection"]["inner_lr"] for r in rows}
    assert len(chosen) == 1 and chosen <= {0.01, 5.0}
    # the main run is the plain protocol at the chosen rate: same scores as asking for it directly
    direct = run_protocol(toy, "wc", "rml", SMALL_RML, strat.model_copy(update={"inner_lr": chosen.pop()}),
                          ProtocolConfig(mode="full", bootstrap=0), 0, epochs=1, batch_size=32)
    assert [r["auc"] for r in rows] == pytest.approx([r["auc"] for r in direct], abs=1e-9)


def test_selection_config_checks_and_keys():
    with pytest.raises(ValueError):
        ProtocolConfig(mode="faithful", strategy_select={"inner_lr": [0.1]})
    with pytest.raises(ValueError):
        ProtocolConfig(mode="full", strategy_select={"inner_lr": []})
    assert "strategy_select" not in ProtocolConfig(mode="full").key_dump()
    assert "ft_valid_fraction" not in ProtocolConfig(mode="full").key_dump()  # old job keys stay valid
    d = ProtocolConfig(mode="full", strategy_select={"inner_lr": [0.1, 3.0]}).key_dump()
    assert d["strategy_select"] == {"inner_lr": [0.1, 3.0]} and "ft_valid_fraction" in d


@pytest.mark.parametrize("select,needle", [({"inner_rate": [0.1]}, "inner_rate"),
                                           ({"inner_lr": [0.1, -1.0]}, "-1.0")])
def test_bench_rejects_a_bad_selection_before_any_work(toy, tmp_path, capsys, select, needle):
    from metactr import cli

    base = {"protocol": "rml", "datasets": [{"name": "toy", "prepared": str(toy.root)}], "methods": ["s"],
            "seeds": 1, "rml": {"subsets": ["wc"], "strategy": {"epochs": 1, "batch_size": 32},
                                "protocol": {"mode": "full", "bootstrap": 0},
                                "method": {"s": {"model": "rml", "model_kw": SMALL_RML, "strategy": "session_maml",
                                                 "strategy_kw": {"adapt_groups": ["meta"]},
                                                 "protocol": {"strategy_select": select}}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base))
    assert cli.main(["bench", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method.s.protocol.strategy_select" in err[0] and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_bench_job_records_its_choice(toy, tmp_path):
    import json

    from metactr import cli

    base = {"protocol": "rml", "datasets": [{"name": "toy", "prepared": str(toy.root)}], "methods": ["s"],
            "seeds": 1, "rml": {"subsets": ["wc"], "strategy": {"epochs": 1, "batch_size": 32},
                                "protocol": {"mode": "full", "bootstrap": 0},
                                "method": {"s": {"model": "rml", "model_kw": SMALL_RML, "strategy": "session_maml",
                                                 "strategy_kw": {"adapt_groups": ["meta"], "history_size": 3},
                                                 "protocol": {"strategy_select": {"inner_lr": [0.01, 5.0]}}}}}}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(base))
    assert cli.main(["bench", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    rec = json.loads((tmp_path / "out" / "runs" / "toy__s__wc__seed0.json").read_text())["strategy_selection"]
    assert [c["inner_lr"] for c in rec["candidates"]] == [0.01, 5.0]
    best = max(rec["candidates"], key=lambda c: c["valid_auc"])  # (the earlier on a tie, as max keeps)
    assert rec["chosen"] == {"inner_lr": best["inner_lr"]}
