"""``metactr reproduce metaselector`` end to end (toy data, and a short real ML-100K run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metactr.cli import main
from metactr.papers.metaselector.reproduce import aggregate, render_markdown
from metactr.data.toy import write_toy_selector_dataset as write_toy_dataset
from metactr.papers.metaselector.train import SeedResult

TINY = ["--set", "base_models=[{name: lr, optimizer: ftrl, lr: 0.05}, {name: fm, hp: {embed_dim: 4}}, "
        "{name: basic, hp: {embed_dim: 4, hidden: [8]}}]",
        "--set", "reference_model=basic", "--set", "pretrain.batch_size=128", "--set", "meta.episodes=4",
        "--set", "selector.hidden=[16]", "--set", "sample_selector.hidden=[16]"]

METHODS = {"lr", "fm", "basic", "perfect_sample", "perfect_user", "sample_selector", "metaselector",
           "metaselector_simplified"}


def _check_run(out, methods):
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["methods"]}
    assert set(rows) == methods
    for r in rows.values():
        for key in ("auc_mean", "auc_ci95", "logloss_mean", "logloss_ci95", "relimpr"):
            assert key in r
        assert len(r["auc"]) == len(res["seeds"])
        assert 0.0 <= r["auc_mean"] <= 1.0 and r["logloss_mean"] > 0
    assert rows[res["best_single_model"]]["relimpr"] == pytest.approx(0.0)
    # the sample-level oracle bounds every fixed-base selector's logloss, seed by seed
    for other in ("sample_selector", "perfect_user", *[m for m in methods if m in ("lr", "fm", "basic", "deepfm", "ffm")]):
        assert all(a <= b + 1e-9 for a, b in zip(rows["perfect_sample"]["logloss"], rows[other]["logloss"], strict=True))
    assert sum(res["best_model_share"].values()) == pytest.approx(1.0)
    md = (out / "results.md").read_text()
    assert "Table 3" in md and "MetaSelector-Simplified" in md and "Table 1" in md
    png = out / "user_loss_kde.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert (out / "config.yaml").is_file()
    return res


def test_reproduce_quick_on_toy_data(tmp_path):
    write_toy_dataset(tmp_path / "toy", n_users=30, n_items=40, seed=2)
    out = tmp_path / "run"
    rc = main(["reproduce", "metaselector", "--prepared", str(tmp_path / "toy"), "--dataset", "toy",
               "--seeds", "2", "--quick", "--out", str(out), *TINY])
    assert rc == 0
    res = _check_run(out, METHODS)
    assert res["seeds"] == [0, 1] and res["quick"] is True


def test_reproduce_validate_scores_the_query_rows_and_leaves_the_paper_out(tmp_path):
    write_toy_dataset(tmp_path / "toy", n_users=30, n_items=40, seed=2)
    out = tmp_path / "val"
    rc = main(["reproduce", "metaselector", "--prepared", str(tmp_path / "toy"), "--dataset", "ml-1m",
               "--seeds", "1", "--quick", "--validate", "--out", str(out), *TINY])
    assert rc == 0
    res = _check_run(out, METHODS)
    assert res["protocol"] == "validation" and res["goal"] is None and not res["paper_available"]
    assert all(r["paper_auc"] is None for r in res["methods"])
    import pyarrow.parquet as pq  # the scored rows are the users' query rows, not their test rows
    assert res["n_test"] == pq.read_metadata(tmp_path / "toy" / "ms_query.parquet").num_rows
    md = (out / "results.md").read_text()
    assert "Validation protocol" in md and "query rows" in md and "Goal" not in md
    # a bad prepare.metaselector fraction is a one-line config error, not a traceback
    assert main(["reproduce", "metaselector", "--prepared", str(tmp_path / "toy"), "--quick", "--validate",
                 "--out", str(tmp_path / "bad"), "--set", "prepare={metaselector: {support_fraction: 2}}"]) == 2


def test_reproduce_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["reproduce", "metaselector", "--dataset", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and "\n" not in err
    write_toy_dataset(tmp_path / "toy", n_users=10, seed=0)
    assert main(["reproduce", "metaselector", "--prepared", str(tmp_path / "toy"), "--out", str(tmp_path / "o"),
                 "--set", "meta.episodez=3"]) == 2
    assert "episodez" in capsys.readouterr().err
    assert main(["reproduce", "metaselector", "--prepared", str(tmp_path / "absent"), "--out",
                 str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o" / "results.json").exists()


def test_aggregate_relimpr_intervals_and_goal():
    def sr(seed, a_best, a_ms):
        m = {"lr": {"auc": 0.70, "logloss": 0.60}, "deepfm": {"auc": a_best, "logloss": 0.55},
             "metaselector": {"auc": a_ms, "logloss": 0.54}}
        return SeedResult(seed, m, {"lr": 0.4, "deepfm": 0.6}, {}, {})

    res = aggregate([sr(0, 0.80, 0.812), sr(1, 0.79, 0.801), sr(2, 0.81, 0.823)], ["lr", "deepfm"], dataset="ml-1m")
    rows = {r["method"]: r for r in res["methods"]}
    assert res["best_single_model"] == "deepfm"
    expected = np.mean([100 * ((a - 0.5) / (b - 0.5) - 1) for a, b in [(0.812, 0.8), (0.801, 0.79), (0.823, 0.81)]])
    assert rows["metaselector"]["relimpr"] == pytest.approx(expected)
    assert rows["metaselector"]["paper_auc"] == 0.8047 and rows["deepfm"]["paper_logloss"] == 0.54672
    assert res["goal"]["auc_ci_excludes_zero"] and res["goal"]["relimpr_ge_paper"] == bool(expected >= 3.04)
    res.update({"dataset": "ml-1m", "n_test": 10, "n_test_users": 3, "command": "x", "wall_s": 1.0})
    md = render_markdown(res)
    assert "users 3000-6040" in md and "0.8047" in md and "40.03%" in md


@pytest.mark.data
def test_reproduce_quick_on_real_ml100k(real_data, tmp_path):
    raw = real_data("ml-100k")
    out = tmp_path / "run"
    rc = main(["reproduce", "metaselector", "--dataset", "ml-100k", "--data-dir", str(raw), "--seeds", "1",
               "--quick", "--out", str(out), "--set", "max_users=40", "--set", "meta.episodes=3"])
    assert rc == 0
    res = _check_run(out, {"lr", "fm", "ffm", "deepfm", "perfect_sample", "perfect_user", "sample_selector",
                           "metaselector", "metaselector_simplified"})
    assert res["n_test_users"] == 40
    # real data: trained base models are better than chance
    assert all(r["auc_mean"] > 0.55 for r in res["methods"] if r["method"] in ("fm", "deepfm"))


def test_reproduce_takes_threads_like_train(tmp_path, capsys):
    from metactr.papers.metaselector.reproduce import load_experiment

    assert load_experiment(None, ["threads=1"], quick=True).threads == 1
    assert load_experiment(None, [], quick=False).threads is None  # torch's default, as before
    write_toy_dataset(tmp_path / "toy", n_users=10, seed=0)
    assert main(["reproduce", "metaselector", "--prepared", str(tmp_path / "toy"), "--out", str(tmp_path / "o"),
                 "--set", "threads=0"]) == 2
    assert "threads" in capsys.readouterr().err
