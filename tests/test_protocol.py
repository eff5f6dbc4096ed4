"""The RML protocol (metactr.papers.rml.protocol) and ``metactr reproduce rml``."""

from __future__ import annotations

import json
import re

import pytest
import torch



from metactr.cli import main
from metactr.data.prepared import PreparedDataset
from metactr.data.toy import write_toy_rml_dataset
from metactr.papers.rml.protocol import ProtocolConfig, finetune, run_protocol, scored_rows
from metactr.strategies import STRATEGIES, strategy_config
from metactr.models.base import build_model
from metactr.papers.rml.paper_numbers import paper_value
from metactr.train.trainer import train

def md_cell(md: str, section: str, row: str, column: str) -> str:
    """The cell (row label, column header) of the first table after the heading ``section``."""
    lines = md[md.index(section):].splitlines()
    table = [ln for ln in lines[1:] if ln.startswith("|")]
    table = table[:next((i for i, ln in enumerate(table[1:], 1) if not ln.startswith("|")), len(table))]
    heads = [c.strip() for c in table[0].strip("|").split("|")]
    for ln in table[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] == row:
            return cells[heads.index(column)]
    raise AssertionError(f"no row {row!r} under {section!r}")


def test_the_typed_paper_table_matches_the_paper_text():
    """Every row of ``paper_numbers.ML1M`` appears, number for number, as a row of the paper's
    Table 2 or 5 (the paper's text is in ../shared/papers)."""
    from metactr.papers.rml.paper_numbers import ML1M
    from metactr.utils import data_root

    text_path = data_root().parent / "papers" / "rml-mm22.md"
    if not text_path.is_file():
        pytest.skip(f"paper text not found at {text_path}")
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text_path.read_text().splitlines()
            if ln.strip().startswith("|")]
    numeric = [tuple(float(c) for c in r[-12:]) for r in rows if len(r) >= 13 and
               all(c.replace(".", "", 1).isdigit() for c in r[-12:])]
    for method, values in ML1M.items():
        assert tuple(values) in numeric, method


SMALL_RML = {"embed_dim": 4, "att_hidden": [8], "lstm_hidden": 4, "mlp_hidden": [8], "aux_hidden": [4]}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return write_toy_rml_dataset(tmp_path_factory.mktemp("toy"), n_users=40, rows_per_user=8)


@pytest.fixture(scope="module")
def toy(toy_dir):
    return PreparedDataset(toy_dir)


def test_faithful_finetune_skips_incomplete_batches(toy):
    n = len(toy.split("wc_finetune_a"))  # 10 rows (40 users / 4 stages)
    assert n == 10
    model = build_model("rml", toy.spec, **SMALL_RML)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    assert finetune(model, toy, "wc_finetune_a", opt, ProtocolConfig(mode="faithful", ft_batch_size=4), g) == 2
    assert finetune(model, toy, "wc_finetune_a", opt, ProtocolConfig(mode="full", ft_batch_size=4), g) == 3
    assert finetune(model, toy, "wc_finetune_a", opt, ProtocolConfig(mode="full", ft_batch_size=4, ft_epochs=2), g) == 6
    # an FT set smaller than one batch gives no step at all in faithful mode (as the authors' code)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert finetune(model, toy, "wc_finetune_a", opt, ProtocolConfig(mode="faithful", ft_batch_size=16), g) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_faithful_scoring_keeps_complete_batches_only():
    g = torch.Generator().manual_seed(0)
    rows = scored_rows(320, ProtocolConfig(mode="faithful"), g)
    assert rows.numel() == 256 and rows.unique().numel() == 256
    assert scored_rows(248, ProtocolConfig(mode="faithful"), g).numel() == 128
    assert scored_rows(248, ProtocolConfig(mode="full"), g).numel() == 248
    assert scored_rows(15, ProtocolConfig(mode="faithful"), g).numel() == 15  # smaller than a batch: all


TASKS = {"tasks_per_batch": 8, "support_size": 4, "query_size": 2}


@pytest.mark.parametrize("name", [s for s in STRATEGIES if s not in ("meta_embedding", "melu", "mamo")])
def test_every_strategy_trains_and_goes_through_the_protocol(toy, name):
    strat = strategy_config(name, TASKS)
    rows = run_protocol(toy, "cw", "rml", SMALL_RML, strat, ProtocolConfig(mode="full", bootstrap=50), seed=3,
                        epochs=1, batch_size=16)
    assert [r["stage"] for r in rows] == ["before", "finetune_a", "finetune_b", "finetune_c"]
    assert all(r["n_test"] == 10 for r in rows)
    assert rows[-1]["auc_boot95"][0] <= rows[-1]["auc"] <= rows[-1]["auc_boot95"][1]
    # each fine-tuning stage took its steps and moved the model
    assert all(r["ft_steps"] > 0 for r in rows[1:])
    assert len({round(r["logloss"], 9) for r in rows}) == 4


def test_a_trained_model_beats_a_constant_on_the_toy_signal(tmp_path):
    """The toy's held-out rows follow a user's taste for an item kind without noise: RML trained
    for a few epochs must rank its 40 test rows far better than a constant (AUC 0.5); seeds 0-2
    give 0.95-0.995. (Two-phase training, which updates the embeddings from a third of each batch,
    gives 0.50-0.79 on the same run: docs/rml.md.)"""
    ds = PreparedDataset(write_toy_rml_dataset(tmp_path / "toy", n_users=160, rows_per_user=8))
    rows = run_protocol(ds, "wc", "rml", SMALL_RML, strategy_config("plain", {"lr": 0.02}),
                        ProtocolConfig(mode="full", bootstrap=0), seed=0, epochs=4, batch_size=32)
    assert rows[0]["n_test"] == 40 and rows[0]["auc"] > 0.85, rows[0]


def test_training_is_deterministic_given_the_seed(toy):
    strat = strategy_config("two_phase")
    kw = {"epochs": 1, "batch_size": 16}
    a = run_protocol(toy, "wc", "rml", SMALL_RML, strat, ProtocolConfig(bootstrap=0), seed=1, **kw)
    b = run_protocol(toy, "wc", "rml", SMALL_RML, strat, ProtocolConfig(bootstrap=0), seed=1, **kw)
    assert [r["logloss"] for r in a] == [r["logloss"] for r in b]
    c = run_protocol(toy, "wc", "rml", SMALL_RML, strat, ProtocolConfig(bootstrap=0), seed=2, **kw)
    assert [r["logloss"] for r in a] != [r["logloss"] for r in c]


def test_two_phase_needs_a_meta_group(toy):
    from metactr.errors import ConfigError

    model = build_model("basic", toy.spec)
    with pytest.raises(ConfigError, match="no parameter group"):
        train(model, toy, "wc_train", strategy_config("two_phase"), epochs=0.1)


def test_reproduce_quick_end_to_end(toy_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "rml", "--data", str(toy_dir), "--out", str(out), "--quick", "--mode", "full",
            "--set", "method=" + json.dumps({"rml": {"model": "rml", "strategy": "two_phase", "model_kw": SMALL_RML},
                                            "rml_wo_meta": {"model": "rml", "model_kw": SMALL_RML}})]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert {(r["method"], r["subset"]) for r in rows} == {(m, s) for m in ("rml", "rml_wo_meta") for s in ("wc", "cw")}
    ftc = [r for r in rows if r["stage"] == "finetune_c"]
    assert all(len(r["auc"]) == 2 and r["seeds"] == [0, 1] and r["n_test"] == 10 for r in ftc)
    # the rendering puts each number in its cell: RML's WC AUC after FT-C is ours, then the paper's
    md = (out / "results.md").read_text()
    rml_wc = next(r for r in ftc if r["method"] == "rml" and r["subset"] == "wc")
    cell = md_cell(md, "### after FT-C", "Ours (RML)", "WC AUC")
    assert cell.startswith(f"{rml_wc['auc_mean']:.4f} ± ")
    assert cell.endswith(f"({paper_value('rml', 'finetune_c', 'wc', 'auc'):.4f}, {rml_wc['auc_diff']:+.4f})")
    assert md_cell(md, "### after FT-A", "w/o Meta", "CW loss").endswith(
        f"({paper_value('rml_wo_meta', 'finetune_a', 'cw', 'logloss'):.4f}, "
        f"{next(r for r in rows if r['method'] == 'rml_wo_meta' and r['subset'] == 'cw' and r['stage'] == 'finetune_a')['logloss_diff']:+.4f})")
    # every job's metrics went through the tracking interface (metrics.jsonl, one line per job)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {ln["seed"] for ln in lines} == {0, 1}
    assert any(ln.get("rml/wc/finetune_c/auc") == pytest.approx(rml_wc["auc"][ln["seed"]]) for ln in lines)
    # a second invocation reuses every finished job
    assert main(argv) == 0
    assert "8 already done" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [(["--methods", "nope"], "unknown method"),
                                       (["--subsets", "xx"], "needs split"),
                                       (["--mode", "sloppy"], "protocol.mode")])
def test_reproduce_rejects_bad_input(toy_dir, tmp_path, capsys, extra, msg):
    assert main(["reproduce", "rml", "--data", str(toy_dir), "--out", str(tmp_path / "o"), "--quick", *extra]) == 2
    assert msg in capsys.readouterr().err


def test_reproduce_missing_data_dir(tmp_path, capsys):
    assert main(["reproduce", "rml", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--quick"]) == 2
    assert "not found" in capsys.readouterr().err


def test_reproduce_tiny_run_on_ml1m_rml(real_data, tmp_path):
    path = real_data("ml-1m-rml")
    out = tmp_path / "real"
    assert main(["reproduce", "rml", "--data", str(path), "--out", str(out), "--methods", "rml", "--seeds", "1",
                 "--subsets", "cw", "--epochs", "0.02", "--set", "protocol.bootstrap=100"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    ftc = next(r for r in rows if r["stage"] == "finetune_c")
    assert ftc["n_test"] == 128 and ftc["ft_steps"] == 1  # faithful: one FT step, one full test batch
    assert ftc["auc_mean"] > 0.55  # even 2% of an epoch learns the CW subset's item popularity


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_vectorized_and_looped_strategies_train_the_same_weights(toy, name):
    def trained(vectorize: bool):
        torch.manual_seed(0)
        model = build_model("rml", toy.spec, **{**SMALL_RML, "dropout": 0.0}).double()
        cfg = strategy_config(name, {**TASKS, "vectorize": vectorize, "adapt_groups": ["meta"]})
        train(model, toy, "wc_train", cfg, epochs=1, seed=5)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    a, b = trained(True), trained(False)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0)


def test_reproduce_cli_is_consistent_threads_seeds_default_and_plain_quick_flag(toy_dir, tmp_path, capsys):
    from metactr.papers.rml.reproduce import load_reproduce_config

    assert load_reproduce_config(None, ["threads=2"]).threads == 2  # as `train` accepts it
    assert load_reproduce_config(None, []).threads == 1  # the jobs' single thread, as before
    for cmd in (["reproduce", "rml"], ["reproduce", "metaselector"]):
        assert main([*cmd, "--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "--quick" in help_text and "--no-quick" not in help_text and "--force" in help_text
    assert main(["reproduce", "rml", "--help"]) == 0
    help_text = re.sub(r"[│\s]+", " ", capsys.readouterr().out)  # the help box may wrap the line
    assert "default: (5, or the config's; 2 with --quick)" in help_text
    assert main(["reproduce", "rml", "--data", str(toy_dir), "--out", str(tmp_path / "o"), "--quick",
                 "--set", "threads=0"]) == 2
    assert "threads" in capsys.readouterr().err
