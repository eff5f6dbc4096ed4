"""Every command with an output path: what metactr did not write is never replaced (exit 2, one
line naming it), ``--force`` replaces metactr's own output only, resumable outputs are reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from metactr.cli import main
from metactr.errors import ConfigError
from metactr.utils import MARKER, check_out_file, claim_out_dir, owns_dir
from test_trainer import make_prepared


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def foreign(d: Path) -> Path:
    """A directory of the user's: metactr must leave it alone."""
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    return d


# --------------------------------------------------------------------------- the function
def test_claim_out_dir_creates_marks_reuses_and_refuses(tmp_path):
    d = claim_out_dir(tmp_path / "a" / "out", command="metactr test")
    assert owns_dir(d) and json.loads((d / MARKER).read_text()) == {
        "written_by": "metactr", "what": "output", "command": "metactr test"}
    (d / "job.json").write_text("{}")
    claim_out_dir(d)  # ours: kept as it is (resumable commands reuse it)
    assert (d / "job.json").is_file()
    claim_out_dir(d, force=True)  # ours + force: emptied, marked again
    assert not (d / "job.json").exists() and owns_dir(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert owns_dir(claim_out_dir(empty))
    f = foreign(tmp_path / "mine")
    for force in (False, True):
        with pytest.raises(ConfigError, match="not written by metactr") as e:
            claim_out_dir(f, force=force)
        assert str(f) in str(e.value)
        assert (f / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        claim_out_dir(tmp_path / "file", force=True)
    assert (tmp_path / "file").read_text() == "x"
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / MARKER).write_text("not json")
    (tmp_path / "fake" / "data").write_text("keep")
    with pytest.raises(ConfigError):  # a marker that is not metactr's JSON does not count
        claim_out_dir(tmp_path / "fake", force=True)
    assert (tmp_path / "fake" / "data").is_file()
    with pytest.raises(ConfigError, match="is a directory"):
        check_out_file(tmp_path / "mine", is_ours=lambda p: True)


# --------------------------------------------------------------------------- data prepare / synth
def ml100k(tmp: Path) -> Path:
    d = tmp / "raw"
    d.mkdir()
    rows = [f"{u}\t{i}\t{1 + (u * i) % 5}\t{100 + 10 * i}" for u in range(1, 6) for i in range(1, 31)]
    (d / "u.data").write_text("\n".join(rows) + "\n")
    (d / "u.user").write_text("".join(f"{u}|24|M|technician|85711\n" for u in range(1, 6)))
    (d / "u.item").write_text("".join(f"{i}|Movie {i} (1995)|01-Jan-1995||u|" + "|".join(["0"] * 18 + ["1"]) + "\n"
                                      for i in range(1, 31)))
    return d


def test_data_prepare_never_replaces_a_foreign_directory_or_a_file(tmp_path, capsys):
    raw = ml100k(tmp_path)
    args = ["data", "prepare", "--dataset", "ml-100k", "--data-dir", str(raw), "--quiet", "--set", "protocol=random",
            "--set", "filter.min_user_interactions=5"]
    mine = foreign(tmp_path / "mine")
    for extra in ([], ["--force"]):
        assert main([*args, "--out", str(mine), *extra]) == 2
        one_line_error(capsys, str(mine), "not written by metactr")
        assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    one_line_error(capsys, str(tmp_path / "file"), "is a file")
    assert (tmp_path / "file").read_text() == "x"
    out = tmp_path / "prep"
    assert main([*args, "--out", str(out)]) == 0 and owns_dir(out) and (out / "meta.json").is_file()
    before = (out / "meta.json").stat().st_mtime_ns
    assert main([*args, "--out", str(out), "--force"]) == 0  # metactr's own: rebuilt
    assert owns_dir(out) and (out / "meta.json").stat().st_mtime_ns != before


def test_data_synth_never_replaces_a_foreign_file(tmp_path, capsys):
    out = tmp_path / "log.parquet"
    out.write_text("my notes")
    assert main(["data", "synth", "--out", str(out), "--users", "20", "--items", "10", "--rows", "200"]) == 2
    one_line_error(capsys, str(out), "not written by metactr")
    assert out.read_text() == "my notes"
    (tmp_path / "d.parquet").mkdir()
    assert main(["data", "synth", "--out", str(tmp_path / "d.parquet"), "--rows", "200"]) == 2
    one_line_error(capsys, "is a directory")
    own = tmp_path / "own.parquet"
    for _ in range(2):  # its own file (and side tables) is rewritten
        assert main(["data", "synth", "--out", str(own), "--users", "20", "--items", "10", "--rows", "200"]) == 0
    (tmp_path / "own.users.parquet").write_text("not parquet")  # a side table that is not ours
    assert main(["data", "synth", "--out", str(own), "--users", "20", "--items", "10", "--rows", "200"]) == 2
    one_line_error(capsys, "own.users.parquet")


# --------------------------------------------------------------------------- train / evaluate
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("od") / "tiny")


def train_cfg(tmp: Path, data: Path, out: Path) -> Path:
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"prepared": str(data)}, "model": {"name": "lr"}, "epochs": 1,
                                 "batch_size": 128, "progress": False, "tensorboard": False, "out": str(out)}))
    return p


def test_train_refuses_a_foreign_run_directory_and_force_replaces_its_own(prepared, tmp_path, capsys):
    mine = foreign(tmp_path / "mine")
    cfg = train_cfg(tmp_path, prepared, mine)
    for extra in ([], ["--force"], ["--resume"]):
        assert main(["train", str(cfg), *extra]) == 2
        one_line_error(capsys, str(mine))
        assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    (tmp_path / "runfile").write_text("x")
    assert main(["train", str(train_cfg(tmp_path, prepared, tmp_path / "runfile"))]) == 2
    one_line_error(capsys, "is a file")
    run = tmp_path / "run"
    cfg = train_cfg(tmp_path, prepared, run)
    assert main(["train", str(cfg)]) == 0 and owns_dir(run)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2  # its checkpoints: --resume or --force, never silently replaced
    one_line_error(capsys, "--force")
    (run / "extra.txt").write_text("from an old run")
    assert main(["train", str(cfg), "--force"]) == 0
    assert not (run / "extra.txt").exists() and (run / "best.json").is_file() and owns_dir(run)
    capsys.readouterr()
    assert main(["train", str(cfg), "--force", "--resume"]) == 2
    one_line_error(capsys, "--force")


def test_evaluate_out_replaces_only_its_own_metrics_file(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(train_cfg(tmp_path, prepared, run))]) == 0
    capsys.readouterr()
    args = ["evaluate", str(run / "best.safetensors"), "--data", str(prepared), "--split", "test"]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert main([*args, "--out", str(notes)]) == 2
    one_line_error(capsys, str(notes), "not written by metactr")
    assert json.loads(notes.read_text()) == {"mine": 1}
    assert main([*args, "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "is a directory")
    good = tmp_path / "m.json"
    assert main([*args, "--out", str(good)]) == 0 and main([*args, "--out", str(good)]) == 0


# --------------------------------------------------------------------------- reproductions
def test_reproduce_rml_refuses_foreign_reuses_its_own_and_force_restarts(tmp_path, capsys):
    from metactr.data.toy import write_toy_rml_dataset

    data = write_toy_rml_dataset(tmp_path / "toy", n_users=40, rows_per_user=8)
    small = {"embed_dim": 4, "att_hidden": [8], "lstm_hidden": 4, "mlp_hidden": [8], "aux_hidden": [4]}
    base = ["reproduce", "rml", "--data", str(data), "--quick", "--methods", "rml_wo_meta", "--subsets", "wc",
            "--seeds", "1", "--set", "strategy.epochs=0.02", "--set", "threads=1",
            "--set", "method=" + json.dumps({"rml_wo_meta": {"model": "rml", "model_kw": small}})]
    mine = foreign(tmp_path / "mine")
    for extra in ([], ["--force"], ["--report-only"]):
        assert main([*base, "--out", str(mine), *extra]) == 2
        one_line_error(capsys, str(mine))
        assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    out = tmp_path / "out"
    assert main([*base, "--out", str(out)]) == 0 and owns_dir(out)
    capsys.readouterr()
    assert main([*base, "--out", str(out)]) == 0  # its own directory: finished jobs reused
    assert "1 already done" in capsys.readouterr().out
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--force"]) == 0  # afresh
    assert "0 already done" in capsys.readouterr().out


def test_reproduce_metaselector_refuses_a_foreign_directory_before_any_work(tmp_path, capsys):
    from metactr.data.toy import write_toy_selector_dataset

    write_toy_selector_dataset(tmp_path / "toy", n_users=10, seed=0)
    mine = foreign(tmp_path / "mine")
    for extra in ([], ["--force"]):
        assert main(["reproduce", "metaselector", "--prepared", str(tmp_path / "toy"), "--out", str(mine),
                     "--quick", *extra]) == 2
        one_line_error(capsys, str(mine), "not written by metactr")
        assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("argv", [["bench", "--quick"], ["demo"]])
def test_bench_and_demo_refuse_a_foreign_folder(tmp_path, capsys, argv):
    from metactr.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main([*argv, "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_prepared_dir_from_before_markers_counts_as_metactrs(tmp_path):
    import json

    from metactr.utils import claim_out_dir, owns_dir

    old = tmp_path / "prep"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format_version": 1, "dataset": "ml-100k", "config": {},
                                               "vocab_sizes": {}}))
    assert owns_dir(old)
    assert claim_out_dir(old) == old
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"name": "someone else's"}))
    assert not owns_dir(foreign)
