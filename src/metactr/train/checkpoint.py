"""Checkpoints: safetensors for every tensor, JSON for everything else. Never pickle.

A checkpoint ``<stem>`` is two files written atomically, the JSON last (it is the commit
marker: a checkpoint without its JSON is ignored). The JSON carries the SHA-256 of the
safetensors file it belongs to (``weights_sha256``), checked on every load: ``best`` is rewritten
in place at each better epoch, and a kill between its two renames would otherwise leave new
weights beside old metadata. Chosen over a directory per checkpoint renamed as one unit because
it keeps the documented ``best.safetensors`` / ``best.json`` paths (``metactr evaluate``, serving)
and costs one hash of bytes already in memory; a torn pair is an error naming it, never loaded, and
``--resume`` rewrites ``best`` from the epoch checkpoint it came from.

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

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from metactr.data.batch import FeatureSpec
from metactr.errors import DataError
from metactr.models.base import CTRModel, build_model
from metactr.utils import atomic_path, write_json_atomic

FORMAT = "metactr-checkpoint/1"


def _tensors_out(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: give it private copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in d.items()}


def save_weights(path: str | Path, model: CTRModel, extra: dict[str, torch.Tensor] | None = None,
                 metadata: dict[str, str] | None = None) -> str:
    """Write the weights (+ ``extra`` tensors) atomically; returns the file's SHA-256."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    blob = save(_tensors_out(tensors), metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def _read_tensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; with ``sha256`` (from the checkpoint's JSON) the file must match it."""
    if not path.is_file():
        raise DataError("checkpoint weights not found", path=path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read safetensors file: {e}", path=path) from None
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise DataError(f"weights do not belong to {path.with_suffix('.json').name} (SHA-256 differs: a save was "
                        "interrupted); use a checkpoint in checkpoints/, or --resume, which rewrites it", path=path)
    try:
        return load(blob)
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"cannot read safetensors file: {e}", path=path) from None


def read_tensors(stem: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint ``stem``, checked against its metadata's hash (when it has one)."""
    return _read_tensors(Path(stem).with_suffix(".safetensors"), meta.get("weights_sha256"))


def is_complete(stem: str | Path) -> bool:
    """Both files present and the weights match the JSON's hash."""
    stem = Path(stem)
    try:
        read_tensors(stem, read_meta(stem.with_suffix(".json")))
    except DataError:
        return False
    return True


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
    meta["weights_sha256"] = save_weights(stem.with_suffix(".safetensors"), model, extra)
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
    tensors = read_tensors(stem, meta)
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
    tensors = read_tensors(stem, meta)
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


_NAME = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?$")


def checkpoint_name(epochs_done: int, step: int | None = None) -> str:
    """``epoch_XXX`` after ``epochs_done`` epochs; ``epoch_XXX_step_YYYYYY``: ``step`` steps into the next."""
    return f"epoch_{epochs_done:03d}" + (f"_step_{step:06d}" if step else "")


def checkpoint_position(stem: str | Path) -> tuple[int, int] | None:
    """(epochs done, steps into the next) of a checkpoint name; None for other names."""
    m = _NAME.match(Path(stem).name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Every committed checkpoint (JSON and weights present) in ``ckpt_dir``, oldest first (by
    position, not by name: ``epoch_1000`` comes after ``epoch_999``)."""
    ckpt_dir = Path(ckpt_dir)
    found = [(pos, p.with_suffix("")) for p in ckpt_dir.glob("epoch_*.json")
             if (pos := checkpoint_position(p.with_suffix(""))) is not None and p.with_suffix(".safetensors").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest committed checkpoint (end of an epoch, or ``checkpoint_every_steps`` within one)."""
    done = list_checkpoints(ckpt_dir)
    return done[-1] if done else None


def remove_checkpoint(stem: str | Path) -> None:
    """Delete a checkpoint, its JSON (the commit marker) first."""
    stem = Path(stem)
    for suffix in (".json", ".safetensors"):
        stem.with_suffix(suffix).unlink(missing_ok=True)


def prune_step_checkpoints(ckpt_dir: str | Path, before: tuple[int, int]) -> None:
    """Delete the mid-epoch checkpoints older than position ``before`` (epoch checkpoints stay)."""
    for p in list_checkpoints(ckpt_dir):
        pos = checkpoint_position(p)
        if pos[1] and pos < before:
            remove_checkpoint(p)


def copy_weights(src: str | Path, dst: str | Path, meta: dict[str, Any]) -> None:
    """Write checkpoint ``dst`` (weights only, ``meta``) from the model weights of checkpoint ``src``."""
    src = Path(src)
    tensors = read_tensors(src, read_meta(src.with_suffix(".json")))
    blob = save(_tensors_out({k: v for k, v in tensors.items() if k.startswith("model.")}))
    with atomic_path(Path(dst).with_suffix(".safetensors")) as tmp:
        tmp.write_bytes(blob)
    write_json_atomic(Path(dst).with_suffix(".json"), {**meta, "weights_sha256": hashlib.sha256(blob).hexdigest()})


def repair_best(best: Path, ckpt_dir: Path, best_epoch: int, meta: dict[str, Any]) -> Path | None:
    """A kill between the two renames of ``best`` leaves a torn pair: rewrite it from the epoch
    checkpoint it was saved with (returned; None when ``best`` is intact or that checkpoint is gone)."""
    src = Path(ckpt_dir) / checkpoint_name(best_epoch)
    if is_complete(best) or not is_complete(src):
        return None
    copy_weights(src, best, {**meta, "epoch": best_epoch})
    return src


# --------------------------------------------------------------------------- --resume-override
def hyperparameters(optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any]) -> dict[str, Any]:
    """The optimizers' group settings and the schedulers' state as the (new) config built them,
    taken before a checkpoint is restored over them."""
    import copy

    return {"optim": {n: [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in o.param_groups]
                      for n, o in optimizers.items()},
            "sched": {n: copy.deepcopy(s.state_dict()) for n, s in schedulers.items()}}


def _position_lrs(sched: Any) -> list[float]:
    """The closed-form learning rates of a scheduler at its ``last_epoch``."""
    from torch.optim.lr_scheduler import ExponentialLR, LambdaLR

    if isinstance(sched, ExponentialLR):
        return [b * sched.gamma ** sched.last_epoch for b in sched.base_lrs]
    if isinstance(sched, LambdaLR):
        return [b * f(sched.last_epoch) for b, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
    raise DataError(f"cannot apply changed settings to a resumed {type(sched).__name__} schedule")


def reapply_hyperparameters(optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                            fresh: dict[str, Any]) -> None:
    """After a restore: keep the optimizers' state (moments) and the schedules' position, take every
    setting (learning rate, decay, weight decay, betas ...) from ``fresh`` (``hyperparameters``),
    and set each learning rate to the new schedule's value at the restored position."""
    for name, opt in optimizers.items():
        for g, new in zip(opt.param_groups, fresh["optim"].get(name, []), strict=False):
            g.update(new)
    for name, sched in schedulers.items():
        if name not in fresh["sched"]:
            continue
        saved = sched.state_dict()
        sched.load_state_dict({**fresh["sched"][name], "last_epoch": saved["last_epoch"],
                               "_step_count": saved.get("_step_count", 0)})
        lrs = _position_lrs(sched)
        for g, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        sched._last_lr = list(lrs)  # what get_last_lr() reports
