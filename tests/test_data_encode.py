"""Vocabularies: 0 = padding, 1 = unknown, real values from 2; lists; files."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from metactr.data.encode import Vocab, encode_side_table, load_vocabs
from metactr.errors import DataError


def test_codes_sorted_from_two_and_unknown_is_one():
    v = Vocab.build("item_id", pl.Series([30, 10, 20, 10, None]))
    assert v.size == 5
    assert v.encode(pl.Series([10, 20, 30, 99, None])).to_list() == [2, 3, 4, 1, 1]
    assert v.decode([2, 4, 1, 0]) == [10, 30, None, None]


def test_string_vocab_accepts_ints_and_large_int_lookup_matches_hash_path():
    v = Vocab.build("zip", pl.Series(["1", "2", "x"]))
    assert v.lookup([2, "x", "nope"]).tolist() == [3, 4, 1]
    ids = pl.Series(np.arange(0, 400_000, 2))  # dense ints: the lookup-table path
    big = Vocab.build("user_id", ids)
    q = pl.Series(np.r_[np.arange(0, 200_000, 1), [-5, 10**9]])
    fast = big.encode(q).to_numpy()
    slow = q.cast(pl.Int64).replace_strict(big.raw, big.codes, default=1).to_numpy()
    assert (fast == slow).all() and fast[1] == 1 and fast[-1] == 1


def test_list_fields_share_a_vocab_and_keep_lengths():
    s = pl.Series("genres", [["b", "a"], [], None, ["c", "zz"]])
    v = Vocab.build("genres", s.head(1), pl.Series([["c"]]))
    out = v.encode(s).to_list()
    assert out == [[3, 2], [], [], [4, 1]]


def test_save_load_roundtrip(tmp_path):
    (tmp_path / "vocab").mkdir()
    v = Vocab.build("item_id", pl.Series(["x", "y"]))
    v.save(tmp_path / "vocab" / "item_id.parquet")
    got = load_vocabs(tmp_path)["item_id"]
    assert got.lookup(["y", "q"]).tolist() == [3, 1]
    pl.DataFrame({"raw": ["a"], "code": [7]}).write_parquet(tmp_path / "vocab" / "bad.parquet")
    with pytest.raises(DataError, match="codes"):
        load_vocabs(tmp_path)
    with pytest.raises(DataError, match="vocab"):
        load_vocabs(tmp_path / "nowhere")


def test_side_table_one_row_per_code_unknown_features_are_one():
    ids = Vocab.build("item_id", pl.Series([1, 2, 3]))
    table = pl.DataFrame({"item": [1, 3, 3], "year": ["1995", None, "2000"], "genres": [["a"], [], ["b"]]})
    out, vocabs = encode_side_table(table, "item", ids, None)
    assert out["item_id"].to_list() == [2, 3, 4]
    assert out["year"].to_list() == [2, 1, 1]  # item 2 has no row; item 3's first row has no year
    assert out["genres"].to_list() == [[2], [1], [1]]  # empty list -> [unknown]
    assert set(vocabs) == {"year", "genres"}
    with pytest.raises(DataError, match="unknown item feature"):
        encode_side_table(table, "item", ids, ["colour"])
