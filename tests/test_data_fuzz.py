"""Property-based: random mutations of a small valid file, one test per reader, through the real
``metactr.cli.main``: never a traceback, never exit code 1, never a half-written output.

Each example mutates one of the reader's files (a field replaced by a nasty token, a character
replaced, a line dropped or repeated, the file truncated; for Parquet, bytes or values), then
runs ``metactr data prepare``. Exit 0 must leave a complete prepared directory that loads;
exit 2 must print exactly one ``error:`` line and leave nothing at ``--out`` (nor temporaries).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metactr.cli as cli
from metactr.data.prepared import PreparedDataset

TOKENS = ["", "nan", "NaN", "-3", "7.5", "0", "1e400", "99999999999999999999", "x", '"', "::", "\t", ",", ";",
          "|", "\n", " ", "é", "NULL", "-1", "1400000000000", "(no genres listed)", "inf", "\r\n"]
KINDS = ["field", "field", "field", "char", "drop_line", "dup_line", "truncate"]
# 30 fixed (derandomized) examples per reader keep the suite fast and repeatable; for a longer random
# search set METACTR_FUZZ_EXAMPLES (e.g. 500)
_N = int(os.environ.get("METACTR_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_N or 30, derandomize=not _N, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OPS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 10**6), st.integers(0, 10**6),
                         st.sampled_from(TOKENS)), min_size=1, max_size=3)

USERS, ITEMS = 5, 6
PAIRS = [(u, i) for u in range(1, USERS + 1) for i in range(1, ITEMS + 1)]
TS = 978_300_000


def _ratings(sep: str, stars=lambda u, i: 1 + (u * i) % 5) -> str:
    return "".join(f"{u}{sep}{10 + i}{sep}{stars(u, i)}{sep}{TS + 60 * i + u}\n" for u, i in PAIRS)


def files_ml1m():
    return "ml-1m", {
        "ratings.dat": (_ratings("::"), "::"),
        "users.dat": ("".join(f"{u}::F::1::10::4806{u}\n" for u in range(1, USERS + 1)), "::"),
        "movies.dat": ("".join(f"{10 + i}::Film {i} (1995)::Comedy|Drama\n" for i in range(1, ITEMS + 1)), "::"),
    }, "latin-1", []


def files_ml100k():
    flags = "|".join(["0"] * 18 + ["1"])
    return "ml-100k", {
        "u.data": (_ratings("\t"), "\t"),
        "u.user": ("".join(f"{u}|24|M|technician|8571{u}\n" for u in range(1, USERS + 1)), "|"),
        "u.item": ("".join(f"{10 + i}|Film {i} (1995)|01-Jan-1995||u|{flags}\n" for i in range(1, ITEMS + 1)), "|"),
    }, "latin-1", []


def files_movielens_csv():
    ratings = "userId,movieId,rating,timestamp\n" + _ratings(",", lambda u, i: 0.5 * (1 + (u * i) % 10))
    movies = "movieId,title,genres\n" + "".join(f'{10 + i},"Film, {i} (1995)",Comedy|Drama\n'
                                                for i in range(1, ITEMS + 1))
    tags = "userId,movieId,tag,timestamp\n1,11,fun,1\n2,12,dark,2\n"
    return "movielens", {"ratings.csv": (ratings, ","), "movies.csv": (movies, ","), "tags.csv": (tags, ",")}, \
        "utf-8", []


def files_book_crossing():
    q = lambda *v: ";".join(f'"{x}"' for x in v) + "\n"  # noqa: E731
    ratings = q("User-ID", "ISBN", "Book-Rating") + "".join(q(u, f"00000000{i}X", 1 + (u * i) % 10) for u, i in PAIRS)
    users = q("User-ID", "Location", "Age") + "".join(q(u, "nyc, usa", 30) for u in range(1, USERS + 1))
    books = q("ISBN", "Title", "Author", "Year", "Publisher", "S", "M", "L") + "".join(
        q(f"00000000{i}X", "T", "A", 2000, "P", "s", "m", "l") for i in range(1, ITEMS + 1))
    return "book-crossing", {"BX-Book-Ratings.csv": (ratings, ";"), "BX-Users.csv": (users, ";"),
                             "BX-Books.csv": (books, ";")}, "latin-1", []


def files_avazu():
    header = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
              "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21\n")
    rows = "".join(f"{k},{(u + i) % 2},141021{10 + i:02d},1005,0,s,sd,sc,a,ad,ac,dev{u},ip,m,1,2,{15700 + i},"
                   f"320,50,1722,0,35,-1,79\n" for k, (u, i) in enumerate(PAIRS))
    return "avazu", {"train.csv": (header + rows, ",")}, "utf-8", []


def files_amazon():
    ratings = "".join(f"A{u},B0{i},{1 + (u * i) % 5}.0,{1_400_000_000 + 60 * i + u}\n" for u, i in PAIRS)
    meta = "".join(json.dumps({"asin": f"B0{i}", "category": ["Electronics", f"c{i % 2}"]}) + "\n"
                   for i in range(1, ITEMS + 1))
    return "amazon", {"ratings.csv": (ratings, ","), "meta_x.json": (meta, ",")}, "utf-8", []


def files_custom():
    schema = ("file: clicks.csv\ncolumns: {user: uid, item: sku, time: ts, label: clicked}\n"
              "user_features: [age]\nitem_table: {file: items.csv, key: sku, features: [brand, tags], "
              "multi_valued: [tags]}\n")
    clicks = "uid,sku,ts,clicked,age\n" + "".join(f"u{u},s{i},{TS + 60 * i + u},{(u + i) % 2},a{u % 2}\n"
                                                   for u, i in PAIRS)
    items = "sku,brand,tags\n" + "".join(f"s{i},b{i % 3},red|t{i}\n" for i in range(1, ITEMS + 1))
    return "custom", {"clicks.csv": (clicks, ","), "items.csv": (items, ","), "schema.yaml": (schema, ":")}, \
        "utf-8", ["--set", "custom_schema={dir}/schema.yaml"]


def mutate(text: str, sep: str, ops) -> str:
    for kind, a, b, tok in ops:
        lines = text.split("\n")
        if kind == "field" and lines:
            k = a % len(lines)
            parts = lines[k].split(sep)
            parts[b % len(parts)] = tok
            lines[k] = sep.join(parts)
        elif kind == "char" and text:
            p = a % len(text)
            text = text[:p] + tok + text[p + 1:]
            continue
        elif kind == "drop_line" and lines:
            del lines[a % len(lines)]
        elif kind == "dup_line" and lines:
            k = a % len(lines)
            lines.insert(b % (len(lines) + 1), lines[k])
        elif kind == "truncate":
            text = text[: a % (len(text) + 1)]
            continue
        text = "\n".join(lines)
    return text


@pytest.fixture
def run_cli(monkeypatch):
    """``metactr.cli.main`` with only the data commands registered; returns (code, stdout, stderr)."""
    def register():
        from metactr.data import commands

        app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
        app.add_typer(commands.app, name="data")
        monkeypatch.setattr(cli, "app", app)

    monkeypatch.setattr(cli, "_register_all", register)
    monkeypatch.delenv("METACTR_DEBUG", raising=False)

    def _run(args: list[str]) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    return _run


OUTCOMES: list[int] = []  # exit codes seen (for a look at the mix while developing)


def check_outcome(code: int, err: str, work: Path, out: Path) -> None:
    OUTCOMES.append(code)
    assert code in (0, 2), f"exit {code}: {err}"
    assert "Traceback" not in err
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".out")]
    assert not leftovers, leftovers
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not out.exists(), "a failed prepare left output behind"
        return
    meta = json.loads((out / "meta.json").read_text())
    ds = PreparedDataset(out)
    for name in meta["splits"]:
        ds.split(name)
    if meta["bad_rows"]["skipped"]:
        assert meta["bad_rows"]["policy"] == "skip"


BASE_ARGS = ["--set", "protocol=random", "--set", "filter.min_user_interactions=2", "--quiet"]


def fuzz_text_reader(run_cli, spec, pick: int, ops, policy: str) -> None:
    dataset, files, encoding, extra = spec
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw = work / "raw"
        raw.mkdir()
        names = list(files)
        target = names[0] if pick < 6 else names[pick % len(names)]  # mostly the interaction file
        for name, (text, sep) in files.items():
            if name == target:
                text = mutate(text, sep, ops)
            enc = "utf-8" if name.endswith((".yaml", ".json")) else encoding
            (raw / name).write_bytes(text.encode(enc, errors="replace"))
        out = work / "out"
        args = ["data", "prepare", "--dataset", dataset, "--data-dir", raw, "--out", out, *BASE_ARGS,
                "--on-bad-rows", policy, *[a.format(dir=raw) for a in extra]]
        code, _, err = run_cli(args)
        check_outcome(code, err, work, out)


PICK = st.integers(0, 11)
POLICY = st.sampled_from(["error", "skip"])


def test_valid_files_prepare(run_cli):
    """The unmutated files of every reader prepare (so that the fuzz tests start from valid input)."""
    for spec in (files_ml1m(), files_ml100k(), files_movielens_csv(), files_book_crossing(), files_avazu(),
                 files_amazon(), files_custom()):
        fuzz_text_reader(run_cli, spec, 0, [], "error")
        with tempfile.TemporaryDirectory() as tmp:  # and say so with exit 0
            raw = Path(tmp) / "raw"
            raw.mkdir()
            dataset, files, enc, extra = spec
            for name, (text, _) in files.items():
                (raw / name).write_bytes(text.encode("utf-8" if name.endswith((".yaml", ".json")) else enc))
            code, _, err = run_cli(["data", "prepare", "--dataset", dataset, "--data-dir", raw, "--out",
                                    Path(tmp) / "out", *BASE_ARGS, *[a.format(dir=raw) for a in extra]])
            assert code == 0, (dataset, err)


@FUZZ
@given(pick=PICK, ops=OPS, policy=POLICY)
def test_fuzz_ml1m(run_cli, pick, ops, policy):
    fuzz_text_reader(run_cli, files_ml1m(), pick, ops, policy)


@FUZZ
@given(pick=PICK, ops=OPS, policy=POLICY)
def test_fuzz_ml100k(run_cli, pick, ops, policy):
    fuzz_text_reader(run_cli, files_ml100k(), pick, ops, policy)


@FUZZ
@given(pick=PICK, ops=OPS, policy=POLICY)
def test_fuzz_movielens_csv(run_cli, pick, ops, policy):
    fuzz_text_reader(run_cli, files_movielens_csv(), pick, ops, policy)


@FUZZ
@given(pick=PICK, ops=OPS, policy=POLICY)
def test_fuzz_book_crossing(run_cli, pick, ops, policy):
    fuzz_text_reader(run_cli, files_book_crossing(), pick, ops, policy)


@FUZZ
@given(pick=PICK, ops=OPS, policy=POLICY)
def test_fuzz_avazu(run_cli, pick, ops, policy):
    fuzz_text_reader(run_cli, files_avazu(), pick, ops, policy)


@FUZZ
@given(pick=PICK, ops=OPS, policy=POLICY)
def test_fuzz_amazon(run_cli, pick, ops, policy):
    fuzz_text_reader(run_cli, files_amazon(), pick, ops, policy)


@FUZZ
@given(pick=PICK, ops=OPS, policy=POLICY)
def test_fuzz_custom(run_cli, pick, ops, policy):
    fuzz_text_reader(run_cli, files_custom(), pick, ops, policy)


VALUES = st.sampled_from([None, float("nan"), -3.0, 7.5, 0.0, 1e18, -1e18, float("inf")])


@FUZZ
@given(corrupt=st.booleans(), a=st.integers(0, 10**6), b=st.integers(0, 255),
       column=st.sampled_from(["user_id", "item_id", "timestamp", "rating"]), row=st.integers(0, len(PAIRS) - 1),
       value=VALUES, policy=POLICY)
def test_fuzz_synthetic_parquet(run_cli, corrupt, a, b, column, row, value, policy):
    users = np.array([u for u, _ in PAIRS], dtype=np.float64)
    items = np.array([i for _, i in PAIRS], dtype=np.float64)
    df = {"user_id": users, "item_id": items, "timestamp": TS + np.arange(len(PAIRS), dtype=np.float64),
          "rating": np.array([1.0 + (u * i) % 5 for u, i in PAIRS])}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log = work / "log.parquet"
        if not corrupt:  # an impossible value in one cell (ids and times as floats so that NaN fits)
            df[column] = df[column].copy()
            df[column][row] = np.nan if value is None else value
        frame = pl.DataFrame(df)
        if not corrupt and value is None:
            frame = frame.with_columns(pl.when(pl.int_range(pl.len()) == row).then(None)
                                       .otherwise(pl.col(column)).alias(column))
        frame.write_parquet(log)
        if corrupt:  # flip a byte or truncate
            data = bytearray(log.read_bytes())
            if b % 2:
                data = data[: a % len(data)]
            else:
                data[a % len(data)] = b
            log.write_bytes(bytes(data))
        out = work / "out"
        code, _, err = run_cli(["data", "prepare", "--dataset", "synthetic", "--data-dir", log, "--out", out,
                                *BASE_ARGS, "--on-bad-rows", policy])
        check_outcome(code, err, work, out)
