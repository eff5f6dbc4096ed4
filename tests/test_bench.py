"""``metactr bench``: the quick run end to end (results.json keys, pairs consistent with rows,
report.html with embedded figures, resume), the Bayes ceiling, per-batch AUC, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from metactr import cli

ROW_KEYS = {"dataset", "protocol", "subset", "stage", "method", "auc_mean", "auc_ci95", "gauc_mean", "logloss_mean",
            "n_test", "n_users", "seeds"}
PAIR_KEYS = {"dataset", "subset", "stage", "method", "reference", "delta_auc", "ci95", "excludes_zero"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick"
    code = cli.main(["bench", "--quick", "--out", str(out)])
    assert code == 0
    return out


def test_quick_results_json(quick):
    res = json.loads((quick / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert set(res) >= {"rows", "pairs"}
    assert res["rows"] and res["pairs"]
    for r in res["rows"]:
        assert ROW_KEYS <= set(r)
        lo, hi = r["auc_ci95"]
        assert lo <= r["auc_mean"] <= hi or r["method"] == "bayes_ceiling"
        assert r["subset"] in ("wc", "cw")
    for p in res["pairs"]:
        assert PAIR_KEYS <= set(p)
        assert isinstance(p["excludes_zero"], bool)
    datasets = {r["dataset"] for r in res["rows"]}
    assert datasets == {"synthetic-quick", "toy"}
    stages = {r["stage"] for r in res["rows"]}
    assert stages == {"before", "finetune_a", "finetune_b", "finetune_c"}


def test_pairs_consistent_with_rows(quick):
    res = json.loads((quick / "results.json").read_text())
    idx = {(r["dataset"], r["subset"], r["stage"], r["method"]): r for r in res["rows"]}
    for p in res["pairs"]:
        a = idx[(p["dataset"], p["subset"], p["stage"], p["method"])]
        ref = idx[(p["dataset"], p["subset"], p["stage"], p["reference"])]
        assert p["delta_auc"] == pytest.approx(a["auc_mean"] - ref["auc_mean"], abs=1e-12)
        lo, hi = p["ci95"]
        assert lo <= hi
        assert p["excludes_zero"] == (lo > 0 or hi < 0)
        # the reference is the strongest simple baseline, never compared with itself
        assert p["reference"] in ("popularity", "rates_lr") and p["method"] != p["reference"]
    groups = {(p["dataset"], p["subset"], p["stage"]) for p in res["pairs"]}
    for g in groups:
        refs = {p["reference"] for p in res["pairs"] if (p["dataset"], p["subset"], p["stage"]) == g}
        assert len(refs) == 1
        ref = refs.pop()
        simple = [idx[(*g, m)]["auc_mean"] for m in ("popularity", "rates_lr")]
        assert idx[(*g, ref)]["auc_mean"] == max(simple)


def test_bayes_ceiling_on_synthetic_only(quick):
    res = json.loads((quick / "results.json").read_text())
    bayes = [r for r in res["rows"] if r["method"] == "bayes_ceiling"]
    assert bayes and {r["dataset"] for r in bayes} == {"synthetic-quick"}
    for b in bayes:
        assert b["upper_bound"] and b["seeds"] == 1
        others = [r["auc_mean"] for r in res["rows"] if (r["dataset"], r["subset"], r["stage"]) ==
                  (b["dataset"], b["subset"], b["stage"]) and r["method"] != "bayes_ceiling"]
        assert b["auc_mean"] > max(others)  # the true probabilities beat every briefly trained model


def test_bayes_probs_are_the_generators(quick):
    import polars as pl

    from metactr.eval.metrics import auc
    from metactr.papers.bench.data import PreparedEntry, bayes_probs
    from metactr.papers.bench.config import DatasetSpec

    prep = quick / "data" / "synthetic-quick" / "prepared"
    raw = quick / "data" / "synthetic-quick" / "raw" / "interactions.parquet"
    e = PreparedEntry(DatasetSpec(name="s", prepared=str(prep)), None, prep, raw)
    p = bayes_probs(e, "wc_test")
    y = pl.read_parquet(prep / "wc_test.parquet")["label"].to_numpy()
    assert p is not None and p.dtype == np.float32 and len(p) == len(y)
    res = json.loads((quick / "results.json").read_text())
    row = next(r for r in res["rows"] if r["method"] == "bayes_ceiling" and r["subset"] == "wc"
               and r["dataset"] == "synthetic-quick" and r["stage"] == "finetune_c")
    assert row["auc_mean"] == pytest.approx(auc(y, p), abs=1e-9)
    assert bayes_probs(PreparedEntry(e.spec, None, prep, None), "wc_test") is None


def test_predictions_are_npz_without_pickle(quick):
    runs = sorted((quick / "runs").glob("*.npz"))
    assert runs
    with np.load(runs[0], allow_pickle=False) as z:
        keys = z.files
        assert {"y", "user"} <= set(keys)
        probs = [k for k in keys if k.startswith("p__")]
        assert len(probs) == 4 and all(z[k].dtype == np.float32 for k in probs)


def test_report_html_has_embedded_figures(quick):
    html = (quick / "report.html").read_text()
    n = html.count('<img alt=')
    assert n >= 4 * 4  # per (dataset, subset): box, ridge, stages, KDE
    assert html.count('src="data:image/png;base64,') == n
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "Split statistics" in html and "wc_test" in html
    md = (quick / "results.md").read_text()
    assert "bayes_ceiling" in md and "reference" in md


def test_contrasts_are_paired_differences_of_the_rows(quick):
    res = json.loads((quick / "results.json").read_text())
    idx = {(r["dataset"], r["subset"], r["stage"], r["method"]): r for r in res["rows"]}
    got = {(c["dataset"], c["subset"]) for c in res["contrasts"]}
    assert got == {(d, s) for d in ("synthetic-quick", "toy") for s in ("wc", "cw")}
    for c in res["contrasts"]:
        assert (c["method"], c["reference"], c["stage"]) == ("rml_wo_meta", "basic", "finetune_c")
        a, b = (idx[(c["dataset"], c["subset"], c["stage"], m)] for m in ("rml_wo_meta", "basic"))
        assert c["delta_auc"] == pytest.approx(a["auc_mean"] - b["auc_mean"], abs=1e-12)
        lo, hi = c["ci95"]
        assert lo <= hi and c["excludes_zero"] == (lo > 0 or hi < 0) and c["seeds"] == 2
    assert "## Contrasts" in (quick / "results.md").read_text()


@pytest.mark.parametrize("contrast,needle", [("basic", "method:reference"), ("basic:basic", "two different"),
                                             ("basic:nope", "nope")])
def test_a_bad_contrast_is_one_line_error(tmp_path, capsys, contrast, needle):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"datasets: [{{name: x, prepared: /nonexistent}}]\nmethods: [basic, rates_lr]\n"
                   f"contrasts: ['{contrast}']\n")
    code, err = _err(capsys, "bench", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.splitlines()) == 1 and "contrasts" in err and needle in err, err
    assert not (tmp_path / "o").exists()


def test_resume_runs_nothing_again(quick, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (quick / "runs").iterdir()}
    assert cli.main(["bench", "--quick", "--out", str(quick)]) == 0
    out = capsys.readouterr().out
    assert "(32 already done)" in out
    assert {p.name: p.stat().st_mtime_ns for p in (quick / "runs").iterdir()} == before


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(quick, tmp_path):
    png = tmp_path / "r.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,2000", (quick / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=60)
    assert png.stat().st_size > 20_000  # a page of drawn figures, not a blank one


def test_batch_aucs_match_per_batch_auc():
    from metactr.eval.bench_plots import batch_aucs
    from metactr.eval.metrics import auc

    rng = np.random.default_rng(0)
    y = (rng.random(100) < 0.4).astype(float)
    p = rng.random((2, 100))
    a = batch_aucs(y, p, 25, seed=3)
    perm = np.random.default_rng(3).permutation(100).reshape(4, 25)
    want = [auc(y[b], p[s][b]) for s in range(2) for b in perm]
    assert np.allclose(a, want)


def _err(capsys, *args) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_error(tmp_path, capsys):
    code, err = _err(capsys, "bench", "--out", str(tmp_path / "o"))
    assert code == 2 and "--config" in err and len(err.splitlines()) == 1
    cfg = tmp_path / "b.yaml"
    cfg.write_text("datasets: [{name: x, prepared: /nonexistent}]\nmethods: [nope]\n")
    code, err = _err(capsys, "bench", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "nope" in err and len(err.splitlines()) == 1
    cfg.write_text("datasets: [{name: x, prepared: /nonexistent}]\nmethods: [basic]\nbogus: 1\n")
    code, err = _err(capsys, "bench", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "bogus" in err
    cfg.write_text("datasets: [{name: x, prepared: /nonexistent}]\nmethods: [basic]\n")
    code, err = _err(capsys, "bench", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "not found" in err
    cfg.write_text("datasets: [{name: x, raw: /tmp}]\n")
    code, err = _err(capsys, "bench", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "dataset" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_metaselector_protocol_on_the_toy(tmp_path):
    from metactr.data.toy import write_toy_selector_dataset

    prep = tmp_path / "prepared"
    write_toy_selector_dataset(prep, n_users=30)
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"protocol: metaselector\ndatasets: [{{name: mstoy, prepared: {prep}}}]\nseeds: 1\nn_boot: 100\n"
                   "batch_rows: 16\nmetaselector: {max_users: 30, pretrain: {epochs: 1}, meta: {episodes: 4, "
                   "test_chunk: 32, test_max_support: 64}, sample_selector: {epochs: 1, hidden: [16]}, "
                   "selector: {hidden: [16]}}\n")
    assert cli.main(["bench", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    methods = {r["method"] for r in res["rows"]}
    assert methods == {"lr", "fm", "ffm", "deepfm", "perfect_sample", "perfect_user", "sample_selector",
                       "metaselector", "metaselector_simplified"}
    assert all(r["subset"] is None and r["stage"] == "test" for r in res["rows"])
    # the reference is the best base model, not an oracle
    ref = res["pairs"][0]["reference"]
    assert ref in ("lr", "fm", "ffm", "deepfm")
    assert "per-user loss KDE" in (tmp_path / "o" / "report.html").read_text()
