"""precision: auto resolves by hardware (mocked here), explicit bf16 warns where emulated, runs record
the resolved value."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from metactr.engine.precision import CpuCaps, autocast, resolve_precision
from metactr.errors import ConfigError
from metactr.train.config import TrainConfig, load_train_config

AVX2 = CpuCaps(frozenset({"avx", "avx2", "fma"}), "AVX2")
AVX512 = CpuCaps(frozenset({"avx2", "avx512f"}), "AVX512")  # AVX-512 without the bf16 extension
AVX512_BF16 = CpuCaps(frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX512")
AMX = CpuCaps(frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"}), "AVX512")


def _resolve(precision, caps=None, device="cpu", cuda=False):
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = resolve_precision(precision, device, caps=caps, cuda_supported=lambda d: cuda, notice=notes.append)
    return got, notes, [str(x.message) for x in w if issubclass(x.category, UserWarning)]


def test_auto_on_avx2_is_fp32_without_warning():
    got, notes, warns = _resolve("auto", AVX2)
    assert got == "fp32" and warns == []
    assert len(notes) == 1 and notes[0].startswith("precision auto -> fp32") and "AVX2" in notes[0]


@pytest.mark.parametrize("caps, feature", [(AVX512_BF16, "AVX512_BF16"), (AMX, "AMX_BF16")])
def test_auto_with_native_bf16_is_bf16(caps, feature):
    got, notes, warns = _resolve("auto", caps)
    assert got == "bf16" and warns == [] and notes == [f"precision auto -> bf16: this CPU has {feature}"]


def test_avx512_without_bf16_extension_is_fp32():
    assert _resolve("auto", AVX512)[0] == "fp32"


def test_explicit_bf16_on_avx2_warns_with_the_cost():
    got, notes, warns = _resolve("bf16", AVX2)
    assert got == "bf16" and notes == []  # honoured, not overridden
    assert len(warns) == 1 and "6.6x slower" in warns[0] and "emulated" in warns[0]


def test_explicit_values_pass_through_quietly():
    assert _resolve("bf16", AVX512_BF16)[1:] == ([], [])
    assert _resolve("fp32", AVX2) == ("fp32", [], [])


def test_cuda_auto_is_fp32_and_explicit_bf16_warns_only_without_support():
    got, notes, warns = _resolve("auto", AVX512_BF16, device="cuda", cuda=True)  # the CPU's flags don't count
    assert got == "fp32" and warns == [] and "measured no faster" in notes[0]
    assert _resolve("bf16", AVX2, device="cuda:0", cuda=True) == ("bf16", [], [])
    got, _, warns = _resolve("bf16", AVX512_BF16, device="cuda:0", cuda=False)
    assert got == "bf16" and len(warns) == 1


def test_bad_value():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")
    with pytest.raises(ValueError):
        autocast("cpu", "half")


def test_autocast_accepts_auto():
    with autocast("cpu", "auto"):
        torch.ones(2) @ torch.ones(2)  # either context works


def test_config_records_resolved_value(monkeypatch, tmp_path):
    import metactr.train.config as cfg_mod

    for caps, want in ((AVX2, "fp32"), (AVX512_BF16, "bf16")):
        monkeypatch.setattr(cfg_mod, "resolve_precision",
                            lambda p, d, caps=caps: resolve_precision(p, d, caps=caps, notice=lambda s: None))
        c = TrainConfig(data={"prepared": "x"})
        assert c.precision == want and c.model_dump()["precision"] == want
    c = TrainConfig(data={"prepared": "x"}, strategy={"name": "maml"})  # no bf16 in maml: auto -> fp32
    assert c.precision == "fp32"
    p = tmp_path / "c.yaml"
    p.write_text("data: {prepared: x}\nprecision: fp16\n")
    with pytest.raises(ConfigError, match="precision"):
        load_train_config(p)


@pytest.mark.parametrize("caps, want", [(AVX2, "fp32"), (AVX512_BF16, "bf16")])
def test_run_with_auto_records_resolved_precision(caps, want, monkeypatch, tmp_path, capsys):
    """A tiny `metactr train` with the default precision writes the resolved value into its checkpoint."""
    import yaml

    import metactr.engine.precision as prec
    from metactr.cli import main
    from test_trainer import make_prepared

    monkeypatch.setattr(prec, "cpu_caps", lambda: caps)
    data = make_prepared(tmp_path / "tiny")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"prepared": str(data)}, "model": {"name": "basic", "params": {"hidden": [8]}},
                                   "epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False,
                                   "out": str(tmp_path / "run")}))
    assert main(["train", str(cfg)]) == 0
    assert f"precision auto -> {want}" in capsys.readouterr().err
    blob = (tmp_path / "run" / "best.json").read_text()
    assert f'"precision": "{want}"' in blob and '"auto"' not in blob
    assert main(["evaluate", str(tmp_path / "run" / "best.safetensors"), "--data", str(data), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == want
