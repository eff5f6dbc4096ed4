"""The documented Python API: docs/api.md's example runs end to end, and every exported name resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import metactr

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_exported_name_resolves_and_the_table_lists_them():
    text = DOC.read_text()
    for name in metactr.__all__:
        assert getattr(metactr, name) is not None
        if name not in ("LAYERS", "__version__", "PrepareConfig", "PreparedDataset", "Batch", "ReproduceConfig"):
            assert f"`{name}(" in text, f"docs/api.md does not document {name}"
    with pytest.raises(AttributeError):
        metactr.no_such_function  # noqa: B018


@pytest.mark.slow
def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"## An example, end to end.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, str(DOC), "exec"), scope)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "wc_train" in out and "rml_wo_meta" in out
    # what the example claims: a checkpoint that reloads into the same predictions, real metrics
    assert (tmp_path / "api-example" / "din" / "best.json").is_file()
    ds, din = scope["ds"], scope["din"]
    assert (scope["probs"] == metactr.predict(din.eval(), ds, "wc_test")).all()
    assert scope["meta"]["model"] == "din"
    m = metactr.evaluate(scope["rml"], ds, "wc_test")
    assert m["n"] == len(ds.split("wc_test")) and 0 < m["logloss"] < 5
    ftc = [r for r in scope["res"]["rows"] if r["stage"] == "finetune_c"]
    assert {r["method"] for r in ftc} == {"rml", "rml_wo_meta"} and all(len(r["auc"]) == 2 for r in ftc)
