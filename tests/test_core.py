"""Core pieces: config validation, atomic writes, embedding layer, batch format, CLI errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field as PField

from metactr.cli import main
from metactr.config import StrictModel, load_config
from metactr.data.batch import FeatureSpec, Field, take_rows
from metactr.errors import ConfigError
from metactr.models.layers import FieldEmbedding, TargetAttention
from metactr.models.rnn import GRU, LSTM
from metactr.utils import atomic_path


class _Opt(StrictModel):
    lr: float = PField(1e-3, gt=0)


class _Cfg(StrictModel):
    name: str = "x"
    optim: _Opt = _Opt()


def test_config_unknown_key_names_file_and_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Cfg, p)
    assert "optim.momentum" in str(e.value) and "c.yaml" in str(e.value)


def test_config_override_and_range(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\n")
    cfg = load_config(_Cfg, p, ["optim.lr=0.5", "name=b"])
    assert cfg.optim.lr == 0.5 and cfg.name == "b"
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(_Cfg, p, ["optim.lr=-1"])


def test_config_bad_yaml_reports_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\noptim: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d"):
        load_config(_Cfg, p)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def _spec():
    return FeatureSpec(user=(Field("user_id", 5),), item=(Field("item_id", 7), Field("genres", 4, 3)))


def test_field_embedding_pools_multi_valued_and_masks_padding():
    spec = _spec()
    emb = FieldEmbedding(spec, 4, init_std=1.0)
    item = torch.tensor([[2, 1, 3, 0], [2, 0, 0, 0]])
    out = emb(item, "item")
    assert out.shape == (2, 2, 4)
    w = emb.weight
    genre_off = 5 + 7
    torch.testing.assert_close(out[0, 1], (w[genre_off + 1] + w[genre_off + 3]) / 2)
    torch.testing.assert_close(out[1, 1], torch.zeros(4))  # no genres -> zero, not NaN
    assert emb(torch.zeros(3, 0, dtype=torch.long), "context").shape == (3, 0, 4)


def test_attention_and_rnns_ignore_padding():
    torch.manual_seed(0)
    att, lstm, gru = TargetAttention(4), LSTM(4, 3), GRU(4, 3)
    keys = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    keys2 = keys.clone()
    keys2[0, 3:] = 99.0  # garbage in padded positions must not matter
    q = torch.randn(2, 4)
    torch.testing.assert_close(att(q, keys, mask)[0][0], att(q, keys2, mask)[0][0])
    for rnn in (lstm, gru):
        torch.testing.assert_close(rnn(keys, mask)[1][0], rnn(keys2, mask)[1][0])
    empty = torch.zeros(1, 5, dtype=torch.bool)
    out, w = att(q[:1], keys[:1], empty)
    assert torch.isfinite(out).all() and w.abs().sum() == 0


def test_cli_unknown_command_exits_2(capsys):
    assert main(["no-such-command"]) == 2


def test_cli_registers_its_commands_once_per_process(capsys):
    from metactr import cli

    main(["models"])
    sizes = (len(cli.app.registered_commands), len(cli.app.registered_groups),
             len(cli.reproduce_app.registered_commands))
    for _ in range(3):
        assert main(["models"]) == 0
    assert (len(cli.app.registered_commands), len(cli.app.registered_groups),
            len(cli.reproduce_app.registered_commands)) == sizes
    assert sizes[0] >= 5 and sizes[1] >= 2  # train, evaluate, tune, serve, bench, ...; data, reproduce


def test_pad_lists_handles_empty_null_and_long_lists():
    import polars as pl

    from metactr.data.prepared import pad_lists

    col = pl.Series([[1, 2], [], None, [3, 4, 5, 6]])
    out, lens = pad_lists(col, 3)
    assert out.tolist() == [[1, 2, 0], [0, 0, 0], [0, 0, 0], [4, 5, 6]]  # keeps the most recent
    assert lens.tolist() == [2, 0, 0, 3]
    first, _ = pad_lists(col, 3, keep="first")
    assert first[3].tolist() == [3, 4, 5]


@pytest.mark.parametrize("argv", [
    ["--help"], ["data", "--help"], ["models", "--help"], ["train", "--help"], ["evaluate", "--help"],
    ["serve", "--help"], ["demo", "--help"], ["reproduce", "rml", "--help"],
    ["reproduce", "metaselector", "--help"],
])
def test_every_command_builds_its_help(argv, capsys):
    # a command whose options typer cannot build would break *every* invocation of the CLI
    assert main(argv) == 0


def test_take_rows_equals_advanced_indexing():
    x = torch.arange(60).view(12, 5)
    for idx in (torch.tensor([3, 0, 11, 3]), torch.tensor([[1, 2], [0, 7]]), torch.tensor([], dtype=torch.long),
                torch.tensor([2, 5], dtype=torch.int32), slice(2, 6), torch.arange(12) % 3 == 0):
        torch.testing.assert_close(take_rows(x, idx), x[idx], atol=0, rtol=0)
    assert take_rows(x, torch.tensor([[1, 2], [0, 7]])).shape == (2, 2, 5)
    with pytest.raises(IndexError):
        take_rows(x, torch.tensor([12]))  # out of range is an error, as with x[idx]
