"""Mixed precision for training and prediction: ``precision: auto | fp32 | bf16``.

``bf16`` runs each forward pass under ``torch.autocast`` with bfloat16: the linear layers'
matrix products take bfloat16 inputs (fp32 accumulation), while the parameters, the optimizer
state, the embeddings and the loss stay in float32. It pays only where the hardware multiplies
bfloat16 natively: CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16 support. Elsewhere torch
emulates it, slowly: on an AMD EPYC Zen 3 host (AVX2 only, no AVX-512) a DeepFM training step
took 118.7 ms in bf16 against 17.9 ms in fp32 (``benchmarks/ab_step.py --compare precision``,
issue 17), i.e. 6.6x slower. On an AMD EPYC Zen 4 host (AVX512_BF16) the same step ran 1.21x
faster in bf16 and a prediction batch 1.2x faster (DIN 1.12-1.17x / 1.09x): see
``docs/training.md`` for the figures and their hosts.

``auto`` (the default) is resolved once, at the start of a run, by :func:`resolve_precision`:
bf16 on CPUs that run it natively (AMX / AVX512_BF16), fp32 otherwise -- on CUDA GPUs too, where
bf16 is native but measured no faster for these models at batch 1,024 (an H100: launch-bound) --
with a one-line notice saying which and why; asking for ``bf16`` explicitly where it is emulated warns with the measured cost. What a
run records (config, checkpoint) is the resolved value, never ``auto``.
DIN's target attention opts out (``TargetAttention`` runs in float32 under autocast): its
element-wise Dice layers cost more in bfloat16 than its narrow matmuls save.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16"]  # the config field's type; PRECISIONS is derived from it
PRECISIONS: tuple[str, ...] = get_args(Precision)
RESOLVED: tuple[str, ...] = ("fp32", "bf16")
# the measured cost of emulated bf16 (issue 17, Zen 3 AVX2-only host, DeepFM step 118.7 vs 17.9 ms)
EMULATED_BF16_SLOWDOWN = 118.7 / 17.9


@dataclass(frozen=True)
class CpuCaps:
    """What the CPU can do for bf16: ``/proc/cpuinfo`` flags and torch's dispatch level."""

    flags: frozenset[str]
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...

    @property
    def native_bf16(self) -> str | None:
        """The feature that makes bf16 native (``amx_bf16`` / ``avx512_bf16``), or None."""
        for flag in ("amx_bf16", "avx512_bf16"):
            if flag in self.flags:
                return flag
        return None


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_caps() -> CpuCaps:
    """This machine's CPU capabilities (cached: read once per process)."""
    flags = set(_cpuinfo_flags())
    cap = torch.backends.cpu.get_cpu_capability()
    if "AMX" in cap.upper():  # torch's dispatch says AMX even where cpuinfo is not readable
        flags.add("amx_bf16")
    return CpuCaps(frozenset(flags), cap)


def cuda_bf16(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _device(device: torch.device | str) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device | str = "cpu", *,
                      caps: CpuCaps | None = None, cuda_supported: Callable[[torch.device], bool] = cuda_bf16,
                      notice: Callable[[str], None] | None = None) -> str:
    """``auto`` -> ``bf16`` or ``fp32`` for ``device`` (a notice says which and why); ``fp32`` /
    ``bf16`` pass through, explicit ``bf16`` warning (``UserWarning``) where it is emulated.

    ``caps`` / ``cuda_supported`` stand in for the hardware in tests; ``notice`` receives the
    one-line notice of an ``auto`` resolution (default: held until the run's first forward pass,
    :func:`autocast`, prints it to stderr, so that a config error that stops the run before it
    starts stays the only line the user sees)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = _device(device)
    if dev.type == "cuda":
        native = cuda_supported(dev)
        if precision == "auto":  # native, yet measured no faster for these models: keep fp32
            (notice or _defer)("precision auto -> fp32: on a GPU bf16 measured no faster at batch 1,024 "
                               "(H100: DeepFM 217k vs 220k rows/s, DIN 115k vs 144k, docs/training.md); "
                               "set precision: bf16 to use it")
            return "fp32"
        why = "this CUDA GPU supports bf16" if native else "this CUDA GPU lacks bf16 support"
    elif dev.type == "cpu":
        caps = caps or cpu_caps()
        feature = caps.native_bf16
        native = feature is not None
        why = (f"this CPU has {feature.upper()}" if native else
               f"this CPU has neither AMX nor AVX512_BF16 (torch dispatch: {caps.torch_capability}); "
               "bf16 would be emulated")
    else:
        native, why = False, f"bf16 is not known to pay on device type '{dev.type}'"
    if precision == "auto":
        chosen = "bf16" if native else "fp32"
        (notice or _defer)(f"precision auto -> {chosen}: {why}")
        return chosen
    if precision == "bf16" and not native:
        warnings.warn(f"precision bf16 requested but {why}: expect it to run about "
                      f"{EMULATED_BF16_SLOWDOWN:.1f}x slower than fp32 (measured on an AVX2-only AMD EPYC, "
                      "issue 17); use precision: auto or fp32", UserWarning, stacklevel=2)
    return precision


_pending: list[str] = []  # the notice of the latest ``auto`` resolution, not yet printed


def _defer(line: str) -> None:
    _pending[:] = [line]


def announce() -> None:
    """Print the held notice of an ``auto`` resolution (once)."""
    if _pending:
        print(_pending.pop(), file=sys.stderr)


def autocast(device: torch.device | str, precision: str = "fp32"):
    """The context the forward pass runs in for ``precision`` on ``device`` (``auto`` is resolved here,
    silently, for callers that did not resolve it at start)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if _pending:
        announce()
    if precision == "auto":
        precision = resolve_precision("auto", device, notice=lambda s: None)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
