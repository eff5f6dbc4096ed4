"""`metactr data ...` and `metactr demo`: outputs, and one-line errors with exit code 2."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import typer

import metactr.cli as cli
from metactr.data import download as dl
from metactr.errors import DataError, OfflineError


@pytest.fixture
def run(monkeypatch, capsys):
    """Call the real ``metactr.cli.main`` with only the data and demo commands registered (so that
    these tests do not depend on other concerns' modules)."""
    def register():
        from metactr.data import commands
        from metactr.demo import register as register_demo

        app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
        app.add_typer(commands.app, name="data")
        register_demo(app)
        monkeypatch.setattr(cli, "app", app)

    monkeypatch.setattr(cli, "_register_all", register)

    def _run(*args: str) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0]


def ml100k_tiny(tmp: Path, data: str) -> Path:
    d = tmp / "raw"
    d.mkdir()
    (d / "u.data").write_text(data)
    (d / "u.user").write_text("1|24|M|technician|85711\n")
    (d / "u.item").write_text("10|Toy Story (1995)|01-Jan-1995||u|" + "|".join(["0"] * 19) + "\n")
    return d


def test_prepare_bad_line_one_line_error_and_no_output(run, tmp_path):
    raw = ml100k_tiny(tmp_path, "1\t10\t5\t100\n1\t10\n")
    code, _, err = run("data", "prepare", "--dataset", "ml-100k", "--data-dir", raw, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "u.data:2", "expected 4 fields")
    assert not (tmp_path / "out").exists()


def test_prepare_wrong_separator_and_missing_dir(run, tmp_path):
    raw = ml100k_tiny(tmp_path, "1,10,5,100\n")
    code, _, err = run("data", "prepare", "--dataset", "ml-100k", "--data-dir", raw, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "u.data:1", "wrong separator")
    code, _, err = run("data", "prepare", "--dataset", "ml-100k", "--data-dir", tmp_path / "nope", "--out",
                       tmp_path / "o")
    assert_one_line_error(code, err, "not found")


def test_prepare_config_errors(run, tmp_path):
    raw = ml100k_tiny(tmp_path, "1\t10\t5\t100\n")
    base = ("data", "prepare", "--dataset", "ml-100k", "--data-dir", raw, "--out", tmp_path / "o")
    code, _, err = run(*base, "--set", "rml.bogus=1")
    assert_one_line_error(code, err, "rml.bogus", "unknown key")
    code, _, err = run(*base, "--set", "rml.cold_user_fraction=2")
    assert_one_line_error(code, err, "rml.cold_user_fraction")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("protocol: rml\nsession: {max_len: -1}\n")
    code, _, err = run(*base, "--config", cfg)
    assert_one_line_error(code, err, "c.yaml", "session.max_len")
    code, _, err = run(*base)  # one user with one rating: nothing survives the filter
    assert_one_line_error(code, err, "min_user_interactions")


def test_synth_prepare_stats_roundtrip(run, tmp_path):
    log = tmp_path / "log.parquet"
    code, out, _ = run("data", "synth", "--out", log, "--users", 200, "--items", 300, "--rows", 20000, "--seed", 1)
    assert code == 0 and log.is_file()
    out_dir = tmp_path / "prep"
    code, out, _ = run("data", "prepare", "--dataset", "synthetic", "--data-dir", log, "--out", out_dir,
                       "--set", "protocol=random", "--quiet")
    assert code == 0 and out.startswith("prepared")
    code, out, _ = run("data", "prepare", "--dataset", "synthetic", "--data-dir", log, "--out", out_dir,
                       "--set", "protocol=random", "--quiet")
    assert out.startswith("up to date")
    code, out, _ = run("data", "stats", out_dir, "--json")
    rows = json.loads(out)
    assert [r["split"] for r in rows] == ["train", "valid", "test"]
    inter = json.loads((out_dir / "meta.json").read_text())["interactions"]
    assert sum(r["samples"] for r in rows) == inter["rows"] - inter["users"]  # all but each user's first
    code, out, _ = run("data", "stats", out_dir)
    assert code == 0 and "pos. rate" in out and "train" in out
    code, _, err = run("data", "stats", tmp_path / "missing")
    assert_one_line_error(code, err, "not found")


def test_demo_runs_and_prints_stats(run, tmp_path):
    code, out, _ = run("demo", "--out", tmp_path / "demo")
    assert code == 0
    assert "wc_train" in out and "cw_test" in out
    assert (tmp_path / "demo" / "prepared" / "meta.json").is_file()
    # the leaderboard, the Bayes ceiling and whether session-level adaptation helps (paired contrast)
    assert "bayes_ceiling" in out and "rml_session_maml_label - rml_wo_meta_label" in out
    res = json.loads((tmp_path / "demo" / "bench" / "results.json").read_text())
    assert {(c["subset"], c["method"], c["reference"]) for c in res["contrasts"]} >= {
        ("wc", "rml_session_maml_label", "rml_wo_meta_label"), ("cw", "rml_session_maml_label", "rml_wo_meta_label")}
    assert "## Contrasts" in (tmp_path / "demo" / "bench" / "results.md").read_text()


# ------------------------------------------------------------------------------- download
def make_zip(tmp: Path) -> Path:
    src = tmp / "ml-100k"
    src.mkdir()
    for name in ("u.data", "u.user", "u.item"):
        (src / name).write_text("x\n")
    archive = tmp / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in src.iterdir():
            z.write(p, f"ml-100k/{p.name}")
    shutil.rmtree(src)
    return archive


def test_download_offline_is_one_line_error(run, tmp_path, monkeypatch):
    def offline(url, dst):
        raise OfflineError("cannot download (Name or service not known); are you offline?", path=url)

    monkeypatch.setattr(dl, "_urllib_fetch", offline)
    code, _, err = run("data", "download", "ml-100k", "--dest", tmp_path)
    assert_one_line_error(code, err, "offline")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_download_file_url_checksum_ok_and_mismatch(run, tmp_path, monkeypatch):
    archive = make_zip(tmp_path)
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(dl.SOURCES, "ml-100k", dl.Source(archive.as_uri(), ("u.data", "u.user", "u.item"),
                                                         {"md5": md5}))
    dest = tmp_path / "dest"
    code, _, err = run("data", "download", "ml-100k", "--dest", dest, "--sha256", "0" * 64)
    assert_one_line_error(code, err, "sha256 mismatch")
    assert not (dest / "ml-100k").exists() and [p.name for p in dest.iterdir()] == []
    code, out, _ = run("data", "download", "ml-100k", "--dest", dest, "--sha256", good)
    assert code == 0 and (dest / "ml-100k" / "u.data").is_file()  # lifted out of the archive's folder
    assert json.loads((dest / "ml-100k" / ".download.json").read_text())["sha256"] == good


def test_download_never_replaces_a_folder_it_did_not_write(run, tmp_path, monkeypatch):
    archive = make_zip(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(dl.SOURCES, "ml-100k", dl.Source(archive.as_uri(), ("u.data", "u.user", "u.item"),
                                                         {"md5": md5}))
    mine = tmp_path / "dest" / "ml-100k"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")  # the user's folder, lacking the dataset's files
    code, _, err = run("data", "download", "ml-100k", "--dest", tmp_path / "dest")
    assert_one_line_error(code, err, "not written by metactr")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (mine / "notes.txt").unlink()  # empty: claimed, downloaded and marked as metactr's
    code, _, _ = run("data", "download", "ml-100k", "--dest", tmp_path / "dest")
    assert code == 0 and (mine / "u.data").is_file() and (mine / ".metactr").is_file()
    (mine / "u.user").unlink()  # an incomplete download of ours is fetched again
    code, _, _ = run("data", "download", "ml-100k", "--dest", tmp_path / "dest")
    assert code == 0 and (mine / "u.user").is_file()


def test_download_real_urllib_path_with_file_url(tmp_path):
    archive = make_zip(tmp_path)
    with pytest.raises(DataError, match="md5 mismatch"):  # the pinned official MD5 guards a wrong archive
        dl.download_dataset("ml-100k", tmp_path / "d", url=archive.as_uri(), echo=lambda s: None)
    with pytest.raises(OfflineError):
        dl.download_dataset("ml-100k", tmp_path / "d", url=(tmp_path / "missing.zip").as_uri(), echo=lambda s: None)


def test_download_print_only_and_unknown(run, tmp_path):
    code, out, _ = run("data", "download", "avazu")
    assert code == 0 and "kaggle.com" in out
    code, _, err = run("data", "download", "netflix")
    assert_one_line_error(code, err, "unknown dataset")


def test_prepare_on_bad_rows_error_skip_and_bogus(run, tmp_path):
    good = "".join(f"1\t{10 + i}\t{1 + i % 5}\t{100 + i}\n" for i in range(4))
    raw = ml100k_tiny(tmp_path, good + "1\t20\t7.5\t200\n1\t21\tnan\t201\n")
    base = ("data", "prepare", "--dataset", "ml-100k", "--data-dir", raw, "--out", tmp_path / "o", "--quiet",
            "--set", "protocol=random", "--set", "filter.min_user_interactions=2")
    code, _, err = run(*base)
    assert_one_line_error(code, err, "u.data:5", "field 'rating'", "7.5 outside 1-5")
    assert not (tmp_path / "o").exists()
    code, out, _ = run(*base, "--on-bad-rows", "skip")
    assert code == 0 and out.startswith("prepared")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["bad_rows"]["skipped"] == 2 and meta["bad_rows"]["by_field"] == {"rating": 2}
    assert meta["config"]["on_bad_rows"] == "skip" and meta["interactions"]["rows"] == 4
    code, _, err = run(*base, "--on-bad-rows", "ignore", "--force")
    assert_one_line_error(code, err, "on_bad_rows")
