"""Checkpoints: safetensors for every tensor, JSON for everything else. Never pickle.

A checkpoint ``<stem>`` is two files written atomically, the JSON last (it is the commit
marker: a checkpoint without its JSON is ignored):

    <stem>.safetensors   model.<param>            model weights
                         optim.<name>.<i>.<key>   optimizer state tensors (i = parameter index)
                         rng.torch, rng.data      torch's global RNG and the shuffling generator
                         strategy.<key>           a strategy's own tensors (learned inner rates)
    <stem>.json          model name, hyper-parameters, FeatureSpec, data options, epoch,
                         optimizers' non-tensor state and param_groups, schedulers' state,
                         a strategy's JSON state (task sampler generator),
                         trainer state (best AUC, epochs without improvement, history)

so that ``load_model`` rebuilds the model from the checkpoint alone, and ``restore_training``
continues a run exactly where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metactr.data.batch import FeatureSpec
from metactr.errors import DataError
from metactr.models.base import CTRModel, build_model
from metactr.utils import atomic_path, write_json_atomic

FORMAT = "metactr-checkpoint/1"


def _tensors_out(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: give it private copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in d.items()}


def save_weights(path: str | Path, model: CTRModel, extra: dict[str, torch.Tensor] | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    with atomic_path(path) as tmp:
        save_file(_tensors_out(tensors), str(tmp), metadata=metadata)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError("checkpoint weights not found", path=path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"cannot read safetensors file: {e}", path=path) from None


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise DataError("checkpoint metadata (.json) not found", path=path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", path=path, line=e.lineno) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"not a metactr checkpoint (expected format '{FORMAT}')", path=path)
    return meta


def model_meta(model: CTRModel, hparams: dict[str, Any], data_options: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "model": model.name, "hparams": hparams, "spec": model.spec.to_dict(),
            "data": data_options}


def _optimizer_out(name: str, opt: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> dict[str, Any]:
    sd = opt.state_dict()
    plain_state: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                extra[f"optim.{name}.{idx}.{key}"] = val
            else:
                plain_state.setdefault(str(idx), {})[key] = val
    return {"class": type(opt).__name__, "param_groups": sd["param_groups"], "plain_state": plain_state}


def save_checkpoint(stem: str | Path, model: CTRModel, meta: dict[str, Any], *,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None, schedulers: dict[str, Any] | None = None,
                    rng: dict[str, torch.Tensor] | None = None, trainer: dict[str, Any] | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    extra_state: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` (both atomically).

    ``optimizers`` / ``schedulers`` are keyed by the strategy's names for them (``main``,
    ``local``/``global``, ``outer`` ...); ``extra_tensors`` / ``extra_state`` are a strategy's own
    (learned inner rates, a task sampler's NumPy generator)."""
    stem = Path(stem)
    extra: dict[str, torch.Tensor] = {f"rng.{k}": v for k, v in (rng or {}).items()}
    extra.update({f"strategy.{k}": v for k, v in (extra_tensors or {}).items()})
    meta = dict(meta)
    if optimizers:
        meta["optimizers"] = {n: _optimizer_out(n, o, extra) for n, o in optimizers.items()}
    if schedulers:
        meta["schedulers"] = {n: s.state_dict() for n, s in schedulers.items()}
    if extra_state:
        meta["strategy_state"] = extra_state
    if trainer is not None:
        meta["trainer"] = trainer
    save_weights(stem.with_suffix(".safetensors"), model, extra)
    write_json_atomic(stem.with_suffix(".json"), meta)
    return stem


def load_model(stem: str | Path, device: str | torch.device = "cpu") -> tuple[CTRModel, dict[str, Any]]:
    """Rebuild a model from a checkpoint (``.safetensors`` or ``.json`` path, or their stem)."""
    stem = Path(stem)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    meta = read_meta(stem.with_suffix(".json"))
    spec = FeatureSpec.from_dict(meta["spec"])
    model = build_model(meta["model"], spec, **meta.get("hparams", {}))
    tensors = _read_tensors(stem.with_suffix(".safetensors"))
    load_state(model, tensors, stem.with_suffix(".safetensors"))
    return model.to(device), meta


def load_state(model: CTRModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DataError(f"checkpoint does not fit model '{model.name}': missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}", path=path)
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise DataError(f"checkpoint tensor '{k}' has shape {tuple(v.shape)}, model expects "
                            f"{tuple(expected[k].shape)}", path=path)
    model.load_state_dict(state)


def restore_training(stem: str | Path, model: CTRModel, optimizers: dict[str, torch.optim.Optimizer],
                     schedulers: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights, optimizer and scheduler state in place; return (meta, other tensors:
    ``rng.*`` and ``strategy.*`` with their prefixes)."""
    stem = Path(stem)
    meta = read_meta(stem.with_suffix(".json"))
    tensors = _read_tensors(stem.with_suffix(".safetensors"))
    load_state(model, tensors, stem.with_suffix(".safetensors"))
    saved = meta.get("optimizers", {})
    for name, opt in optimizers.items():
        opt_meta = saved.get(name)
        if opt_meta is None or opt_meta.get("class") != type(opt).__name__:
            raise DataError(f"checkpoint optimizer '{name}' is {opt_meta and opt_meta.get('class')}, the config "
                            f"asks for {type(opt).__name__}", path=stem.with_suffix(".json"), field="optim.name")
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim.{name}."
        for key, val in tensors.items():
            if key.startswith(prefix):
                idx, pname = key[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[pname] = val
        for idx, st in opt_meta.get("plain_state", {}).items():
            state.setdefault(int(idx), {}).update(st)
        opt.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    for name, sched in (schedulers or {}).items():
        if name in meta.get("schedulers", {}):
            sched.load_state_dict(meta["schedulers"][name])
    rest = {k: v for k, v in tensors.items() if k.startswith(("rng.", "strategy."))}
    return meta, rest


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete ``epoch_XXX`` checkpoint (its JSON written) in ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    done = sorted(p.with_suffix("") for p in ckpt_dir.glob("epoch_*.json")
                  if p.with_suffix(".safetensors").is_file())
    return done[-1] if done else None
